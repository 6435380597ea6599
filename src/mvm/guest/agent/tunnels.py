"""Port forwards: a TCP connection to the guest's loopback, relayed in frames by a thread."""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

from mvm.core import protocol

from .dispatch import MISSING, Refused, arg, handles, int_arg, quietly

if TYPE_CHECKING:
    from .session import Session


class Tunnel:
    """One forwarded TCP connection to a guest port: the host's bytes arrive in ``send``
    frames, the guest's go back as ``data``; ``done`` when the guest side closes."""

    def __init__(self, session: Session, request_id: int, sock: socket.socket) -> None:
        self.session, self.id, self.sock = session, request_id, sock

    def run(self) -> None:
        try:
            while data := self.sock.recv(protocol.CHUNK):
                self.session.channel.reply(self.id, "data", data)
        except OSError:
            pass
        finally:
            self.session.tunnels.pop(self.id, None)
            self.sock.close()
            self.session.channel.reply(self.id, "done")

    def send(self, data: bytes, eof: bool) -> None:
        try:
            if data:
                self.sock.sendall(data)
            if eof:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@handles("connect")
def do_connect(session: Session, frame: protocol.Frame) -> None:
    """A port forward: connect to a service on the guest's loopback for the host."""
    if frame.id is None or frame.id in session.tunnels:
        raise Refused("connect needs a new integer 'id'")
    host = arg(frame, "host", str, "127.0.0.1")
    if host not in LOOPBACK:
        raise Refused(f"forwards reach the guest's loopback only, not {host!r}")
    port = int_arg(frame, "port", MISSING, 1, 65535)
    sock = socket.create_connection((host, port), timeout=5)  # OSError -> error reply
    sock.settimeout(None)
    tunnel = session.tunnels[frame.id] = Tunnel(session, frame.id, sock)
    session.channel.reply(frame.id, "connected")
    threading.Thread(target=tunnel.run, daemon=True).start()


@handles("send")
@quietly
def do_send(session: Session, frame: protocol.Frame) -> None:
    if frame.id is not None and (tunnel := session.tunnels.get(frame.id)):
        tunnel.send(frame.body, arg(frame, "eof", bool, False))
