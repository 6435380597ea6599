"""The :class:`Supervisor`: the parts of a VM's supervisor put together, and what belongs to
none of them alone (the record, the stop, the `up` hand-off, pause and snapshot).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mvm.core import protocol
from mvm.core.state import VmPaths, VmRecord, write_json_atomic
from mvm.runtime import backends
from mvm.runtime.boot_markers import BootMarker
from mvm.runtime.launchspec import LaunchSpec
from mvm.runtime.supervisor.agent_link import AgentLink
from mvm.runtime.supervisor.audit_trail import AuditTrail
from mvm.runtime.supervisor.clients import Client, ClientServer
from mvm.runtime.supervisor.console import ConsoleRelay
from mvm.runtime.supervisor.egress import Egress
from mvm.runtime.supervisor.forwards import Forwards
from mvm.runtime.supervisor.vm_process import ProcessWatch


class Supervisor:
    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.paths = VmPaths(Path(spec.vm_dir))
        self.record = VmRecord.load(self.paths)
        self.backend = backends.get(self.record.backend)
        self.stopped = asyncio.Event()
        self.committed = False
        self.snapshotting = False
        self.resumed_from_disk = False  # the same machine again (`pause --to-disk`), not a clone
        self.watch = ProcessWatch(self)
        self.console = ConsoleRelay(self)
        self.agent = AgentLink(self)
        self.clients = ClientServer(self)
        self.forwards = Forwards(self)
        self.egress = Egress(self)
        self.audit = AuditTrail(self)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda: self.watch.request_stop("the supervisor got a signal"))
        self.record.supervisor_pid = os.getpid()
        self.record.qemu_pid = self.watch.proc.pid
        self.record.save(self.paths)
        self.audit.started()
        server = await asyncio.start_unix_server(self.clients.serve, path=str(self.paths.ctl_socket))
        self.paths.ctl_socket.chmod(0o600)  # its directory is 0700 too; SO_PEERCRED is checked as well
        loop.add_reader(self.spec.commit_fd, self.on_commit_pipe)
        tasks = [asyncio.create_task(c) for c in (self.console.pump(self.spec.qemu_stdout),
                                                     self.console.pump_stderr(self.spec.qemu_stderr),
                                                     self.console.serve_boot_channel(),
                                                     self.agent.serve(), self.watch.watch_boot(),
                                                     self.watch.watch_deadline())]
        if self.record.restore_from is not None:
            tasks.append(asyncio.create_task(self.restore()))
        for task in tasks:
            task.add_done_callback(self.on_task_end)
        await self.watch.watch()
        for task in tasks:
            task.cancel()
        server.close()
        self.forwards.close()
        await self.clients.close_all()
        self.cleanup_runtime_files()
        self.release_commit()
        self.console.close()

    def on_task_end(self, task: asyncio.Task) -> None:
        """A part that died on an exception (a bug, or input it could not take) leaves a VM the
        supervisor no longer fully serves: say why in supervisor.log and stop the VM."""
        if task.cancelled() or task.exception() is None or self.stopped.is_set():
            return
        if isinstance(task.exception(), ConnectionError):
            return  # a channel of a VM that is going away: its process's exit says why
        err = task.exception()
        print(f"mvm-supervisor: {task.get_coro().__qualname__} failed: {err!r}", file=sys.stderr, flush=True)
        self.watch.request_stop(f"the supervisor failed ({type(err).__name__}: {str(err)[:200]})", force=True)

    def finish(self, reason: str) -> None:
        """Record the stop once, and answer everyone who waits for it."""
        if self.stopped.is_set():
            return
        record = self.record
        record.state, record.stopped_at, record.stop_reason = "stopped", time.time(), reason
        record.exit_status = self.console.boot.exit_status()
        self.console.record_markers()
        record.save(self.paths)
        self.stopped.set()
        self.clients.answer_waiters("*", {"type": "result", "state": "stopped", "reason": reason,
                                          "exit_status": record.exit_status})
        for client in self.clients.clients:
            if client.attached and client.attach_id is not None:
                client.send(protocol.encode({"type": "exit", "id": client.attach_id, "code": record.exit_status,
                                             "reason": reason}))
            if client.follow_id is not None and client.follow_backlog is None:  # (else send_logs ends it)
                client.send(protocol.encode({"type": "done", "id": client.follow_id}))
        self.agent.fail_all(reason)

    def on_agent_ready(self) -> None:
        self.record.state, self.record.ready_at = "running", time.time()
        self.console.record_markers()
        self.record.save(self.paths)
        self.egress.start()
        if self.egress.settled:  # (else once the guest listens where its allow-list says: egress.py)
            self.on_ready_for_clients()

    def on_ready_for_clients(self) -> None:
        self.clients.answer_waiters("ready", {"type": "result", "state": "running"})

    def cleanup_runtime_files(self) -> None:
        """A stopped VM keeps its record, mode and console log; the rest goes."""
        for path in self.backend.runtime_files(self.paths):
            path.unlink(missing_ok=True)

    # -- `up` hand-off ---------------------------------------------------------------------------

    def on_commit_pipe(self) -> None:
        data = os.read(self.spec.commit_fd, 16)
        if data:
            self.committed = True
            if self.spec.replaced is not None:  # the suspended VM this one resumed: it is this one now
                shutil.rmtree(self.spec.replaced, ignore_errors=True)
        if not data or self.committed:
            asyncio.get_running_loop().remove_reader(self.spec.commit_fd)
        if not data and not self.committed:
            # `up` died (or gave up) before it could report the VM: leave nothing behind.
            self.watch.request_stop("the mvmctl that started it exited before the VM was ready", remove=True)

    def release_commit(self) -> None:
        try:
            os.close(self.spec.commit_fd)
        except OSError:
            pass

    # -- requests that touch the VM as a whole -------------------------------------------------

    async def set_paused(self, client: Client, request_id: int | None, paused: bool) -> None:
        """Freeze or thaw the guest through its backend; the agent is frozen with it."""
        try:
            await (self.backend.pause if paused else self.backend.resume)(self.paths, self.record)
        except Exception as err:  # noqa: BLE001 - the client gets the reason, the VM lives on
            await self.audit.action(client, "pause" if paused else "resume", str(err))
            client.send(protocol.error(request_id, f"{'pause' if paused else 'resume'} failed: {err}"))
            return
        failure = await self.audit.action(client, "pause" if paused else "resume")
        self.record.state = "paused" if paused else ("running" if self.agent.ready else "starting")
        self.record.save(self.paths)
        refused = self.audit.refusal("pause" if paused else "resume", failure)
        if refused is not None:  # (the record says the state it is in; the client hears it was unrecorded)
            client.send(protocol.error(request_id, refused))
            return
        client.send(protocol.encode({"type": "result", "id": request_id, "state": self.record.state}))

    async def snapshot(self, client: Client, request_id: int | None, dest: Path, stop: bool,
                       suspend_tag: str | None = None) -> None:
        """Save the VM into ``dest`` (a directory the client made), then carry on or stop.
        ``suspend_tag``: `pause --to-disk`'s; the stopped VM's record names it from its last
        save on (the record's only writer is this process), so nothing sweeps the save away
        as unused.

        The agent is told first (``freeze``), so every copy made from these files wakes up
        refusing work until it has been given an identity of its own; this VM is thawed
        again once it runs on."""
        record = self.record
        if record.state != "running" or not self.agent.answering:
            client.send(protocol.error(request_id, f"VM {record.name} is {record.state}: only a running VM whose "
                                                   "agent answers can be snapshotted"))
            return
        if self.snapshotting:
            client.send(protocol.error(request_id, f"VM {record.name} is being snapshotted already"))
            return
        self.snapshotting = True
        try:
            await self.agent.ask({"type": "freeze"})
            try:
                saved = await self.backend.snapshot(self.paths, record, dest)
            except BaseException:
                await self._carry_on()
                raise
            if stop:
                self.record.suspended = suspend_tag
                self.watch.request_stop("suspended to disk" if suspend_tag else "stopped after its snapshot was taken",
                                        force=True)
            else:
                await self._carry_on()
        except Exception as err:  # noqa: BLE001 - the client gets the reason, the VM lives on
            client.send(protocol.error(request_id, f"snapshot failed: {err}"))
            return
        finally:
            self.snapshotting = False
        client.send(protocol.encode({"type": "result", "id": request_id, **saved, **self._saved_facts()}))

    async def _carry_on(self) -> None:
        await self.backend.resume(self.paths, self.record)
        await self.agent.ask({"type": "thaw"})

    def _saved_facts(self) -> dict[str, Any]:
        record = self.record
        return {"artifact_key": record.artifact_key, "artifact_name": record.artifact_name, "backend": record.backend,
                "accel": record.accel, "vcpus": record.vcpus, "memory_mib": record.memory_mib, "uids": record.uids,
                "sealed": record.sealed, "accessible": record.accessible, "argv": record.argv,
                "network": record.network, "allow": list(record.allow)}

    async def restore(self) -> None:
        """A clone: load the snapshot into the QEMU just started. The agent channel is served
        meanwhile; the agent answers once the guest runs, and gets its identity then."""
        record = self.record
        assert record.restore_from is not None
        try:
            manifest = json.loads((Path(record.restore_from) / "manifest.json").read_text())["manifest"]
            self.resumed_from_disk = manifest.get("purpose") == "suspend"
            if self.spec.restored is None:  # (else the launcher restored it: backends/qemu_restore.py)
                await self.backend.restore(self.paths, record, Path(record.restore_from),
                                           str(manifest["hypervisor_version"]))
            self.console.host_markers.append(BootMarker("restored", [f"snapshot={record.snapshot}"], None,
                                                        self.spec.restored or time.monotonic()))
        except Exception as err:  # noqa: BLE001 - any failure is the clone's stop reason
            await asyncio.sleep(0.1)  # when QEMU exited over it, its own last words say more
            detail = self.console.stderr_tail.decode(errors="replace").strip().splitlines()
            reason = detail[-1][:300] if detail else (str(err) or repr(err))
            self.watch.request_stop(f"could not restore snapshot {record.snapshot}: {reason}", force=True)

    def set_deadline(self, deadline: float | None) -> None:
        self.record.deadline = deadline
        self.record.save(self.paths)
        self.watch.deadline_changed.set()

    def set_mode(self, mode: str) -> None:
        self.record.mode = mode
        write_json_atomic(self.paths.mode, {"mode": mode})
        self.record.save(self.paths)

    def status(self) -> dict[str, Any]:
        live = asdict(self.record)
        live["agent"] = self.agent.hello
        return live
