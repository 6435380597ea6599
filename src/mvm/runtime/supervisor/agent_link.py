"""The one channel to the guest's agent, shared by every client.

Client requests are forwarded with their ids rewritten to channel ids of ours, and replies
are routed back under the id the client used, so many clients (and many requests of one
client) share the agent. Requests that arrive before the agent's hello wait in ``pending``.
How the channel is reached is the backend's business (``serve_agent_channel``); that there
is exactly one agent connection per boot is this module's: a second is refused and logged.
Reading from the agent waits while a reader of its replies falls behind (backpressure
instead of an ever-growing buffer).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mvm.core import protocol
from mvm.core.errors import VmError
from mvm.runtime.boot_markers import BootMarker, reported_uptime
from mvm.runtime.log_budget import LogBudget
from mvm.runtime.supervisor.audit_trail import Track
from mvm.runtime.supervisor.clients import Reader
from mvm.runtime.supervisor.vm_process import SHUTDOWN_ID

if TYPE_CHECKING:
    from mvm.runtime.supervisor.supervisor import Supervisor

TERMINAL = frozenset({"exit", "done", "result", "error", "pong"})  # replies that end a request
NO_REPLY = frozenset({"stdin", "signal", "resize", "send", "cancel"})  # only for a request still open
AGENT_BUFFER_HIGH = 4 << 20  # queued bytes toward the agent before clients wait for it
OWN_REQUEST_TIMEOUT_S = 15.0  # identity: /init starts a Python to apply it (under TCG, ~0.2 s)


@dataclass
class Route:
    """One forwarded request: whose it is and the id the client knows it by."""

    owner: Reader
    client_id: int
    op: str
    track: Track | None = None  # its audit record while it runs (audit_trail.py)


class AgentLink:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.writer: asyncio.StreamWriter | None = None
        self.hello: dict[str, Any] | None = None
        self.routes: dict[int, Route] = {}  # channel id -> route
        self.next_id = protocol.IDENTITY_ID + 1  # (a clone's launcher may have sent that one)
        self.pending: list[tuple[Reader, protocol.Frame]] = []  # requests before the agent is ready
        self.connections = 0  # agent connections offered this boot: only the first is served
        self.refusals_logged = LogBudget("agent connections refused")  # (an agent restarted under
        # Docker dials again every 50 ms, and gets this refusal every time)
        self.own: dict[int, asyncio.Future[protocol.Frame]] = {}  # the supervisor's own requests
        self.streams: dict[int, Callable[[protocol.Frame], None]] = {}  # its own long-lived ones (egress)
        # A clone is ready once it has both said hello and taken its identity (either order).
        self.clone_hello: dict[str, Any] | None = None
        self.identity_given = False

    @property
    def ready(self) -> bool:
        return self.hello is not None

    @property
    def answering(self) -> bool:
        """Ready, and its channel is open: a request sent now reaches it."""
        return self.writer is not None and self.hello is not None

    async def serve(self) -> None:
        sup = self.sup
        if sup.spec.agent_fd is not None:  # a clone's, connected by the launcher (backends/qemu_restore.py)
            import socket

            await self.serve_connection(*await asyncio.open_unix_connection(sock=socket.socket(fileno=sup.spec.agent_fd)))
            return
        await sup.backend.serve_agent_channel(sup.paths, sup.record, sup.spec.agent_listen_fd,
                                              self.serve_connection)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The agent's connection: the first of this boot. Any later one is refused, so nothing
        in the guest can take the agent's place by connecting after it."""
        self.connections += 1
        if self.connections > 1:
            if self.refusals_logged.allow():
                print(f"mvm-supervisor: refused agent connection #{self.connections}: one per boot",
                      file=sys.stderr, flush=True)
            writer.close()
            return
        prequeued = self.sup.spec.agent_fd is not None  # (the launcher wrote our hello and the identity)
        if not prequeued:
            writer.write(protocol.HOST_HELLO)  # queued until the agent opens its port
        self.writer = writer
        if self.sup.record.restore_from is not None:  # a clone: its identity goes right behind our
            asyncio.get_running_loop().create_task(self.give_identity(prequeued))  # hello (a round trip less)
        decoder = protocol.Decoder()
        try:
            while data := await reader.read(1 << 20):
                frames, _ = decoder.feed_all(data)
                behind = [owner for owner in map(self.on_frame, frames) if owner is not None and owner.slow]
                for owner in set(behind):
                    await owner.catch_up()
        except ConnectionError:
            pass  # the VM went away mid-read: the same as its end
        self.writer = None
        if not self.sup.stopped.is_set():  # (a stop answers them itself, with its reason)
            self.fail_all("the guest's agent closed its channel", prefix="")

    async def drain(self) -> None:
        """Wait while too much is queued toward the agent (it is not keeping up)."""
        if self.writer is not None and self.writer.transport.get_write_buffer_size() > AGENT_BUFFER_HIGH:
            try:
                await self.writer.drain()
            except ConnectionError:
                pass

    def on_frame(self, frame: protocol.Frame) -> Reader | None:
        """Act on one frame from the agent; returns whom it was passed to."""
        sup = self.sup
        if frame.type == "hello":
            version = frame.header.get("version")
            if version != protocol.PROTOCOL_VERSION:
                sup.watch.request_stop(f"its agent speaks protocol v{str(version)[:16]}, this mvm "
                                       f"v{protocol.PROTOCOL_VERSION} (rebuild the image with this mvm: "
                                       "`mvmctl build --no-cache`)", force=True)
                return None
            if self.hello is None and self.sup.record.restore_from is not None:
                self.clone_hello = frame.header
                if self.identity_given:
                    self.become_ready(frame.header)
            elif self.hello is None:
                self.hello = frame.header
                self.on_ready(frame.header)
            elif frame.header.get("pid") != self.hello.get("pid"):
                # /init restarted the agent (it died, or was killed): it speaks first on the
                # channel we already hold, and what the old one had open is gone. What we sent
                # it since the old one died is failed here, and the new agent ignores it: it
                # runs nothing before the hello we send it now.
                self.hello = frame.header
                self.fail_all("the guest's agent restarted: what it was running is gone", prefix="")
                self.send(protocol.HOST_HELLO)
                self.sup.egress.start()
            return None  # (else the agent's answer to our hello, after its own)
        if frame.id == SHUTDOWN_ID and frame.type == "error":
            sup.watch.shutdown_refused.set()
            return None
        if frame.id in self.streams:
            self.streams[frame.id](frame)
            return None
        if frame.id in self.own and frame.type in TERMINAL:
            future = self.own.pop(frame.id)
            if not future.done():
                future.set_result(frame)
            return None
        route = self.routes.get(frame.id) if frame.id is not None else None
        if route is None:
            return None  # a reply for a client that has gone, or our own shutdown request
        header = {**frame.header, "id": route.client_id}
        if route.track is not None and frame.type in TERMINAL:
            sup.audit.finish(route.owner, route.track, header, frame.body)  # sent once it is in the log
        else:
            if route.track is not None:
                route.track.count(frame.type, frame.body)
            try:
                route.owner.send(protocol.encode(header, frame.body))
            except protocol.ProtocolError:  # a header the agent filled beyond the limit: not passed on
                route.owner.send(protocol.error(route.client_id, "the agent sent a reply too large to pass on"))
        if frame.type in TERMINAL:
            del self.routes[frame.id]
            route.owner.open_requests.pop(route.client_id, None)
            if route.op == "write" and frame.type == "error":
                route.owner.failed_writes.add(route.client_id)
        return route.owner

    async def ask(self, header: dict[str, Any], timeout: float = OWN_REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """A request of the supervisor's own (freeze, thaw, identity); its result's header, or
        VmError with the agent's error message."""
        channel_id, self.next_id = self.next_id, self.next_id + 1
        return await self.answer(channel_id, header["type"], protocol.encode({**header, "id": channel_id}), timeout)

    async def answer(self, channel_id: int, what: str, request: bytes | None,
                     timeout: float = OWN_REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """The result of our own request ``channel_id``, sent now (``request``) or already."""
        future: asyncio.Future[protocol.Frame] = asyncio.get_running_loop().create_future()
        self.own[channel_id] = future
        if request is not None:
            self.send(request)
        try:
            frame = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise VmError(f"the agent did not answer {what!r} within {timeout:.0f} s") from None
        finally:
            self.own.pop(channel_id, None)
        if frame.type == "error":
            raise VmError(f"the agent refused {what!r}: {str(frame.header.get('message'))[:300]}")
        return frame.header

    async def give_identity(self, prequeued: bool = False) -> None:
        """A clone's agent wakes up frozen: give it fresh entropy, the time and its own names
        before any client's request reaches it (they wait in ``pending`` meanwhile), unless
        the launcher has already (``prequeued``): then only its answer is awaited."""
        request = None if prequeued else protocol.identity(self.sup.record.name, resumed=self.sup.resumed_from_disk)
        try:
            await self.answer(protocol.IDENTITY_ID, "identity", request)
        except VmError as err:
            self.sup.watch.request_stop(f"the clone could not be given its own identity: {err}", force=True)
            return
        self.sup.console.host_markers.append(BootMarker("identity", [], None, time.monotonic()))
        self.identity_given = True
        if self.clone_hello is not None and self.hello is None:
            self.become_ready(self.clone_hello)

    def become_ready(self, hello: dict[str, Any]) -> None:
        self.hello = hello
        self.on_ready(hello)

    def on_ready(self, hello: dict[str, Any]) -> None:
        console = self.sup.console
        now = time.monotonic()
        console.agent_ready_marker = BootMarker("agent-ready", [f"uid={hello.get('uid')}",
                                                                f"protocol={hello.get('version')}"],
                                                reported_uptime(hello.get("uptime")), now)
        # When the agent says it had imported its modules: its word only, placed by the guest's
        # clock (console.record_markers keeps it only between agent-started and agent-ready).
        imported = reported_uptime(hello.get("imported"))
        console.agent_imported_marker = None if imported is None else BootMarker("agent-imported", [], imported, now)
        self.sup.on_agent_ready()
        pending, self.pending = self.pending, []
        for owner, frame in pending:
            self.forward(owner, frame)

    def send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    def forward(self, owner: Reader, frame: protocol.Frame) -> None:
        if self.hello is None:
            self.pending.append((owner, frame))
            return
        client_id = frame.id if frame.id is not None else -1
        if client_id in owner.failed_writes:
            if not frame.header.get("more"):
                owner.failed_writes.discard(client_id)
            return
        if self.writer is None:  # (Docker: its agent's one connection has closed; none may replace it)
            if frame.type not in NO_REPLY and frame.id is not None:
                owner.send(protocol.error(frame.id, "the guest's agent closed its channel"))
                if frame.type == "write" and frame.header.get("more"):
                    owner.failed_writes.add(frame.id)  # (one error for the whole upload)
            return
        channel_id = owner.open_requests.get(client_id)
        if channel_id is None:
            if frame.type in NO_REPLY:
                return  # for a process or connection that has already ended
            channel_id, self.next_id = self.next_id, self.next_id + 1
            owner.open_requests[client_id] = channel_id
            self.routes[channel_id] = Route(owner, client_id, frame.type, self.sup.audit.begin(owner, frame))
        route = self.routes.get(channel_id)
        if route is not None and route.track is not None and frame.type in ("write", "stdin"):
            route.track.count(frame.type, frame.body)
        self.send(protocol.encode({**frame.header, "id": channel_id}, frame.body))

    def fail_all(self, reason: str, prefix: str = "the VM stopped: ") -> None:
        """Every open request gets its error: the VM stopped, or the agent restarted."""
        for route_id, route in list(self.routes.items()):
            if route.track is not None:
                self.sup.audit.abandon(route.track, prefix + reason)
            route.owner.send(protocol.error(route.client_id, prefix + reason))
            route.owner.open_requests.pop(route.client_id, None)
            del self.routes[route_id]
        for owner, frame in self.pending:
            owner.send(protocol.error(frame.id, prefix + reason))
        self.pending.clear()
        for future in self.own.values():
            if not future.done():
                future.set_exception(VmError(prefix + reason))
        self.own.clear()

    def drop(self, owner: Reader) -> None:
        """``owner`` has gone: its processes are killed, its reads cancelled, its replies have
        nowhere to go."""
        for channel_id, route in list(self.routes.items()):
            if route.owner is owner:
                if route.track is not None:
                    self.sup.audit.abandon(route.track, "its client went away")
                if route.op in ("exec", "console"):
                    self.send(protocol.encode({"type": "signal", "id": channel_id, "signal": signal.SIGKILL}))
                elif route.op == "read":
                    self.send(protocol.encode({"type": "cancel", "id": channel_id}))
                del self.routes[channel_id]
        owner.open_requests.clear()
        self.pending = [(o, f) for o, f in self.pending if o is not owner]
