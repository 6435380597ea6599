"""The VM's process, as the supervisor watches and stops it.

The process (QEMU, the docker CLI, Firecracker) was spawned by the launcher before the
supervisor was exec'd, so it is our child but not a Popen of ours: :class:`VmProcess` reaps
it by pid. :class:`ProcessWatch` waits for it to exit (a pidfd), decides why it stopped, and
carries out stops: ask the agent to shut the guest down, else signal through the backend,
else kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import TYPE_CHECKING

from mvm.core import protocol

if TYPE_CHECKING:
    from mvm.runtime.supervisor.supervisor import Supervisor

SHUTDOWN_ID = 0  # the supervisor's own shutdown request; client requests get ids from 1
STOP_TIMEOUT_S = 10.0
MAX_STOP_TIMEOUT_S = 3600.0  # a graceful stop waits at most this long for the guest
KILL_GRACE_S = 3.0
BOOT_TIMEOUT_FACTOR = 20  # no /init marker after 20x the expected boot time: give up


class VmProcess:
    """A child we did not start with Popen: reaped by pid, never signalled once reaped."""

    def __init__(self, pid: int, stdin: int) -> None:
        self.pid = pid
        self.stdin = stdin
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a reaped (and maybe reused) pid
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ProcessWatch:
    """Waits for the VM's process to end and stops it when asked."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.proc = VmProcess(sup.spec.qemu_pid, sup.spec.qemu_stdin)
        os.set_blocking(self.proc.stdin, False)  # console input must never block the supervisor
        self.stopping: str | None = None  # why a stop was asked for
        self.remove_on_exit = False  # `up` was abandoned: the VM's directory goes too
        self.shutdown_refused = asyncio.Event()
        self.deadline_changed = asyncio.Event()

    async def watch(self) -> None:
        """Returns once the process has exited and the stop is recorded."""
        sup = self.sup
        pidfd = os.pidfd_open(self.proc.pid)
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, exited.set)
        await exited.wait()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = self.proc.wait()
        await sup.backend.after_exit(sup.record)
        await sup.console.settle()  # the console pipe and the boot channel may still hold the last bytes
        sup.console.flush()
        sup.finish(self.exit_reason(code))

    def exit_reason(self, code: int) -> str:
        boot = self.sup.console.boot
        label = self.sup.backend.process_label
        status = boot.exit_status()
        if self.stopping:
            return self.stopping
        if code < 0:
            return f"{label} was killed by signal {-code} ({signal.Signals(-code).name})"
        if status is not None:
            return f"its entrypoint exited with status {status}"
        if boot.seen("shutdown") is not None:
            return "the guest shut down"
        detail = self.sup.console.stderr_tail.decode(errors="replace").strip().splitlines()
        return f"{label} exited with code {code}" + (f": {detail[-1]}" if detail else "")

    def request_stop(self, reason: str, *, force: bool = False, timeout: float = STOP_TIMEOUT_S,
                     remove: bool = False) -> None:
        if self.stopping is None:
            self.stopping = reason
        self.remove_on_exit |= remove
        asyncio.get_running_loop().create_task(self.stop(force, timeout))

    async def stop(self, force: bool, timeout: float) -> None:
        sup = self.sup
        if sup.stopped.is_set():
            return
        if not force and sup.agent.answering:
            sup.agent.send(protocol.encode({"type": "shutdown", "id": SHUTDOWN_ID}))
            refused = asyncio.create_task(self.shutdown_refused.wait())
            stopped = asyncio.create_task(sup.stopped.wait())
            await asyncio.wait({refused, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            refused.cancel()
            stopped.cancel()
            if sup.stopped.is_set():
                return
        await sup.backend.terminate(sup.record, self.proc, signal.SIGKILL if force else signal.SIGTERM)
        if not await self.wait_stopped(KILL_GRACE_S):
            await sup.backend.terminate(sup.record, self.proc, signal.SIGKILL)

    async def wait_stopped(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.sup.stopped.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def watch_deadline(self) -> None:
        """Stop the VM when its lifetime (record.deadline) is over, however long its owner
        lives: a program that dies leaves no sandbox running for ever."""
        sup = self.sup
        while not sup.stopped.is_set():
            deadline = sup.record.deadline
            left = None if deadline is None else deadline - time.time()
            if left is not None and left <= 0:
                self.request_stop("its lifetime ended (the deadline it was started with, or set later)")
                return
            self.deadline_changed.clear()
            try:
                await asyncio.wait_for(self.deadline_changed.wait(), left)
            except TimeoutError:
                pass

    async def watch_boot(self) -> None:
        """Give up on a guest that shows no sign of life long after it should have."""
        sup = self.sup
        limit = sup.spec.expected_boot_ms * BOOT_TIMEOUT_FACTOR / 1000
        await asyncio.sleep(limit)
        if sup.stopped.is_set() or sup.agent.ready:
            return
        if sup.record.restore_from is not None:
            self.request_stop(f"the clone's agent did not answer within {limit:.0f} s of its restore", force=True)
        elif sup.console.boot.seen("init") is None:
            self.request_stop(f"no sign of /init after {limit:.0f} s (see {sup.paths.console_log})", force=True)
        elif sup.console.boot.exit_status() is None:
            self.request_stop(f"its agent did not answer within {limit:.0f} s of boot", force=True)
