"""Egress of an ``allow-list`` guest, which has no network device: listeners on the guest's
loopback whose connections the host is asked to carry on (``dial``), and decides about.

The host sends ``egress {listen: [[addr, port, host]], hosts: [[addr, name]]}`` (again on
every change, same id). The agent then listens on each ``addr:port`` (a name's own 127.77.0.N,
or a loopback address an entry names), plus an HTTP proxy on PROXY (CONNECT, and plain-HTTP
requests with an absolute URI), writes the names into /etc/hosts (/init made it the agent's),
and answers ``egress-ready {failed}``. A guest connection becomes ``dial {conn, host, port}``
on that id; the host answers with ``connect {conn}`` (then the tunnel runs as a port forward's
does, tunnels.py) or ``refuse {conn, message}``. Nothing here decides what is allowed.
"""

from __future__ import annotations

import time

from mvm.core import protocol

from .dispatch import Refused, arg, handles, quietly

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket

    from .session import Session

PROXY = ("127.77.0.1", 3128)  # /init's HTTP_PROXY and friends say this address
HOSTS = "/etc/hosts"
READY = "/run/mvm/egress/ready"  # /init waits for it before the entrypoint
MARK = "# mvm allow-list"
MAX_PENDING = 64  # guest connections waiting for the host's answer
PENDING_S = 30.0
HEAD_LIMIT = 16 << 10
HOP_HEADERS = (b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive")


class Pending:
    """A guest connection the host has been asked about: what to send each way first."""

    def __init__(self, sock: socket.socket, to_guest: bytes = b"", to_host: bytes = b"", proxy: bool = False) -> None:
        self.sock, self.to_guest, self.to_host, self.proxy = sock, to_guest, to_host, proxy
        self.since = time.monotonic()


class Egress:
    def __init__(self, session: Session, request_id: int) -> None:
        import threading

        self.session, self.id = session, request_id
        self.listeners: dict[tuple[str, int], socket.socket] = {}
        self.pending: dict[int, Pending] = {}
        self.next_conn = 1
        self.lock = threading.Lock()
        self.readers = threading.BoundedSemaphore(MAX_PENDING)  # proxy clients whose request is being read
        self.original_hosts: str | None = None

    def configure(self, listen: list[tuple[str, int, str]], hosts: list[tuple[str, str]]) -> list[str]:
        """Listen where asked (and nowhere else), rewrite /etc/hosts; what failed, in words."""
        failed = []
        wanted = {(addr, port): host for addr, port, host in listen}
        wanted[PROXY] = ""
        for key in [k for k in self.listeners if k not in wanted]:
            self.close_listener(self.listeners.pop(key))
        for (addr, port), host in wanted.items():
            if (addr, port) in self.listeners:
                continue
            try:
                self.listeners[(addr, port)] = self.listen(addr, port, host)
            except OSError as err:
                failed.append(f"{addr}:{port}: {err.strerror or err}")
        return failed + self.write_hosts(hosts)  # (then /init's wait for READY ends)

    def listen(self, addr: str, port: int, host: str) -> socket.socket:
        import socket
        import threading

        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        threading.Thread(target=self.accept_loop, args=(sock, host, port), daemon=True).start()
        return sock

    def accept_loop(self, listener: socket.socket, host: str, port: int) -> None:
        import threading

        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            if not host:
                if not self.readers.acquire(blocking=False):
                    conn.close()  # (as many as wait for the host already: a flood gets no thread each)
                    continue
                threading.Thread(target=self.proxy_client, args=(conn,), daemon=True).start()
            else:
                self.dial(Pending(conn), host, port)

    def dial(self, pending: Pending, host: str, port: int) -> None:
        with self.lock:
            now = time.monotonic()
            for conn in [c for c, p in self.pending.items() if now - p.since > PENDING_S]:
                self.pending.pop(conn).sock.close()
            if len(self.pending) >= MAX_PENDING:
                pending.sock.close()
                return
            conn, self.next_conn = self.next_conn, self.next_conn + 1
            self.pending[conn] = pending
        self.session.channel.reply(self.id, "dial", conn=conn, host=host, port=port)

    def take(self, conn: int) -> Pending | None:
        with self.lock:
            return self.pending.pop(conn, None)

    def refuse(self, conn: int, message: str) -> None:
        pending = self.take(conn)
        if pending is None:
            return
        if pending.proxy:
            body = f"mvm allow-list: {message}\n".encode(errors="replace")
            try:
                pending.sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
        pending.sock.close()

    def proxy_client(self, sock: socket.socket) -> None:
        """Read one request head; CONNECT host:port, or METHOD http://host[:port]/path."""
        try:
            self.read_request(sock)
        finally:
            self.readers.release()

    def read_request(self, sock: socket.socket) -> None:
        sock.settimeout(PENDING_S)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT:
                data = sock.recv(HEAD_LIMIT)
                if not data:
                    sock.close()
                    return
                head += data
            sock.settimeout(None)
            target = proxy_target(head)
        except (OSError, ValueError) as err:
            try:
                sock.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            sock.close()
            if isinstance(err, ValueError):
                print(f"mvm agent: proxy: {err}", flush=True)
            return
        host, port, to_host, to_guest = target
        self.dial(Pending(sock, to_guest=to_guest, to_host=to_host, proxy=True), host, port)

    def write_hosts(self, hosts: list[tuple[str, str]]) -> list[str]:
        try:
            with open(HOSTS) as f:
                current = f.read()
        except OSError:
            current = ""
        if self.original_hosts is None:
            self.original_hosts = current.split(MARK, 1)[0]
        text = self.original_hosts.rstrip("\n") + "\n" + MARK + "\n" + "".join(f"{a} {n}\n" for a, n in hosts)
        try:
            if text != current:
                with open(HOSTS, "w") as f:  # in place: under Docker it is a bind mount
                    f.write(text)
            with open(READY, "w"):
                pass
        except OSError as err:
            return [f"{err.filename}: {err.strerror}"]
        return []

    @staticmethod
    def close_listener(sock: socket.socket) -> None:
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes its accept()
        except OSError:
            pass
        sock.close()

    def close(self) -> None:
        for sock in self.listeners.values():
            self.close_listener(sock)
        self.listeners.clear()
        with self.lock:
            for pending in self.pending.values():
                pending.sock.close()
            self.pending.clear()


def proxy_target(head: bytes) -> tuple[str, int, bytes, bytes]:
    """(host, port, bytes for the destination first, bytes for the guest client first)."""
    end = head.index(b"\r\n\r\n") if b"\r\n\r\n" in head else -1
    if end < 0:
        raise ValueError("request head too long or cut short")
    lines = head[:end].split(b"\r\n")
    rest = head[end + 4 :]
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1 request line: {lines[0][:100]!r}")
    method, target, version = parts
    if method == b"CONNECT":
        host, port = split_host_port(target.decode("ascii", "replace"), None)
        return host, port, rest, b"HTTP/1.1 200 Connection established\r\n\r\n"
    text = target.decode("ascii", "replace")
    if not text.startswith("http://"):
        raise ValueError(f"a proxy request needs http://host/path or CONNECT, not {text[:100]!r}")
    authority, slash, path = text[7:].partition("/")
    host, port = split_host_port(authority.rpartition("@")[2], 80)
    kept = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in HOP_HEADERS]
    request = b"\r\n".join([b"%s /%s %s" % (method, (path if slash else "").encode(), version), *kept,
                            b"Connection: close"]) + b"\r\n\r\n"
    return host, port, request + rest, b""


def split_host_port(text: str, default: int | None) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text and default is not None:
        return host, default
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535) or not host:
        raise ValueError(f"{text[:100]!r} is not host:port")
    return host, int(port_text)


@handles("egress")
def do_egress(session: Session, frame: protocol.Frame) -> None:
    """Set (or change) this guest's egress listeners and names; the host's word only."""
    if frame.id is None:
        raise Refused("egress needs an integer 'id'")
    listen = [(str(a), int(p), str(h)) for a, p, h in arg(frame, "listen", list, [])]
    hosts = [(str(a), str(n)) for a, n in arg(frame, "hosts", list, [])]
    if session.egress is None or session.egress.id != frame.id:
        if session.egress is not None:
            session.egress.close()
        session.egress = Egress(session, frame.id)
    failed = session.egress.configure(listen, hosts)
    session.channel.reply(frame.id, "egress-ready", failed=failed)


@handles("refuse")
@quietly
def do_refuse(session: Session, frame: protocol.Frame) -> None:
    conn = arg(frame, "conn", int)
    if session.egress is not None:
        session.egress.refuse(conn, str(arg(frame, "message", str, "refused"))[:500])
