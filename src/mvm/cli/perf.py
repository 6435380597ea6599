"""``mvmctl perf boot``: the boot gate (runtime/perf.py) as a command: a table, or JSON, and
exit status 1 when p50 to agent-ready is over the budget."""

from __future__ import annotations

import json
import sys

import click

from mvm.cli.project import FLAKE_OPTION, project_dir
from mvm.cli.vm import boot_image, note
from mvm.core.state import MvmHome
from mvm.runtime import backends
from mvm.runtime.boot_phases import PHASES
from mvm.runtime.perf import (
    GATE_PHASE,
    MAX_RUNS,
    BootGate,
    BudgetMissed,
    boot_gate,
    check_args,
)


@click.group()
def perf() -> None:
    """Measure mvm itself."""


@perf.command(name="boot")
@click.argument("directory", required=False, type=click.Path())
@FLAKE_OPTION
@click.option("--backend", type=click.Choice(["auto", *backends.ALL_BACKENDS]),
              help="Backend to boot on (default: mvm.toml's, else the first available, as for `up`).")
@click.option("--runs", type=int, default=10, show_default=True, help=f"Cold boots, one after another (1-{MAX_RUNS}).")
@click.option("--p50-ms", "p50_ms", type=int, metavar="MS",
              help="The budget for p50 to agent-ready (default: the image's for the accelerator, see below).")
@click.option("--json", "as_json", is_flag=True, help="Print every boot's phases and the percentiles as JSON.")
def perf_boot(directory: str | None, flake: str | None, backend: str | None, runs: int, p50_ms: int | None,
              as_json: bool) -> None:
    """Boot DIR's image RUNS times and gate on p50 from the VM's start to agent-ready.

    Each boot is a cold `up` (its entrypoint replaced by a command that waits, so every boot
    reaches agent-ready), then `down --force`. Prints p50/p90/p99 of every boot-report phase
    and exits 1 when p50 to agent-ready is over the budget (or a boot never got there).

    The budget is the image's (artifact.json bootBudgetMs) for the accelerator the VMs ran
    under: kvm 300 ms, tcg 2500 ms, container 3000 ms, unless --p50-ms says otherwise.

    \b
      mvmctl perf boot examples/hello --runs 20
      mvmctl perf boot . --backend qemu --runs 100 --p50-ms 300 --json
    """
    check_args(runs, p50_ms)
    home = MvmHome.default()
    image = boot_image(project_dir(directory, flake), home)

    def each(index: int, phases: dict[str, int | None]) -> None:
        if not as_json:
            ready = phases.get(GATE_PHASE)
            note(f"boot {index + 1}/{runs}: {GATE_PHASE} {'not reached' if ready is None else f'{ready} ms'}")

    gate = boot_gate(home, image, runs=runs, hypervisor=backend, budget_ms=p50_ms, progress=note, each=each)
    if as_json:
        click.echo(json.dumps(gate.as_dict(), indent=2))
    else:
        for line in table(gate):
            click.echo(line)
    if not gate.passed:
        sys.stdout.flush()
        raise BudgetMissed(gate.verdict(), "the phases above show where the time goes; --p50-ms sets another budget")
    if not as_json:
        click.echo(f"gate passed: {gate.verdict()}")


def table(gate: BootGate) -> list[str]:
    source = "the image's" if gate.budget_source == "artifact" else "--p50-ms"
    lines = [(f"{gate.image}: {len(gate.runs)} cold boots on {gate.backend}/{gate.accel}, ms since {gate.backend} "
              f"started (budget for p50 {GATE_PHASE}: {gate.budget_ms} ms, {source})"),
             f"  {'phase':<15} {'boots':>5} {'p50':>7} {'p90':>7} {'p99':>7}"]
    for phase, stat in gate.stats().items():
        if phase not in PHASES:
            continue
        cells = ["-" if stat[f"p{q}"] is None else f"{stat[f'p{q}']:.0f}" for q in (50, 90, 99)]
        lines.append(f"  {phase:<15} {stat['n']:>5} {cells[0]:>7} {cells[1]:>7} {cells[2]:>7}")
    return lines


COMMANDS = [perf]
