"""The frame loop: read one host connection until EOF, then wait for the next host on this
guest's kind of channel (virtio-serial, vsock, or an inherited descriptor in tests)."""

from __future__ import annotations

import os
import stat
import time

from mvm.core import protocol

from .channel import Channel
from .session import Session, say_hello

# socket is imported only where one is used (Docker's agent socket, Firecracker's vsock, tests):
# QEMU's virtio-serial port is a plain device, and socket costs tens of ms under TCG.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket


def decode(decoder: protocol.Decoder, data: bytes, channel: Channel) -> list[protocol.Frame]:
    """Whole frames in data; each bad frame gets an error reply and is skipped."""
    frames, errors = decoder.feed_all(data)
    for err in errors:
        channel.error(None, str(err))
    return frames


READ_SIZE = 1 << 20


class BeforeHostHello:
    """Skips what a connection carries before the host's hello (protocol.HOST_HELLO).

    That was sent to an agent that died: whole frames the host has failed already, or the
    tail of one, whose body would be read as the next frame's length (a virtio-serial port
    outlives its reader). So none of it is read as frames.
    """

    def __init__(self) -> None:
        self.tail = b""  # the last bytes seen: the hello may be split across two reads

    def skip(self, data: bytes | memoryview) -> bytes | None:
        """The bytes from the host's hello on, once it has come; None until then."""
        seen = self.tail + data
        at = seen.find(protocol.HOST_HELLO)
        if at < 0:
            self.tail = seen[-(len(protocol.HOST_HELLO) - 1):]
            return None
        self.tail = b""
        return seen[at:]


def serve_fd(fd: int) -> None:
    """Serve one host connection on fd until it reads EOF (or fails).

    Reads land in one buffer allocated once: ``os.read(fd, 1 MiB)`` allocates (and maps) a
    1 MiB object per call, and a virtio-serial port returns at most one 4 KiB buffer per read,
    so under TCG that allocation cost ~150 us per 4 KiB, most of an egress download's time
    (measured in the guest: 144-194 us per read against 10 us for a read into a kept buffer).
    """
    session = Session(Channel(fd))
    say_hello(session.channel)
    decoder = protocol.Decoder()
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    missing = 1  # bytes before the decoder can have another frame: until then, only stash
    before_hello = BeforeHostHello()
    try:
        while True:
            try:
                got = os.readv(fd, [buffer])
            except OSError:
                return
            if not got:
                return
            data: bytes | memoryview = view[:got]
            if not session.greeted:
                from_hello = before_hello.skip(data)
                if from_hello is None:
                    continue
                data, session.greeted = from_hello, True
            elif got < missing:  # (most 4 KiB reads of a large frame: ~20 us less each under TCG)
                decoder.stash(data)
                missing -= got
                continue
            for frame in decode(decoder, data, session.channel):
                session.handle(frame)
            missing = decoder.missing()
    finally:
        session.close()


def open_port(path: str) -> int:
    """The virtio-serial device, or (for tests) a unix socket that stands in for one."""
    if stat.S_ISSOCK(os.stat(path).st_mode):
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock.detach()
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def serve_port(path: str) -> None:
    """Serve host after host: virtio-serial reads EOF while no host is connected, so reopen,
    soon at first (a clone's new host is usually there already), then every 50 ms at most."""
    idle = 0.002
    while True:
        try:
            fd = open_port(path)
        except OSError:
            time.sleep(0.5)
            continue
        started = time.monotonic()
        try:
            serve_fd(fd)
        finally:
            os.close(fd)
        idle = 0.002 if time.monotonic() - started > 1.0 else min(idle * 2, 0.05)  # (a real session: start over)
        time.sleep(idle)


def serve_listener(listener: socket.socket) -> None:
    """Serve host after host on a listening socket: one connection at a time, each until EOF."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            time.sleep(0.5)
            continue
        fd = conn.detach()
        try:
            serve_fd(fd)
        finally:
            os.close(fd)


def serve_vsock(port: int) -> None:
    """Firecracker's agent channel: listen on AF_VSOCK port ``port`` of this guest. The host
    reaches it by connecting to the VM's vsock unix socket and sending ``CONNECT <port>``."""
    import socket

    while True:
        listener = None
        try:
            listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            listener.bind((socket.VMADDR_CID_ANY, port))
            listener.listen(1)
            break
        except OSError:  # the vsock transport is not up yet
            if listener is not None:
                listener.close()
            time.sleep(0.5)
    serve_listener(listener)
