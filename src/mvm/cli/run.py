"""``mvmctl run``: build if needed, boot, stream the console, exit with the entrypoint's status."""

from __future__ import annotations

import sys

import click

from mvm.cli.build import build_workload
from mvm.core.errors import UsageError
from mvm.core.sizes import parse_mib
from mvm.core.state import MvmHome
from mvm.runtime.lifecycle import RunResult, run_attached


@click.command()
@click.argument("directory", default=".", type=click.Path())
@click.option("--attached/--detached", default=True, show_default=True,
              help="Attached: the VM lives as long as this command and its console is your terminal.")
@click.option("--cpus", type=int, help="vCPUs for this run (default: the image's).")
@click.option("--memory", metavar="SIZE", help="Memory for this run, e.g. 512M (default: the image's).")
@click.option("--boot-report", is_flag=True,
              help="After the VM stops, print when each boot phase was reached (to stderr).")
def run(directory: str, attached: bool, cpus: int | None, memory: str | None, boot_report: bool) -> None:
    """Boot the guest in DIRECTORY (building it first if needed) and stream its console.

    The entrypoint's exit status becomes mvmctl's. Ctrl-C stops the VM; nothing is left
    running. On an accessible image (shell entrypoint) your terminal is the guest's console:
    Ctrl-] leaves it and stops the VM.
    """
    if not attached:
        raise UsageError("--detached needs the per-VM supervisor, which this version does not have yet",
                         "use `mvmctl run --attached`")
    if cpus is not None and cpus < 1:
        raise UsageError(f"--cpus: {cpus} must be at least 1")
    try:
        memory_mib = parse_mib(memory) if memory else None
    except ValueError as err:
        raise UsageError(f"--memory: {err}") from None
    home = MvmHome.default()
    _, result = build_workload(directory, home=home)
    artifact = result.artifact
    stdin_fd = sys.stdin.fileno() if artifact.meta.accessible else None
    outcome = run_attached(home, artifact, vcpus=cpus, memory_mib=memory_mib, stdin_fd=stdin_fd)
    if boot_report:
        print_boot_report(outcome)
    sys.exit(outcome.exit_code)


def print_boot_report(outcome: RunResult) -> None:
    """Host-side times from QEMU's start to each /init marker and to the agent's hello."""
    click.echo(f"boot report ({outcome.accel}; ms since QEMU started):", err=True)
    for phase in ("initramfs", "init", "agent-ready", "entrypoint", "exit"):
        ms = outcome.phase_ms(phase)
        click.echo(f"  {phase:<12} {'not reached' if ms is None else f'{ms:>6} ms'}", err=True)
    hello = outcome.agent_hello
    if hello is None:
        click.echo("  agent        no hello on its channel before the VM stopped", err=True)
    else:
        answered = "ping answered" if outcome.agent_pong else "ping not answered"
        click.echo(f"  agent        protocol v{hello.get('version')}, uid {hello.get('uid')}, {answered}", err=True)


COMMANDS = [run]
