"""Port forwards: a host listener whose every connection is tunnelled through the agent to a
port on the guest's loopback, so the guest needs no network interface (deny stays deny).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from typing import TYPE_CHECKING, Any

from mvm.core import protocol
from mvm.runtime.supervisor.clients import Reader

if TYPE_CHECKING:
    from mvm.runtime.supervisor.agent_link import AgentLink
    from mvm.runtime.supervisor.clients import Client
    from mvm.runtime.supervisor.supervisor import Supervisor


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


WINDOW_RANGE = (64 << 10, 64 << 20)  # what an agent's window is clamped to


class TunnelEnd(Reader):
    """The host end of one forwarded TCP connection: the agent's frames for it land here.

    An agent that says ``connected {window}`` acks (``ack {bytes}``) what it has written to the
    guest connection; the relay then sends at most ``window`` bytes ahead of that, so a guest
    program that reads slowly is waited for instead of being cut off at the agent's limit.
    The guest's word only decides how fast we send: what the host holds stays bounded by
    AgentLink.drain either way."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self.decoder = protocol.Decoder()
        self.window: int | None = None  # None: an agent that does not ack (sends are not held back)
        self.acked = 0
        self.credit = asyncio.Event()

    def send(self, data: bytes) -> None:
        frames, _ = self.decoder.feed_all(data)
        for frame in frames:
            number = frame.header.get("window" if frame.type == "connected" else "bytes")
            valid = isinstance(number, int) and not isinstance(number, bool)
            if frame.type == "connected" and valid:
                self.window = min(max(number, WINDOW_RANGE[0]), WINDOW_RANGE[1])
            elif frame.type == "ack" and valid:
                self.acked = max(self.acked, number)
                self.credit.set()
            elif frame.type == "data" and not self.writer.is_closing():
                self.writer.write(frame.body)
            elif frame.type == "eof" and not self.writer.is_closing() and self.writer.can_write_eof():
                self.writer.write_eof()  # an egress client half-closed: it still reads the answer
            elif frame.type in ("done", "error"):  # the guest closed, or nothing listens there
                self.writer.close()
                self.credit.set()

    async def room(self, sent: int) -> None:
        """Wait while ``sent`` is more than the window ahead of the agent's last ack."""
        while self.window is not None and sent - self.acked > self.window and not self.writer.is_closing():
            self.credit.clear()
            await self.credit.wait()


async def relay(agent: AgentLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                connect: dict[str, Any]) -> None:
    """Carry one host TCP stream through the agent: ``connect`` (a guest port for a forward, a
    waiting guest connection for egress) opens the guest's end; bytes go both ways until
    each side has closed."""
    end = TunnelEnd(writer)
    agent.forward(end, protocol.Frame({"type": "connect", "id": 1, **connect}))
    sent = 0
    try:
        while data := await reader.read(protocol.CHUNK):
            agent.forward(end, protocol.Frame({"type": "send", "id": 1}, data))
            sent += len(data)
            await agent.drain()
            await end.room(sent)
        agent.forward(end, protocol.Frame({"type": "send", "id": 1, "eof": True}))
    except ConnectionError:
        agent.forward(end, protocol.Frame({"type": "send", "id": 1, "eof": True}))


class Forward:
    """One listening host address and the connections it has open (closed with it)."""

    def __init__(self, host: str, host_port: int, guest_port: int, server: asyncio.AbstractServer) -> None:
        self.host, self.host_port, self.guest_port, self.server = host, host_port, guest_port, server
        self.connections: set[asyncio.StreamWriter] = set()

    def close(self) -> None:
        self.server.close()
        for writer in list(self.connections):
            writer.close()


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


class Forwards:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.active: list[Forward] = []

    async def add(self, client: Client, request_id: int | None, header: dict[str, Any]) -> None:
        """Listen on the host: 127.0.0.1 unless told otherwise, and another address only when the
        request says ``public`` (the CLI sets it when the user wrote that address)."""
        sup = self.sup
        host, host_port, guest_port = header.get("host_addr") or "127.0.0.1", header.get("host_port"), header.get("guest_port")
        if not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in (host_port, guest_port)):
            client.send(protocol.error(request_id, "a forward's host_port and guest_port are numbers from 1 to 65535"))
            return
        assert isinstance(host_port, int) and isinstance(guest_port, int)
        if not isinstance(host, str) or (not is_loopback(host) and header.get("public") is not True):
            client.send(protocol.error(request_id, f"forwarding from {host}, which is not loopback, must be asked for "
                                                   "explicitly (public: true)"))
            return
        mine = next((f for f in self.active if f.host_port == host_port and _same_host(f.host, host)), None)
        if mine is not None:
            client.send(protocol.error(request_id, f"host port {host}:{host_port} is already forwarded to guest port "
                                                   f"{mine.guest_port} of VM {sup.record.name} "
                                                   f"(`mvmctl forward rm {sup.record.name} {host_port}` first)"))
            return
        forward_box: list[Forward] = []
        try:
            server = await asyncio.start_server(lambda r, w: self.serve(forward_box[0], r, w), host, host_port)
        except OSError as err:
            why = ("another program listens there" if err.errno == errno.EADDRINUSE
                   else err.strerror or str(err))
            client.send(protocol.error(request_id, f"cannot forward host port {host}:{host_port}: {why}; "
                                                   "pick another host port"))
            return
        forward_box.append(Forward(host, host_port, guest_port, server))
        self.active.append(forward_box[0])
        sup.record.forwards.append({"host_addr": host, "host_port": host_port, "guest_port": guest_port})
        sup.record.save(sup.paths)
        client.send(protocol.encode({"type": "result", "id": request_id, "forwards": sup.record.forwards}))

    def remove(self, client: Client, request_id: int | None, header: dict[str, Any]) -> None:
        """Stop listening on a host port (``host_addr`` None: whichever address it is on), and
        close the connections it carried."""
        sup = self.sup
        host, host_port = header.get("host_addr"), header.get("host_port")
        matches = [f for f in self.active if f.host_port == host_port and (host is None or _same_host(f.host, str(host)))]
        if not matches:
            where = f"{host}:{host_port}" if host else f"port {host_port}"
            client.send(protocol.error(request_id, f"VM {sup.record.name} has no forward from host {where} "
                                                   f"(`mvmctl forward ls {sup.record.name}` lists them)"))
            return
        for forward in matches:
            forward.close()
            self.active.remove(forward)
        sup.record.forwards = [f for f in sup.record.forwards
                               if not any(f.get("host_port") == m.host_port and f.get("host_addr") == m.host
                                          for m in matches)]
        sup.record.save(sup.paths)
        client.send(protocol.encode({"type": "result", "id": request_id, "forwards": sup.record.forwards}))

    async def serve(self, forward: Forward, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        forward.connections.add(writer)
        try:
            await relay(self.sup.agent, reader, writer, {"host": "127.0.0.1", "port": forward.guest_port})
        finally:
            forward.connections.discard(writer)

    def close(self) -> None:
        for forward in self.active:
            forward.close()
