"""The clients of ``ctl.sock`` (mvmctl, the SDK, MCP) and what each request they send means.

Agent requests (exec, files, telemetry, console, ...) go to the agent link; the supervisor
answers its own: ``ready``, ``wait``, ``status``, ``logs``, ``attach``, ``detach``,
``forward``, ``unforward``, ``egress_update``, ``pause``/``resume``, ``snapshot`` and ``stop``.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mvm.core import protocol
from mvm.runtime.supervisor.audit_trail import peer_credentials
from mvm.runtime.supervisor.vm_process import MAX_STOP_TIMEOUT_S, STOP_TIMEOUT_S

if TYPE_CHECKING:
    from mvm.runtime.supervisor.supervisor import Supervisor

SUSPEND_TAG = re.compile(r"suspend-[a-z0-9_.-]{1,56}")  # cloning.suspend_vm's tags
AGENT_OPS = frozenset({"exec", "console", "stdin", "signal", "resize", "read", "write", "list", "stat",
                       "remove", "mkdir", "rename", "telemetry", "ping", "cancel"})
WRITE_BUFFER_HIGH = 4 << 20  # queued bytes toward one reader before whoever feeds it waits
SLOW_READER_S = 60.0  # a reader that takes in nothing for this long is cut off, so it stalls nobody for ever
class Reader:
    """Someone the supervisor writes to (a ctl.sock client, or a forwarded TCP connection),
    with the agent requests it has open. Per connection, never keyed by ``id()``, which
    CPython reuses once an object is gone."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.open_requests: dict[int, int] = {}  # its request id -> agent channel id
        self.failed_writes: set[int] = set()  # uploads the agent refused: drop their other chunks
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    @property
    def slow(self) -> bool:
        return self.writer.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH

    async def catch_up(self) -> None:
        """Wait until it has read what is queued for it; cut it off if it stops reading."""
        try:
            await asyncio.wait_for(self.writer.drain(), SLOW_READER_S)
        except (TimeoutError, ConnectionError):
            print(f"mvm-supervisor: cut off a reader that took nothing in for {SLOW_READER_S:.0f} s",
                  file=sys.stderr, flush=True)
            self.writer.transport.abort()


class Client(Reader):
    """One connection to ctl.sock (compared by identity: clients are kept in sets)."""

    def __init__(self, writer: asyncio.StreamWriter, peer: tuple[int | None, int | None] = (None, None)) -> None:
        super().__init__(writer)
        self.peer = peer  # (pid, uid) by SO_PEERCRED: the actor of its audit records
        self.surface = "unknown"  # what it said it is (cli, sdk, mcp), for the records of its pause/resume
        self.attached = False  # receives the console and the final exit
        self.attach_id: int | None = None
        self.follow_id: int | None = None  # a `logs --follow` request
        self.follow_backlog: bytearray | None = None  # its live output while the log files are sent

    def follow(self, data: bytes) -> None:
        """Console output for a `logs --follow` request."""
        if self.follow_backlog is None:
            self.send(protocol.encode({"type": "data", "id": self.follow_id}, data))
        else:
            self.follow_backlog += data


