"""The boot gate: boot an image N times, each phase's p50/p90/p99, and p50 to agent-ready
against a budget (the artifact's for the accelerator the VMs ran under, or one given).

Each boot is a cold `up` of a VM of its own name, then `down --force`. The entrypoint is
replaced by a command that waits (``KEEP_ALIVE``), so every boot reaches agent-ready whatever
the workload does (examples/hello ends before its agent answers under TCG); passing a command
costs /init one extra python3 start (it decodes the argv), alongside the agent's. The timings
come from each VM's record, as `mvmctl boot-report` shows them (runtime/boot_phases.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from mvm.core.bootimage import BootImage
from mvm.core.errors import MvmError, UsageError
from mvm.core.state import MvmHome
from mvm.runtime import lifecycle
from mvm.runtime.boot_phases import PHASES, boot_phases

GATE_PHASE = "agent-ready"
KEEP_ALIVE = ["/bin/sh", "-c", "while :; do sleep 3600; done"]
MAX_RUNS = 1000
PERCENTILES = (50, 90, 99)


class BudgetMissed(MvmError):
    """p50 to agent-ready over the budget, or a boot that never got there: the gate fails."""


@dataclass
class BootGate:
    """N boots of one image: each boot's phases and the gate's verdict."""

    image: str
    backend: str
    accel: str
    budget_ms: int
    budget_source: str  # "artifact" (bootBudgetMs for this accelerator) or "--p50-ms"
    runs: list[dict[str, int | None]] = field(default_factory=list)

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        """Per phase: how many boots reached it, and p50/p90/p99 of its ms over those."""
        out: dict[str, dict[str, float | int | None]] = {}
        for phase in PHASES:
            values = sorted(v for run in self.runs if (v := run.get(phase)) is not None)
            out[phase] = {"n": len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}}
        return out

    @property
    def p50_ms(self) -> float | None:
        return self.stats()[GATE_PHASE]["p50"]

    @property
    def passed(self) -> bool:
        reached = self.stats()[GATE_PHASE]["n"] == len(self.runs) > 0
        return reached and self.p50_ms is not None and self.p50_ms <= self.budget_ms

    def verdict(self) -> str:
        where = f"{self.backend}/{self.accel}, {len(self.runs)} boots"
        missing = len(self.runs) - int(self.stats()[GATE_PHASE]["n"] or 0)
        if missing:
            return f"{missing} of {len(self.runs)} boots never reached {GATE_PHASE} ({where})"
        relation = "within" if self.passed else "over"
        return f"p50 {GATE_PHASE} {self.p50_ms:.0f} ms is {relation} the budget of {self.budget_ms} ms ({where})"

    def as_dict(self) -> dict[str, object]:
        return {"image": self.image, "backend": self.backend, "accel": self.accel, "gate_phase": GATE_PHASE,
                "budget_ms": self.budget_ms, "budget_source": self.budget_source, "p50_ms": self.p50_ms,
                "passed": self.passed, "phases": self.stats(), "runs": self.runs}


def percentile(values: list[int], q: float) -> float | None:
    """The q-th percentile of sorted ``values``, interpolated between neighbours (p50 is the
    median); None for no values."""
    if not values:
        return None
    position = (len(values) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def check_args(runs: int, budget_ms: int | None) -> None:
    """Before anything is built or booted."""
    if not 1 <= runs <= MAX_RUNS:
        raise UsageError(f"--runs {runs}: must be 1 to {MAX_RUNS}")
    if budget_ms is not None and budget_ms < 1:
        raise UsageError(f"--p50-ms {budget_ms}: a budget is at least 1 ms")


def boot_gate(home: MvmHome, image: BootImage, *, runs: int, hypervisor: str | None = None,
              budget_ms: int | None = None, name: str | None = None,
              progress: Callable[[str], None] | None = None,
              each: Callable[[int, dict[str, int | None]], None] | None = None) -> BootGate:
    """Boot ``image`` ``runs`` times, one after another, and judge p50 to agent-ready."""
    check_args(runs, budget_ms)
    vm_name = name or f"perf-{image.name}"[:48]
    gate: BootGate | None = None
    for index in range(runs):
        try:
            record = lifecycle.up(home, image, name=vm_name, hypervisor=hypervisor, progress=progress,
                                  argv=KEEP_ALIVE)
            phases = boot_phases(record)
        finally:
            _remove(home, vm_name)
        if gate is None:
            chosen = image.boot_budget_ms(record.accel) if budget_ms is None else budget_ms
            gate = BootGate(image.name, record.backend, record.accel, chosen,
                            "artifact" if budget_ms is None else "--p50-ms")
        gate.runs.append(phases)
        if each is not None:
            each(index, phases)
    assert gate is not None
    return gate


def _remove(home: MvmHome, name: str) -> None:
    """Each boot's VM goes, whether its `up` worked or not (a failed `up` leaves nothing, but
    one whose guest stopped early leaves a stopped record)."""
    try:
        lifecycle.down(home, name, force=True)
    except MvmError:
        pass  # nothing of it is left
