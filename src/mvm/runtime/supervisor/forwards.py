"""Port forwards: a host listener whose every connection is tunnelled through the agent to a
port on the guest's loopback, so the guest needs no network interface (deny stays deny).
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING, Any

from mvm.core import protocol
from mvm.runtime.supervisor.clients import Reader

if TYPE_CHECKING:
    from mvm.runtime.supervisor.clients import Client
    from mvm.runtime.supervisor.supervisor import Supervisor


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TunnelEnd(Reader):
    """The host end of one forwarded TCP connection: the agent's frames for it land here."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self.decoder = protocol.Decoder()

    def send(self, data: bytes) -> None:
        frames, _ = self.decoder.feed_all(data)
        for frame in frames:
            if frame.type == "data" and not self.writer.is_closing():
                self.writer.write(frame.body)
            elif frame.type in ("done", "error"):  # the guest closed, or nothing listens there
                self.writer.close()


class Forwards:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.servers: list[asyncio.AbstractServer] = []

    async def add(self, client: Client, request_id: int | None, header: dict[str, Any]) -> None:
        """Listen on the host: 127.0.0.1 unless told otherwise, and another address only when the
        request says ``public`` (the CLI sets it when the user wrote that address)."""
        sup = self.sup
        host, host_port, guest_port = header.get("host_addr") or "127.0.0.1", header.get("host_port"), header.get("guest_port")
        if not is_loopback(str(host)) and header.get("public") is not True:
            client.send(protocol.error(request_id, f"forwarding from {host}, which is not loopback, must be asked for "
                                                   "explicitly (public: true)"))
            return
        try:
            server = await asyncio.start_server(lambda r, w: self.serve(int(guest_port), r, w),
                                                host, int(host_port))  # type: ignore[arg-type]
        except (OSError, TypeError, ValueError) as err:
            client.send(protocol.error(request_id, f"cannot forward {host}:{host_port}: {err}"))
            return
        self.servers.append(server)
        sup.record.forwards.append({"host_addr": host, "host_port": int(host_port),  # type: ignore[arg-type]
                                    "guest_port": int(guest_port)})  # type: ignore[arg-type]
        sup.record.save(sup.paths)
        client.send(protocol.encode({"type": "result", "id": request_id, "forwards": sup.record.forwards}))

    async def serve(self, guest_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        agent = self.sup.agent
        end = TunnelEnd(writer)
        agent.forward(end, protocol.Frame({"type": "connect", "id": 1, "host": "127.0.0.1", "port": guest_port}))
        try:
            while data := await reader.read(protocol.CHUNK):
                agent.forward(end, protocol.Frame({"type": "send", "id": 1}, data))
            agent.forward(end, protocol.Frame({"type": "send", "id": 1, "eof": True}))
        except ConnectionError:
            agent.forward(end, protocol.Frame({"type": "send", "id": 1, "eof": True}))

    def close(self) -> None:
        for server in self.servers:
            server.close()
