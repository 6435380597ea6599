"""The clients of ``ctl.sock`` (mvmctl, the SDK, MCP) and what each request they send means.

Agent requests (exec, files, telemetry, console, ...) go to the agent link; the supervisor
answers its own: ``ready``, ``wait``, ``status``, ``logs``, ``attach``, ``detach``,
``forward``, ``pause``/``resume``, ``snapshot`` and ``stop``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mvm.core import protocol
from mvm.runtime.supervisor.vm_process import STOP_TIMEOUT_S

if TYPE_CHECKING:
    from mvm.runtime.supervisor.supervisor import Supervisor

AGENT_OPS = frozenset({"exec", "console", "stdin", "signal", "resize", "read", "write", "list", "stat",
                       "remove", "mkdir", "rename", "telemetry", "ping"})


class Client:
    """One connection to ctl.sock (compared by identity: clients are kept in sets)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.attached = False  # receives the console and the final exit
        self.attach_id: int | None = None
        self.follow_id: int | None = None  # a `logs --follow` request

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


class ClientServer:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.clients: set[Client] = set()
        self.waiters: list[tuple[Client, int, str]] = []  # (client, id, "ready"|"wait")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        self.clients.add(client)
        decoder = protocol.Decoder()
        try:
            while data := await reader.read(1 << 20):
                frames, errors = decoder.feed_all(data)
                for err in errors:
                    client.send(protocol.error(None, str(err)))
                for frame in frames:
                    self.on_frame(client, frame)
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
            elif kind == "ready" and sup.agent.ready:
                client.send(protocol.encode({"type": "result", "id": frame.id, "state": "running"}))
            else:
                self.waiters.append((client, frame.id or 0, kind))
        elif kind == "status":
            client.send(protocol.encode({"type": "result", "id": frame.id, "record": sup.status()}))
        elif kind == "logs":
            client.send(protocol.encode({"type": "data", "id": frame.id}, sup.paths.console_log.read_bytes()))
            if frame.header.get("follow") and not sup.stopped.is_set():
                client.follow_id = frame.id
            else:
                client.send(protocol.encode({"type": "done", "id": frame.id}))
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
        elif kind == "forward":
            asyncio.get_running_loop().create_task(sup.forwards.add(client, frame.id, frame.header))
        elif kind == "snapshot":
            asyncio.get_running_loop().create_task(sup.snapshot(client, frame.id))
        elif kind in ("pause", "resume"):
            asyncio.get_running_loop().create_task(sup.set_paused(client, frame.id, kind == "pause"))
        elif kind == "stop":
            self.waiters.append((client, frame.id or 0, "wait"))
            sup.watch.request_stop(str(frame.header.get("reason") or "stopped on request"),
                                   force=bool(frame.header.get("force")),
                                   timeout=float(frame.header.get("timeout") or STOP_TIMEOUT_S))
        else:
            client.send(protocol.error(frame.id, f"unknown request type {kind!r}"))

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
