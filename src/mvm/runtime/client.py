"""The host end of the agent channel: a unix socket QEMU serves for the guest's
``org.mvm.agent`` virtio-serial port.

The host greets first (bytes it writes are queued until the agent reads them), takes the
agent's ``hello`` and checks the channel with a ``ping``; the request API (exec, files)
grows here on the same framing.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvm.core import protocol


@dataclass
class AgentChannel:
    path: Path
    sock: socket.socket | None = None
    hello: dict[str, Any] | None = None
    hello_at: float | None = None  # time.monotonic() when the hello arrived
    pong: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    _decoder: protocol.Decoder = field(default_factory=protocol.Decoder)

    def try_connect(self) -> bool:
        """Connect once QEMU has created the socket; False until then."""
        if self.sock is not None:
            return True
        if not self.path.exists():
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            return False
        sock.sendall(protocol.hello("host"))  # queued for the guest until the agent reads it
        sock.setblocking(False)
        self.sock = sock
        return True

    def on_readable(self) -> bool:
        """Handle what arrived; False when the channel closed."""
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        try:
            frames = self._decoder.feed(data)
        except protocol.ProtocolError as err:
            self.errors.append(str(err))
            return True
        for frame in frames:
            if frame.type == "hello" and self.hello is None:
                self.hello, self.hello_at = frame.header, time.monotonic()
                self.sock.sendall(protocol.encode({"type": "ping", "id": 1}))
            elif frame.type == "pong" and frame.id == 1:
                self.pong = frame.header
            elif frame.type == "error":
                self.errors.append(str(frame.header.get("message")))
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