class ClientServer:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.clients: set[Client] = set()
        self.waiters: list[tuple[Client, int, str]] = []  # (client, id, "ready"|"wait")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid = peer_credentials(writer)
        if uid not in (0, os.getuid()):
            # ctl.sock is 0600 in a 0700 directory; this is the check that does not depend on that.
            print(f"mvm-supervisor: refused a client of uid {uid} on ctl.sock", file=sys.stderr, flush=True)
            writer.write(protocol.error(None, f"uid {uid} may not drive this VM (only its owner and root)"))
            writer.close()
            return
        client = Client(writer, (pid, uid))
        self.clients.add(client)
        decoder = protocol.Decoder()
        try:
            while data := await reader.read(1 << 20):
                frames, errors = decoder.feed_all(data)
                for err in errors:
                    client.send(protocol.error(None, str(err)))
                for frame in frames:
                    try:
                        self.on_frame(client, frame)
                    except (ValueError, TypeError, OverflowError, protocol.ProtocolError) as err:
                        client.send(protocol.error(frame.id, f"bad {frame.type!r} request: {err}"))
                await self.sup.agent.drain()  # an agent that is not keeping up slows its clients down
        except ConnectionError:
            pass
        finally:
            self.clients.discard(client)
            self.on_gone(client)
            writer.close()

    def on_frame(self, client: Client, frame: protocol.Frame) -> None:
        sup, record, kind = self.sup, self.sup.record, frame.type
        if kind in AGENT_OPS:
            if sup.stopped.is_set():
                client.send(protocol.error(frame.id, f"the VM is stopped: {record.stop_reason}"))
            elif record.state == "paused":
                client.send(protocol.error(frame.id, f"VM {record.name} is paused (`mvmctl resume {record.name}`)"))
            elif kind == "stdin" and client.attached and frame.id == client.attach_id:
                sup.console.type_in(frame.body)
            else:
                sup.agent.forward(client, frame)
        elif kind in ("ready", "wait"):
            if sup.stopped.is_set():
                client.send(protocol.encode({"type": "result", "id": frame.id, "state": "stopped",
                                             "reason": record.stop_reason, "exit_status": record.exit_status}))
            elif kind == "ready" and sup.agent.ready and sup.egress.settled:
                client.send(protocol.encode({"type": "result", "id": frame.id, "state": "running"}))
            else:
                self.waiters.append((client, frame.id or 0, kind))
        elif kind == "status":
            client.send(protocol.encode({"type": "result", "id": frame.id, "record": sup.status()}))
        elif kind == "logs":
            asyncio.get_running_loop().create_task(self.send_logs(client, frame.id, bool(frame.header.get("follow"))))
        elif kind == "attach":
            client.attached, client.attach_id = True, frame.id
            if frame.header.get("replay"):
                client.send(protocol.encode({"type": "stdout", "id": frame.id}, bytes(sup.console.replay)))
            if sup.stopped.is_set():
                client.send(protocol.encode({"type": "exit", "id": frame.id, "code": record.exit_status,
                                             "reason": record.stop_reason}))
        elif kind == "detach":
            sup.set_mode("detached")
            for other in self.clients:
                if other.attached and other.attach_id is not None:
                    other.send(protocol.encode({"type": "detached", "id": other.attach_id}))
                    other.attached = False
            client.send(protocol.encode({"type": "result", "id": frame.id, "mode": "detached"}))
        elif kind == "set_deadline":
            deadline = frame.header.get("deadline")
            if isinstance(deadline, bool) or not isinstance(deadline, (int, float, type(None))):
                raise ValueError("'deadline' must be a time in seconds since the epoch, or null")
            sup.set_deadline(None if deadline is None else float(deadline))
            client.send(protocol.encode({"type": "result", "id": frame.id, "deadline": sup.record.deadline}))
        elif kind == "forward":
            asyncio.get_running_loop().create_task(sup.forwards.add(client, frame.id, frame.header))
        elif kind == "unforward":
            sup.forwards.remove(client, frame.id, frame.header)
        elif kind == "egress_update":
            asyncio.get_running_loop().create_task(sup.egress.update(client, frame.id, frame.header))
        elif kind == "snapshot":
            dest = frame.header.get("dir")
            if not isinstance(dest, str) or not os.path.isabs(dest) or not os.path.isdir(dest):
                client.send(protocol.error(frame.id, "snapshot: 'dir' must be an existing absolute directory"))
            else:
                tag = frame.header.get("suspend_tag")  # (a name for the record to hold, or None)
                suspend_tag = tag if isinstance(tag, str) and SUSPEND_TAG.fullmatch(tag) else None
                asyncio.get_running_loop().create_task(sup.snapshot(client, frame.id, Path(dest),
                                                                    frame.header.get("stop") is True, suspend_tag))
        elif kind in ("pause", "resume"):
            client.surface = str(frame.header.get("surface"))[:8]
            asyncio.get_running_loop().create_task(sup.set_paused(client, frame.id, kind == "pause"))
        elif kind == "stop":
            self.waiters.append((client, frame.id or 0, "wait"))
            timeout = float(frame.header.get("timeout") or STOP_TIMEOUT_S)
            sup.watch.request_stop(str(frame.header.get("reason") or "stopped on request")[:500],
                                   force=bool(frame.header.get("force")),
                                   timeout=timeout if 0 <= timeout <= MAX_STOP_TIMEOUT_S else STOP_TIMEOUT_S)
        else:
            client.send(protocol.error(frame.id, f"unknown request type {kind!r}"))

    async def send_logs(self, client: Client, request_id: int | None, follow: bool) -> None:
        """The console log as it is on disk, in frames, then (``follow``) what arrives next.
        What arrives while the files are sent waits in the client's backlog, so nothing is
        lost or sent twice, and the order holds."""
        sup = self.sup
        sup.console.log.flush()
        files = []
        for path in (sup.paths.console_log_previous, sup.paths.console_log):
            try:
                f = path.open("rb")
            except FileNotFoundError:
                continue
            files.append((f, os.fstat(f.fileno()).st_size))
        following = follow and not sup.stopped.is_set()
        if following:  # (no await since the sizes were taken: nothing slipped in between)
            client.follow_id, client.follow_backlog = request_id, bytearray()
        try:
            for f, end in files:
                while f.tell() < end and (chunk := f.read(min(protocol.CHUNK, end - f.tell()))):
                    client.send(protocol.encode({"type": "data", "id": request_id}, chunk))
                    await client.catch_up()
        finally:
            for f, _ in files:
                f.close()
        backlog, client.follow_backlog = client.follow_backlog, None
        if backlog:
            client.send(protocol.encode({"type": "data", "id": request_id}, bytes(backlog)))
        if not following or sup.stopped.is_set():
            client.follow_id = None
            client.send(protocol.encode({"type": "done", "id": request_id}))

    async def wait_for_slow_readers(self) -> None:
        """Backpressure for the console: the guest waits while someone it writes to catches up."""
        for client in [c for c in self.clients if c.slow]:
            await client.catch_up()

    def answer_waiters(self, kind: str, reply: dict[str, object]) -> None:
        """Answer every client waiting for ``kind`` (ready, or any waiter when ``kind`` is "*")."""
        for client, request_id, wanted in list(self.waiters):
            if kind == "*" or wanted == kind:
                client.send(protocol.encode({**reply, "id": request_id}))
                self.waiters.remove((client, request_id, wanted))

    def on_gone(self, client: Client) -> None:
        sup = self.sup
        sup.agent.drop(client)
        self.waiters = [w for w in self.waiters if w[0] is not client]
        if client.attached and sup.record.mode == "attached" and not sup.stopped.is_set():
            # The attached caller is gone (Ctrl-C, closed terminal, killed): the VM goes too.
            sup.watch.request_stop("its attached mvmctl went away")

    async def close_all(self, timeout: float = 1.0) -> None:
        """Close every client once what was written to it (the exit frames) has gone out."""
        writers = [client.writer for client in self.clients]
        for writer in writers:
            writer.close()  # the transport flushes its buffer first
        if writers:
            await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for w in writers], timeout=timeout)
