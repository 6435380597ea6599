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
import shutil

from mvm.runtime import log_budget
from mvm.runtime.launchspec import LaunchSpec
from mvm.runtime.supervisor.supervisor import Supervisor

__all__ = ["Supervisor", "run_supervisor"]


def run_supervisor(spec: LaunchSpec) -> None:
    """Serve until the VM has stopped; an abandoned start also takes the VM's directory."""
    supervisors: list[Supervisor] = []

    async def body() -> None:
        supervisors.append(Supervisor(spec))
        await supervisors[0].main()

    asyncio.run(body())
    log_budget.flush_all()
    if supervisors and (supervisors[0].watch.remove_on_exit or supervisors[0].record.ephemeral):
        shutil.rmtree(spec.vm_dir, ignore_errors=True)
