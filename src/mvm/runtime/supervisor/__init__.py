"""The per-VM supervisor: one host process that owns the VM's process, the agent channel, the
console log and the VM's record, and serves many clients on ``vms/<name>/ctl.sock``.

Like containerd's shim it outlives the command that started it (``mvmctl up`` returns once
the agent is ready) and the VM cannot outlive it: the VM's process is spawned with
PDEATHSIG, so even a SIGKILL of the supervisor takes the VM down, and its flock on
``supervisor.lock`` vanishes with it, which is how every command tells a live VM from a ghost.

It is exec'd fresh by runtime/launcher.py after the VM's process was spawned, so it imports
only what it needs (no pydantic, no build code, one backend): a few MiB of RSS per VM.

Its parts, each a module here, put together by :class:`Supervisor` (supervisor.py):

- vm_process.py  the VM's process: wait for its end, stop it (shutdown, signal, kill)
- console.py     the console: console.log, attached clients, replay; boot markers
- agent_link.py  the one agent channel: requests forwarded with ids rewritten, replies routed
- clients.py     ctl.sock's clients and what each request means
- forwards.py    host ports tunnelled through the agent to the guest's loopback
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from mvm.runtime import launcher, log_budget
from mvm.runtime.launchspec import LaunchSpec
from mvm.runtime.supervisor.supervisor import Supervisor

__all__ = ["Supervisor", "run_supervisor"]


def run_supervisor(spec: LaunchSpec) -> None:
    """Serve until the VM has stopped; an abandoned start also takes the VM's directory."""
    supervisors: list[Supervisor] = []

    async def body() -> None:
        supervisors.append(Supervisor(spec))
        await supervisors[0].main()

    try:
        asyncio.run(body())
    finally:  # (even if the supervisor failed: a resume it did not commit leaves the VM suspended)
        log_budget.flush_all()
        sup = supervisors[0] if supervisors else None
        if spec.replaced is not None and os.path.isdir(spec.replaced) and not (sup is not None and sup.committed):
            launcher.put_back(Path(spec.replaced), Path(spec.vm_dir))
        elif sup is not None and (sup.watch.remove_on_exit or sup.record.ephemeral):
            shutil.rmtree(spec.vm_dir, ignore_errors=True)
