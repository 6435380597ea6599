"""Port forwards: a TCP connection to the guest's loopback, relayed in frames by threads.

Connecting and sending happen on the tunnel's own threads, never on the agent's reading
loop: a guest service with a full backlog, or one that stops reading, holds up only its own
connection. What waits to be sent is bounded; beyond that the connection is cut.
"""

from __future__ import annotations

from mvm.core import protocol

from .dispatch import MISSING, Refused, arg, handles, int_arg, quietly

# socket, queue and threading are imported by the first forward, not at the agent's start
# (socket alone costs tens of ms under TCG), and never by a guest that forwards nothing.
TYPE_CHECKING = False  # (typing costs its import at the agent's start; annotations are strings)
if TYPE_CHECKING:
    import queue
    import socket

    from .egress import Pending
    from .session import Session


SEND_LIMIT = 16 << 20  # the host's bytes waiting for a guest service that does not read them
WINDOW = 4 << 20  # what the host may send ahead of our acks (told in ``connected``); < SEND_LIMIT
ACK_EVERY = 1 << 20  # bytes written to the guest connection between two acks
CONNECT_TIMEOUT_S = 5.0


class Tunnel:
    """One forwarded TCP connection to a guest port: the host's bytes arrive in ``send``
    frames, the guest's go back as ``data``; ``done`` when the guest side closes. Egress
    (egress.py) hands it a guest connection already open (``pending``) instead."""

    def __init__(self, session: Session, request_id: int, host: str, port: int,
                 pending: Pending | None = None) -> None:
        import queue
        import threading  # (first imported by a request, on the reading loop: see channel.py)

        self.session, self.id, self.address = session, request_id, (host, port)
        self.sock: socket.socket | None = None
        self.outgoing: queue.Queue[bytes | None] = queue.Queue()  # None: shut the write side
        self.queued = 0
        self.written, self.acked = 0, 0  # bytes of the host's written to the guest connection; last said
        self.lock = threading.Lock()
        self.closed = False
        self.pending = pending
        self.host_done = threading.Event()  # the host's side has ended (sent eof, or failed)

    def run(self) -> None:
        """Connect, then relay the guest's bytes until it closes; ``done`` (or an error) ends it."""
        import socket

        channel = self.session.channel
        try:
            if self.pending is not None:
                self.sock = self.pending.sock
                self.sock.sendall(self.pending.to_guest)
            else:
                self.sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)
            self.sock.settimeout(None)
        except OSError as err:
            if self.sock is not None:
                self.sock.close()
            self.session.tunnels.pop(self.id, None)
            channel.error(self.id, f"cannot connect to {self.address[0]}:{self.address[1]}: "
                                   f"{err.strerror or err}", err.errno)
            return
        if self.closed:
            self.sock.close()
            return
        channel.reply(self.id, "connected", window=WINDOW)
        if self.pending is not None and self.pending.to_host:
            channel.reply(self.id, "data", self.pending.to_host)
        import threading

        threading.Thread(target=self.write_guest, daemon=True).start()
        try:
            while data := self.sock.recv(protocol.CHUNK):
                channel.reply(self.id, "data", data)
            if self.pending is not None and not self.closed:
                # An egress client that stops sending (nc at the end of its stdin) still reads
                # the answer: pass the half-close on, and end once the destination has too.
                channel.reply(self.id, "eof")
                self.host_done.wait()
        except OSError:
            pass
        finally:
            self.session.tunnels.pop(self.id, None)
            self.close()
            self.outgoing.put(None)
            channel.reply(self.id, "done")

    def write_guest(self) -> None:
        """The host's bytes to the guest service; the last user of the socket, so it closes it."""
        import socket

        assert self.sock is not None
        try:
            while (data := self.outgoing.get()) is not None:
                with self.lock:
                    self.queued -= len(data)
                self.sock.sendall(data)
                self.written += len(data)
                if self.written - self.acked >= ACK_EVERY:
                    self.acked = self.written
                    self.session.channel.reply(self.id, "ack", bytes=self.written)
            self.sock.shutdown(socket.SHUT_WR)
            self.host_done.set()
            while not self.closed and self.outgoing.get() is not None:
                pass  # more after eof: nothing to do with it; run() puts None when the guest closes
        except OSError:
            self.close()
        finally:
            self.host_done.set()
            self.sock.close()

    def send(self, data: bytes, eof: bool) -> None:
        with self.lock:
            self.queued += len(data)
            over = self.queued > SEND_LIMIT
        if over:  # the guest service stopped reading: cut the connection, the host sees it end
            self.close()
            return
        if data:
            self.outgoing.put(data)
        if eof:
            self.outgoing.put(None)

    def close(self) -> None:
        import socket

        self.closed = True
        self.host_done.set()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@handles("connect")
def do_connect(session: Session, frame: protocol.Frame) -> None:
    """A port forward: connect to a service on the guest's loopback for the host; or, with
    ``conn``, egress: relay a guest connection the host has connected onward."""
    if frame.id is None or frame.id in session.tunnels:
        raise Refused("connect needs a new integer 'id'")
    if "conn" in frame.header:  # egress: the host carries on a guest connection it allowed
        pending = session.egress.take(arg(frame, "conn", int)) if session.egress is not None else None
        if pending is None:
            raise Refused("no guest connection waits under that 'conn'")
        tunnel = session.tunnels[frame.id] = Tunnel(session, frame.id, "guest", 0, pending)
        import threading

        threading.Thread(target=tunnel.run, daemon=True).start()
        return
    host = arg(frame, "host", str, "127.0.0.1")
    if host not in LOOPBACK:
        raise Refused(f"forwards reach the guest's loopback only, not {host!r}")
    port = int_arg(frame, "port", MISSING, 1, 65535)
    tunnel = session.tunnels[frame.id] = Tunnel(session, frame.id, host, port)
    import threading

    threading.Thread(target=tunnel.run, daemon=True).start()


@handles("send")
@quietly
def do_send(session: Session, frame: protocol.Frame) -> None:
    if frame.id is not None and (tunnel := session.tunnels.get(frame.id)):
        tunnel.send(frame.body, arg(frame, "eof", bool, False))
