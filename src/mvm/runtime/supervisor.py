"""The per-VM supervisor: one host process that owns QEMU, the agent channel, the console
log and the VM's record, and serves many clients on ``vms/<name>/ctl.sock``.

Like containerd's shim it outlives the command that started it (``mvmctl up`` returns once
the agent is ready) and QEMU cannot outlive it: QEMU is spawned with PDEATHSIG, so even a
SIGKILL of the supervisor takes the VM down, and its flock on ``supervisor.lock`` vanishes
with it, which is how every command tells a live VM from a ghost.

It is exec'd fresh by runtime/launcher.py after QEMU was spawned, so it imports only what
it needs (no pydantic, no build code): a few MiB of RSS per VM instead of the CLI's.

Clients speak the agent's framing (core/protocol.py). Agent requests (exec, files,
telemetry, console, ...) are forwarded with their ids rewritten so many clients share the one
channel; the supervisor answers its own: ``ready``, ``status``, ``wait``, ``logs``,
``attach``, ``detach``, ``stop``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvm.core import protocol
from mvm.core.errors import VmError
from mvm.core.state import VmPaths, VmRecord, write_json_atomic
from mvm.runtime.console import BootMarker, ConsoleFilter
from mvm.runtime.launchspec import LaunchSpec

TERMINAL = frozenset({"exit", "done", "result", "error", "pong"})  # replies that end a request
AGENT_OPS = frozenset({"exec", "console", "stdin", "signal", "resize", "read", "write", "list", "stat",
                       "remove", "mkdir", "rename", "telemetry", "ping"})
SHUTDOWN_ID = 0  # the supervisor's own shutdown request; client requests get ids from 1
STOP_TIMEOUT_S = 10.0
KILL_GRACE_S = 3.0
BOOT_TIMEOUT_FACTOR = 20  # no /init marker after 20x the expected boot time: give up
REPLAY_LIMIT = 1 << 20  # console bytes kept in memory for a client that attaches late


@dataclass
class QemuProcess:
    """QEMU as a child we did not start with Popen (it was spawned before our exec)."""

    pid: int
    stdin: int
    returncode: int | None = None

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


@dataclass(eq=False)  # identity: clients are kept in sets
class Client:
    writer: asyncio.StreamWriter
    attached: bool = False  # receives the console and the final exit
    attach_id: int | None = None
    follow_id: int | None = None  # a `logs --follow` request

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


@dataclass(eq=False)
class TunnelEnd:
    """The host end of one forwarded TCP connection: the agent's frames for it land here."""

    writer: asyncio.StreamWriter
    decoder: protocol.Decoder = field(default_factory=protocol.Decoder)

    def send(self, data: bytes) -> None:
        frames, _ = self.decoder.feed_all(data)
        for frame in frames:
            if frame.type == "data" and not self.writer.is_closing():
                self.writer.write(frame.body)
            elif frame.type in ("done", "error"):  # the guest closed, or nothing listens there
                self.writer.close()


@dataclass
class Route:
    """One forwarded request: whose it is and the id the client knows it by."""

    client: Client | TunnelEnd
    client_id: int
    op: str


