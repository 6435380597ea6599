"""Where a boot's time went: each phase in ms since the VM's process started, from its record.

The record holds markers from three sources, which differ in who could have forged them:

- /init's markers (initramfs, root-mounted, init, agent-started, entrypoint, exit), on the
  boot channel only root in the guest can write (runtime/boot_markers.py), each placed by the
  guest's uptime; ``kernel`` is the guest clock's zero on the host's clock;
- ``agent-ready``: the host's own observation, the agent's hello arriving on its channel;
- ``agent-imported``: what the agent says in that hello (the guest's uptime once it had
  imported its modules). The agent runs as its own uid, which the workload cannot signal,
  trace or impersonate, but a root workload (a dev image) could replace it and say anything:
  the supervisor keeps the value only between agent-started and agent-ready, and nothing
  decides on it. It is a hint for where the agent's start went.

Phases run in a chain, except that /init starts the entrypoint straight after the agent,
without waiting for it: ``AFTER`` says which phase each one's step is measured from.
"""

from __future__ import annotations

from typing import Any

from mvm.core.state import VmRecord
from mvm.runtime import backends

# A clone of a snapshot boots nothing: its phases are "restored" (QEMU has loaded the saved
# state) and "identity" (its agent has its own entropy, clock and names), both the host's own.
PHASES = ("kernel", "initramfs", "root-mounted", "init", "agent-started", "restored", "agent-imported", "identity",
          "agent-ready", "entrypoint", "exit")
AFTER = {"kernel": None, "initramfs": "kernel", "root-mounted": "initramfs", "init": "root-mounted",
         "agent-started": "init", "restored": "agent-started", "agent-imported": "restored",
         "identity": "agent-imported", "agent-ready": "identity", "entrypoint": "agent-started",
         "exit": "entrypoint"}


def boot_phases(record: VmRecord) -> dict[str, int | None]:
    """Each phase's ms since the VM's process started; None where it was not reached (or, for
    a container, has no meaning: no kernel, no initramfs)."""
    phases: dict[str, int | None] = {phase: _marker_ms(record, phase) for phase in PHASES}
    first = next((m for m in record.markers if m.get("guest_uptime") is not None
                  and m["phase"] not in ("agent-ready", "agent-imported")), None)
    # The guest's uptime counts from the kernel's start: subtract it from when the line arrived.
    if first is None or not backends.get(record.backend).boots_kernel:  # a container starts no kernel
        phases["kernel"] = None
    else:
        phases["kernel"] = max(0, round(first["ms"] - _number(first["guest_uptime"]) * 1000))
    return phases


def steps(phases: dict[str, int | None]) -> dict[str, int | None]:
    """Each reached phase's ms after the one it is measured from (``step_origin``)."""
    out: dict[str, int | None] = {}
    for phase in PHASES:
        ms, origin = phases.get(phase), step_origin(phases, phase)
        out[phase] = None if ms is None else ms - (0 if origin is None else phases[origin] or 0)
    return out


def step_origin(phases: dict[str, int | None], phase: str) -> str | None:
    """The nearest reached phase that ``phase`` follows (AFTER); None: the process start."""
    before = AFTER[phase]
    while before is not None and phases.get(before) is None:
        before = AFTER[before]
    return before


def _marker_ms(record: VmRecord, phase: str) -> int | None:
    return next((m["ms"] for m in record.markers if m["phase"] == phase), None)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
