"""Frames out to the host: every thread writes through one Channel, so frames stay whole."""

from __future__ import annotations

import _thread
import errno
import os

from mvm.core import protocol

TYPE_CHECKING = False  # (typing costs its import at the agent's start; annotations are strings)
if TYPE_CHECKING:
    from typing import Any

MAX_MESSAGE = 2000  # error messages are cut so an error reply always fits in a frame


class Channel:
    """The write side of one host connection, shared by every thread.

    One lock keeps frames whole. Once the connection is closed, late writers (an exec thread
    still draining) are dropped instead of talking to the next host.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # threading.Lock is this. threading itself (with functools and collections behind it)
        # is imported by the first request that starts a thread, not at the agent's start:
        # always on the reading loop, the main thread (threading takes the thread that first
        # imports it for the main one).
        self.lock = _thread.allocate_lock()
        self.closed = False

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        data = memoryview(protocol.encode(header, body))
        whole = len(data)
        with self.lock:
            if self.closed:
                return
            try:
                while data:
                    data = data[os.write(self.fd, data) :]
            except OSError:
                # No host connected: the port refuses writes, which is not fatal. But after half
                # a frame the host can no longer find where frames start: say nothing more.
                if len(data) != whole:
                    self.closed = True

    def reply(self, request_id: int | None, kind: str, body: bytes = b"", **fields: Any) -> None:
        self.send({"type": kind, "id": request_id, **fields}, body)

    def error(self, request_id: int | None, message: str, err: int | None = None) -> None:
        fields: dict[str, Any] = {"message": message[:MAX_MESSAGE]}
        if err is not None:
            fields["errno"] = errno.errorcode.get(err, str(err))
        self.reply(request_id, "error", **fields)

    def close(self) -> None:
        with self.lock:
            self.closed = True


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
