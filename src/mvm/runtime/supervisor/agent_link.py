"""The one channel to the guest's agent, shared by every client.

Client requests are forwarded with their ids rewritten to channel ids of ours, and replies
are routed back under the id the client used, so many clients (and many requests of one
client) share the agent. Requests that arrive before the agent's hello wait in ``pending``.
How the channel is reached is the backend's business (``serve_agent_channel``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mvm.core import protocol
from mvm.runtime.console import BootMarker
from mvm.runtime.supervisor.vm_process import SHUTDOWN_ID

if TYPE_CHECKING:
    from mvm.runtime.supervisor.supervisor import Supervisor

TERMINAL = frozenset({"exit", "done", "result", "error", "pong"})  # replies that end a request
NO_REPLY = frozenset({"stdin", "signal", "resize", "send"})  # only for a request that is still open


class Requester(Protocol):
    """Whoever a forwarded request's replies go back to: a client, or a tunnel's host end."""

    def send(self, data: bytes) -> None: ...


@dataclass
class Route:
    """One forwarded request: whose it is and the id the client knows it by."""

    owner: Requester
    client_id: int
    op: str


class AgentLink:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.writer: asyncio.StreamWriter | None = None
        self.hello: dict[str, Any] | None = None
        self.routes: dict[int, Route] = {}  # channel id -> route
        self.by_client: dict[tuple[int, int], int] = {}  # (id(owner), client id) -> channel id
        self.next_id = 1
        self.pending: list[tuple[Requester, protocol.Frame]] = []  # requests before the agent is ready
        self.failed_writes: set[tuple[int, int]] = set()  # drop the rest of a refused upload

    @property
    def ready(self) -> bool:
        return self.hello is not None

    @property
    def answering(self) -> bool:
        """Ready, and its channel is open: a request sent now reaches it."""
        return self.writer is not None and self.hello is not None

    async def serve(self) -> None:
        sup = self.sup
        await sup.backend.serve_agent_channel(sup.paths, sup.spec.agent_listen_fd, self.serve_connection)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One agent connection; a reconnecting agent (after a restart) takes over the channel."""
        writer.write(protocol.hello("host"))  # queued until the agent opens its port
        self.writer = writer
        decoder = protocol.Decoder()
        while data := await reader.read(1 << 20):
            frames, _ = decoder.feed_all(data)
            for frame in frames:
                self.on_frame(frame)
        if self.writer is writer:
            self.writer = None

    def on_frame(self, frame: protocol.Frame) -> None:
        sup = self.sup
        if frame.type == "hello":
            version = frame.header.get("version")
            if version != protocol.PROTOCOL_VERSION:
                sup.watch.request_stop(f"its agent speaks protocol v{version}, this mvm v{protocol.PROTOCOL_VERSION} "
                                       "(rebuild the image with this mvm: `mvmctl build --no-cache`)", force=True)
                return
            first = self.hello is None
            self.hello = frame.header
            if first:
                self.on_ready(frame.header)
            return
        if frame.id == SHUTDOWN_ID and frame.type == "error":
            sup.watch.shutdown_refused.set()
            return
        route = self.routes.get(frame.id) if frame.id is not None else None
        if route is None:
            return  # a reply for a client that has gone, or our own shutdown request
        header = {**frame.header, "id": route.client_id}
        route.owner.send(protocol.encode(header, frame.body))
        if frame.type in TERMINAL:
            del self.routes[frame.id]
            key = (id(route.owner), route.client_id)
            self.by_client.pop(key, None)
            if route.op == "write" and frame.type == "error":
                self.failed_writes.add(key)

    def on_ready(self, hello: dict[str, Any]) -> None:
        console = self.sup.console
        console.agent_ready_marker = BootMarker("agent-ready", [f"uid={hello.get('uid')}",
                                                                f"protocol={hello.get('version')}"],
                                                hello.get("uptime"), time.monotonic())
        self.sup.on_agent_ready()
        pending, self.pending = self.pending, []
        for owner, frame in pending:
            self.forward(owner, frame)

    def send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    def forward(self, owner: Requester, frame: protocol.Frame) -> None:
        if self.hello is None:
            self.pending.append((owner, frame))
            return
        key = (id(owner), frame.id if frame.id is not None else -1)
        if key in self.failed_writes:
            if not frame.header.get("more"):
                self.failed_writes.discard(key)
            return
        channel_id = self.by_client.get(key)
        if channel_id is None:
            if frame.type in NO_REPLY:
                return  # for a process or connection that has already ended
            channel_id, self.next_id = self.next_id, self.next_id + 1
            self.by_client[key] = channel_id
            self.routes[channel_id] = Route(owner, frame.id if frame.id is not None else -1, frame.type)
        self.send(protocol.encode({**frame.header, "id": channel_id}, frame.body))

    def fail_all(self, reason: str) -> None:
        """The VM stopped: every open request gets its error."""
        for route_id, route in list(self.routes.items()):
            route.owner.send(protocol.error(route.client_id, f"the VM stopped: {reason}"))
            del self.routes[route_id]
        for owner, frame in self.pending:
            owner.send(protocol.error(frame.id, f"the VM stopped: {reason}"))
        self.pending.clear()

    def drop(self, owner: Requester) -> None:
        """``owner`` has gone: its processes are killed, its replies have nowhere to go."""
        for channel_id, route in list(self.routes.items()):
            if route.owner is owner:
                if route.op in ("exec", "console"):
                    self.send(protocol.encode({"type": "signal", "id": channel_id, "signal": signal.SIGKILL}))
                del self.routes[channel_id]
                self.by_client.pop((id(owner), route.client_id), None)
        self.pending = [(o, f) for o, f in self.pending if o is not owner]