@dataclass
class Supervisor:
    spec: LaunchSpec
    clients: set[Client] = field(default_factory=set)
    routes: dict[int, Route] = field(default_factory=dict)  # channel id -> route
    by_client: dict[tuple[int, int], int] = field(default_factory=dict)  # (id(client), client id) -> channel id
    next_id: int = 1
    agent_writer: asyncio.StreamWriter | None = None
    agent_hello: dict[str, Any] | None = None
    pending: list[tuple[Client | TunnelEnd, protocol.Frame]] = field(default_factory=list)  # agent requests before ready
    waiters: list[tuple[Client, int, str]] = field(default_factory=list)  # (client, id, "ready"|"wait")
    console_replay: bytearray = field(default_factory=bytearray)
    console_input: bytearray = field(default_factory=bytearray)  # held until an interactive entrypoint speaks
    stderr_tail: bytearray = field(default_factory=bytearray)
    stopping: str | None = None  # why a stop was asked for
    committed: bool = False
    remove_on_exit: bool = False  # `up` was abandoned: the VM's directory goes too
    failed_writes: set[tuple[int, int]] = field(default_factory=set)  # drop the rest of a refused upload
    forward_servers: list[asyncio.AbstractServer] = field(default_factory=list)
    markers_seen: int = 0  # console markers already applied to the record

    def __post_init__(self) -> None:
        self.paths = VmPaths(Path(self.spec.vm_dir))
        self.record = VmRecord.load(self.paths)
        self.proc = QemuProcess(self.spec.qemu_pid, self.spec.qemu_stdin)
        self.log = self.paths.console_log.open("ab")
        self.console = ConsoleFilter(sink=self.on_user_output)
        self.stopped = asyncio.Event()
        self.shutdown_refused = asyncio.Event()
        self.spawned = self.spec.spawned
        self.agent_ready_marker: BootMarker | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda: self.request_stop("the supervisor got a signal"))
        self.record.supervisor_pid = os.getpid()
        self.record.qemu_pid = self.proc.pid
        self.record.save(self.paths)
        server = await asyncio.start_unix_server(self.serve_client, path=str(self.paths.ctl_socket))
        loop.add_reader(self.spec.commit_fd, self.on_commit_pipe)
        tasks = [asyncio.create_task(c) for c in (self.pump_console(), self.pump_stderr(), self.connect_agent(),
                                                     self.watch_boot())]
        await self.watch_qemu()
        for task in tasks:
            task.cancel()
        server.close()
        for forward in self.forward_servers:
            forward.close()
        await self.close_clients()
        self.cleanup_runtime_files()
        self.release_commit()
        self.log.close()

    async def close_clients(self, timeout: float = 1.0) -> None:
        """Close every client once what was written to it (the exit frames) has gone out."""
        writers = [client.writer for client in self.clients]
        for writer in writers:
            writer.close()  # the transport flushes its buffer first
        if writers:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in writers], timeout=timeout)

    async def watch_qemu(self) -> None:
        pidfd = os.pidfd_open(self.proc.pid)
        exited = asyncio.Event()
        asyncio.get_running_loop().add_reader(pidfd, exited.set)
        await exited.wait()
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        code = self.proc.wait()
        if self.record.backend == "docker" and self.record.backend_id:
            # The docker CLI may have died alone (kill -9): the container must not outlive it.
            from mvm.runtime import docker

            await asyncio.to_thread(docker.remove, self.record.backend_id)
            self.record.backend_released = True
        await asyncio.sleep(0.05)  # the console pipe may still hold the last marker
        self.console.flush()
        self.finish(self.exit_reason(code))

    def exit_reason(self, code: int) -> str:
        status = self.console.exit_status()
        if self.stopping:
            return self.stopping
        if code < 0:
            return f"{self.backend_process} was killed by signal {-code} ({signal.Signals(-code).name})"
        if status is not None:
            return f"its entrypoint exited with status {status}"
        if self.console.seen("shutdown") is not None:
            return "the guest shut down"
        detail = self.stderr_tail.decode(errors="replace").strip().splitlines()
        return f"{self.backend_process} exited with code {code}" + (f": {detail[-1]}" if detail else "")

    @property
    def backend_process(self) -> str:
        return {"qemu": "QEMU", "docker": "the docker CLI", "firecracker": "Firecracker"}.get(self.record.backend,
                                                                                           self.record.backend)

    def finish(self, reason: str) -> None:
        """Record the stop once, and answer everyone who waits for it."""
        if self.stopped.is_set():
            return
        record = self.record
        record.state, record.stopped_at, record.stop_reason = "stopped", time.time(), reason
        record.exit_status = self.console.exit_status()
        self.record_markers()
        record.save(self.paths)
        self.stopped.set()
        result = {"type": "result", "state": "stopped", "reason": reason, "exit_status": record.exit_status}
        for client, request_id, _ in self.waiters:
            client.send(protocol.encode({**result, "id": request_id}))
        self.waiters.clear()
        for client in self.clients:
            if client.attached and client.attach_id is not None:
                client.send(protocol.encode({"type": "exit", "id": client.attach_id, "code": record.exit_status,
                                             "reason": reason}))
            if client.follow_id is not None:
                client.send(protocol.encode({"type": "done", "id": client.follow_id}))
        for route_id, route in list(self.routes.items()):
            route.client.send(protocol.error(route.client_id, f"the VM stopped: {reason}"))
            del self.routes[route_id]
        for client, frame in self.pending:
            client.send(protocol.error(frame.id, f"the VM stopped: {reason}"))
        self.pending.clear()

    def cleanup_runtime_files(self) -> None:
        """A stopped VM keeps its record, mode and console log; the rest goes."""
        for path in (self.paths.ctl_socket, self.paths.agent_socket, self.paths.qmp_socket, self.paths.overlay,
                     self.paths.data_disk, self.paths.channel_dir / "agent.sock"):
            path.unlink(missing_ok=True)

    # -- `up` hand-off ---------------------------------------------------------------------------

    def on_commit_pipe(self) -> None:
        data = os.read(self.spec.commit_fd, 16)
        if data:
            self.committed = True
        if not data or self.committed:
            asyncio.get_running_loop().remove_reader(self.spec.commit_fd)
        if not data and not self.committed:
            # `up` died (or gave up) before it could report the VM: leave nothing behind.
            self.request_stop("the mvmctl that started it exited before the VM was ready", remove=True)

    def release_commit(self) -> None:
        try:
            os.close(self.spec.commit_fd)
        except OSError:
            pass

    # -- stopping --------------------------------------------------------------------------------

    def request_stop(self, reason: str, *, force: bool = False, timeout: float = STOP_TIMEOUT_S,
                     remove: bool = False) -> None:
        if self.stopping is None:
            self.stopping = reason
        self.remove_on_exit |= remove
        asyncio.get_running_loop().create_task(self.stop(force, timeout))

    async def stop(self, force: bool, timeout: float) -> None:
        if self.stopped.is_set():
            return
        if not force and self.agent_writer is not None and self.agent_hello is not None:
            self.agent_send(protocol.encode({"type": "shutdown", "id": SHUTDOWN_ID}))
            refused = asyncio.create_task(self.shutdown_refused.wait())
            stopped = asyncio.create_task(self.stopped.wait())
            await asyncio.wait({refused, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            refused.cancel()
            stopped.cancel()
            if self.stopped.is_set():
                return
        await self.terminate(signal.SIGKILL if force else signal.SIGTERM)
        if not await self.wait_stopped(KILL_GRACE_S):
            await self.terminate(signal.SIGKILL)

    async def terminate(self, sig: int) -> None:
        if self.record.backend == "docker" and self.record.backend_id:
            # Signalling the docker CLI would leave the container running: kill the container.
            from mvm.runtime import docker

            await asyncio.to_thread(docker.kill, self.record.backend_id)
        self.proc.send_signal(sig)

    async def wait_stopped(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.stopped.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def watch_boot(self) -> None:
        limit = self.spec.expected_boot_ms * BOOT_TIMEOUT_FACTOR / 1000
        await asyncio.sleep(limit)
        if self.stopped.is_set() or self.agent_hello is not None:
            return
        if self.console.seen("init") is None:
            self.request_stop(f"no sign of /init after {limit:.0f} s (see {self.paths.console_log})", force=True)
        elif self.console.exit_status() is None:
            self.request_stop(f"its agent did not answer within {limit:.0f} s of boot", force=True)

    # -- console ---------------------------------------------------------------------------------

    async def pump_console(self) -> None:
        reader = await _reader_for(self.spec.qemu_stdout)
        while data := await reader.read(65536):
            self.console.feed(data)
            self.on_markers()

    async def pump_stderr(self) -> None:
        reader = await _reader_for(self.spec.qemu_stderr)
        while data := await reader.read(65536):
            self.stderr_tail = (self.stderr_tail + data)[-4096:]

    def on_user_output(self, data: bytes) -> None:
        self.log.write(data)
        self.log.flush()
        self.console_replay += data
        if len(self.console_replay) > REPLAY_LIMIT:
            del self.console_replay[: len(self.console_replay) - REPLAY_LIMIT]
        for client in self.clients:
            if client.attached and client.attach_id is not None:
                client.send(protocol.encode({"type": "stdout", "id": client.attach_id}, data))
            if client.follow_id is not None:
                client.send(protocol.encode({"type": "data", "id": client.follow_id}, data))
        self.flush_console_input()

    def on_markers(self) -> None:
        seen = self.markers_seen  # not len(record.markers): that also holds agent-ready
        if len(self.console.markers) == seen:
            return
        self.markers_seen = len(self.console.markers)
        for marker in self.console.markers[seen:]:
            if marker.phase in ("service-start", "service-exit") and marker.args:
                service = self.record.services.setdefault(marker.args[0], {"state": "starting", "restarts": -1,
                                                                           "last_exit": None})
                if marker.phase == "service-start":
                    service["state"], service["restarts"] = "running", service["restarts"] + 1
                else:
                    service["state"] = "exited"
                    service["last_exit"] = int(marker.args[1]) if len(marker.args) > 1 else None
        self.record_markers()
        self.record.save(self.paths)

    def record_markers(self) -> None:
        self.record.markers = [_marker_json(m, self.spawned) for m in self.console.markers]
        if self.agent_ready_marker is not None:
            self.record.markers.append(_marker_json(self.agent_ready_marker, self.spawned))
            self.record.markers.sort(key=lambda m: m["ms"])

    def flush_console_input(self) -> None:
        if self.console_input and self.console.output_after_entrypoint:
            try:
                os.write(self.proc.stdin, bytes(self.console_input))
            except OSError:
                pass
            self.console_input.clear()

    # -- the agent channel -----------------------------------------------------------------------

    async def connect_agent(self) -> None:
        if self.spec.agent_listen_fd is not None:  # docker: the agent dials us
            listener = socket.socket(fileno=self.spec.agent_listen_fd)
            server = await asyncio.start_unix_server(self.serve_agent, sock=listener)
            async with server:
                await server.serve_forever()
        path = str(self.paths.agent_socket)
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                if self.record.backend == "firecracker":
                    from mvm.runtime import firecracker

                    await firecracker.vsock_handshake(reader, writer)
                break
            except (OSError, VmError):  # not there yet, or (vsock) the agent is not listening yet
                await asyncio.sleep(0.01 if self.record.backend != "firecracker" else 0.1)
        await self.serve_agent(reader, writer)

    async def serve_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One agent connection; a reconnecting agent (after a restart) takes over the channel."""
        writer.write(protocol.hello("host"))  # queued until the agent opens its port
        self.agent_writer = writer
        decoder = protocol.Decoder()
        while data := await reader.read(1 << 20):
            frames, _ = decoder.feed_all(data)
            for frame in frames:
                self.on_agent_frame(frame)
        if self.agent_writer is writer:
            self.agent_writer = None

    def on_agent_frame(self, frame: protocol.Frame) -> None:
        if frame.type == "hello":
            version = frame.header.get("version")
            if version != protocol.PROTOCOL_VERSION:
                self.request_stop(f"its agent speaks protocol v{version}, this mvm v{protocol.PROTOCOL_VERSION} "
                                  "(rebuild the image with this mvm: `mvmctl build --no-cache`)", force=True)
                return
            first = self.agent_hello is None
            self.agent_hello = frame.header
            if first:
                self.on_agent_ready(frame.header)
            return
        if frame.id == SHUTDOWN_ID and frame.type == "error":
            self.shutdown_refused.set()
            return
        route = self.routes.get(frame.id) if frame.id is not None else None
        if route is None:
            return  # a reply for a client that has gone, or our own shutdown request
        header = {**frame.header, "id": route.client_id}
        route.client.send(protocol.encode(header, frame.body))
        if frame.type in TERMINAL:
            del self.routes[frame.id]
            key = (id(route.client), route.client_id)
            self.by_client.pop(key, None)
            if route.op == "write" and frame.type == "error":
                self.failed_writes.add(key)

    def on_agent_ready(self, hello: dict[str, Any]) -> None:
        now = time.monotonic()
        self.agent_ready_marker = BootMarker("agent-ready", [f"uid={hello.get('uid')}", f"protocol={hello.get('version')}"],
                                             hello.get("uptime"), now)
        self.record.state, self.record.ready_at = "running", time.time()
        self.record_markers()
        self.record.save(self.paths)
        for client, request_id, kind in list(self.waiters):
            if kind == "ready":
                client.send(protocol.encode({"type": "result", "id": request_id, "state": "running"}))
                self.waiters.remove((client, request_id, kind))
        pending, self.pending = self.pending, []
        for client, frame in pending:
            self.forward(client, frame)

    def agent_send(self, data: bytes) -> None:
        if self.agent_writer is not None and not self.agent_writer.is_closing():
            self.agent_writer.write(data)

    def forward(self, client: Client | TunnelEnd, frame: protocol.Frame) -> None:
        if self.agent_hello is None:
            self.pending.append((client, frame))
            return
        key = (id(client), frame.id if frame.id is not None else -1)
        if key in self.failed_writes:
            if not frame.header.get("more"):
                self.failed_writes.discard(key)
            return
        channel_id = self.by_client.get(key)
        if channel_id is None:
            if frame.type in ("stdin", "signal", "resize", "send"):
                return  # for a process or connection that has already ended
            channel_id, self.next_id = self.next_id, self.next_id + 1
            self.by_client[key] = channel_id
            self.routes[channel_id] = Route(client, frame.id if frame.id is not None else -1, frame.type)
        self.agent_send(protocol.encode({**frame.header, "id": channel_id}, frame.body))

    # -- clients ---------------------------------------------------------------------------------

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        self.clients.add(client)
        decoder = protocol.Decoder()
        try:
            while data := await reader.read(1 << 20):
                frames, errors = decoder.feed_all(data)
                for err in errors:
                    client.send(protocol.error(None, str(err)))
                for frame in frames:
                    self.on_client_frame(client, frame)
        except ConnectionError:
            pass
        finally:
            self.clients.discard(client)
            self.on_client_gone(client)
            writer.close()

    def on_client_frame(self, client: Client, frame: protocol.Frame) -> None:
        kind = frame.type
        if kind in AGENT_OPS:
            if self.stopped.is_set():
                client.send(protocol.error(frame.id, f"the VM is stopped: {self.record.stop_reason}"))
            elif self.record.state == "paused":
                client.send(protocol.error(frame.id, f"VM {self.record.name} is paused (`mvmctl resume {self.record.name}`)"))
            elif kind == "stdin" and client.attached and frame.id == client.attach_id:
                self.console_input += frame.body
                self.flush_console_input()
            else:
                self.forward(client, frame)
        elif kind in ("ready", "wait"):
            if self.stopped.is_set():
                client.send(protocol.encode({"type": "result", "id": frame.id, "state": "stopped",
                                             "reason": self.record.stop_reason, "exit_status": self.record.exit_status}))
            elif kind == "ready" and self.agent_hello is not None:
                client.send(protocol.encode({"type": "result", "id": frame.id, "state": "running"}))
            else:
                self.waiters.append((client, frame.id or 0, kind))
        elif kind == "status":
            client.send(protocol.encode({"type": "result", "id": frame.id, "record": self.status()}))
        elif kind == "logs":
            client.send(protocol.encode({"type": "data", "id": frame.id}, self.paths.console_log.read_bytes()))
            if frame.header.get("follow") and not self.stopped.is_set():
                client.follow_id = frame.id
            else:
                client.send(protocol.encode({"type": "done", "id": frame.id}))
        elif kind == "attach":
            client.attached, client.attach_id = True, frame.id
            if frame.header.get("replay"):
                client.send(protocol.encode({"type": "stdout", "id": frame.id}, bytes(self.console_replay)))
            if self.stopped.is_set():
                client.send(protocol.encode({"type": "exit", "id": frame.id, "code": self.record.exit_status,
                                             "reason": self.record.stop_reason}))
        elif kind == "detach":
            self.set_mode("detached")
            for other in self.clients:
                if other.attached and other.attach_id is not None:
                    other.send(protocol.encode({"type": "detached", "id": other.attach_id}))
                    other.attached = False
            client.send(protocol.encode({"type": "result", "id": frame.id, "mode": "detached"}))
        elif kind == "forward":
            asyncio.get_running_loop().create_task(self.add_forward(client, frame.id, frame.header))
        elif kind == "snapshot":
            asyncio.get_running_loop().create_task(self.snapshot(client, frame.id))
        elif kind in ("pause", "resume"):
            asyncio.get_running_loop().create_task(self.set_paused(client, frame.id, kind == "pause"))
        elif kind == "stop":
            self.waiters.append((client, frame.id or 0, "wait"))
            self.request_stop(str(frame.header.get("reason") or "stopped on request"),
                              force=bool(frame.header.get("force")),
                              timeout=float(frame.header.get("timeout") or STOP_TIMEOUT_S))
        else:
            client.send(protocol.error(frame.id, f"unknown request type {kind!r}"))

    async def set_paused(self, client: Client, request_id: int | None, paused: bool) -> None:
        """Freeze or thaw the guest through its backend; the agent is frozen with it."""
        try:
            if self.record.backend == "qemu":
                from qemu.qmp import QMPClient

                qmp = QMPClient(self.record.name)
                await qmp.connect(str(self.paths.qmp_socket))
                try:
                    await qmp.execute("stop" if paused else "cont")
                finally:
                    await qmp.disconnect()
            elif self.record.backend == "docker" and self.record.backend_id:
                from mvm.runtime import docker

                await asyncio.to_thread(docker.pause, self.record.backend_id, paused)
            elif self.record.backend == "firecracker":
                from mvm.runtime import firecracker

                api = firecracker.FirecrackerApi(str(firecracker.api_socket_path(self.paths)))
                await asyncio.to_thread(api.pause if paused else api.resume)
            else:
                raise VmError(f"{self.record.backend} cannot pause")
        except Exception as err:  # noqa: BLE001 - the client gets the reason, the VM lives on
            client.send(protocol.error(request_id, f"{'pause' if paused else 'resume'} failed: {err}"))
            return
        self.record.state = "paused" if paused else ("running" if self.agent_hello else "starting")
        self.record.save(self.paths)
        client.send(protocol.encode({"type": "result", "id": request_id, "state": self.record.state}))

    async def snapshot(self, client: Client, request_id: int | None) -> None:
        """Firecracker only: pause, write guest memory and device state (0600: it holds guest
        memory), resume. The agent reseeds a clone's RNG and clock when it is restored."""
        try:
            if self.record.backend != "firecracker":
                raise VmError(f"{self.record.backend} cannot snapshot in this mvm version")
            from mvm.runtime import firecracker

            api = firecracker.FirecrackerApi(str(firecracker.api_socket_path(self.paths)))
            target = self.paths.dir / "snapshot"
            target.mkdir(mode=0o700, exist_ok=True)
            state, memory = target / "vmstate", target / "memory"
            await asyncio.to_thread(api.pause)
            try:
                await asyncio.to_thread(api.snapshot_create, str(state), str(memory))
            finally:
                await asyncio.to_thread(api.resume)
            for path in (state, memory):
                path.chmod(0o600)
        except Exception as err:  # noqa: BLE001 - the client gets the reason, the VM lives on
            client.send(protocol.error(request_id, f"snapshot failed: {err}"))
            return
        client.send(protocol.encode({"type": "result", "id": request_id, "state": str(state), "memory": str(memory)}))

    async def add_forward(self, client: Client, request_id: int | None, header: dict[str, Any]) -> None:
        """Listen on the host (127.0.0.1 unless told otherwise); each connection is tunnelled
        through the agent to the guest's loopback, so no guest NIC is needed."""
        host, host_port, guest_port = header.get("host_addr") or "127.0.0.1", header.get("host_port"), header.get("guest_port")
        try:
            server = await asyncio.start_server(lambda r, w: self.serve_forward(int(guest_port), r, w),
                                                host, int(host_port))  # type: ignore[arg-type]
        except (OSError, TypeError, ValueError) as err:
            client.send(protocol.error(request_id, f"cannot forward {host}:{host_port}: {err}"))
            return
        self.forward_servers.append(server)
        self.record.forwards.append({"host_addr": host, "host_port": int(host_port),  # type: ignore[arg-type]
                                     "guest_port": int(guest_port)})  # type: ignore[arg-type]
        self.record.save(self.paths)
        client.send(protocol.encode({"type": "result", "id": request_id, "forwards": self.record.forwards}))

    async def serve_forward(self, guest_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        end = TunnelEnd(writer)
        self.forward(end, protocol.Frame({"type": "connect", "id": 1, "host": "127.0.0.1", "port": guest_port}))
        try:
            while data := await reader.read(protocol.CHUNK):
                self.forward(end, protocol.Frame({"type": "send", "id": 1}, data))
            self.forward(end, protocol.Frame({"type": "send", "id": 1, "eof": True}))
        except ConnectionError:
            self.forward(end, protocol.Frame({"type": "send", "id": 1, "eof": True}))

    def on_client_gone(self, client: Client) -> None:
        for channel_id, route in list(self.routes.items()):
            if route.client is client:
                if route.op in ("exec", "console"):
                    self.agent_send(protocol.encode({"type": "signal", "id": channel_id, "signal": signal.SIGKILL}))
                del self.routes[channel_id]
                self.by_client.pop((id(client), route.client_id), None)
        self.pending = [(c, f) for c, f in self.pending if c is not client]
        self.waiters = [w for w in self.waiters if w[0] is not client]
        if client.attached and self.record.mode == "attached" and not self.stopped.is_set():
            # The attached caller is gone (Ctrl-C, closed terminal, killed): the VM goes too.
            self.request_stop("its attached mvmctl went away")

    def set_mode(self, mode: str) -> None:
        self.record.mode = mode
        write_json_atomic(self.paths.mode, {"mode": mode})
        self.record.save(self.paths)

    def status(self) -> dict[str, Any]:
        live = asdict(self.record)
        live["agent"] = self.agent_hello
        return live


async def _reader_for(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader


def _marker_json(marker: BootMarker, spawned: float) -> dict[str, Any]:
    return {"phase": marker.phase, "args": marker.args, "guest_uptime": marker.guest_uptime,
            "ms": round((marker.host_time - spawned) * 1000)}


def run_supervisor(spec: LaunchSpec) -> None:
    """Serve until the VM has stopped; an abandoned start also takes the VM's directory."""
    supervisors: list[Supervisor] = []

    async def body() -> None:
        supervisors.append(Supervisor(spec))
        await supervisors[0].main()

    asyncio.run(body())
    if supervisors and supervisors[0].remove_on_exit:
        shutil.rmtree(spec.vm_dir, ignore_errors=True)


if __name__ == "__main__":
    run_supervisor(LaunchSpec.from_json(sys.argv[1]))
