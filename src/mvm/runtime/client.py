"""A client of one VM's supervisor (``vms/<name>/ctl.sock``): the CLI, the SDK and MCP all
talk to a VM through this.

Requests are frames (core/protocol.py) with ids chosen here; the supervisor forwards agent
requests and rewrites ids, so many clients, and many requests from one client, share the
VM's single agent channel.
"""

from __future__ import annotations

import os
import selectors
import socket
from collections.abc import Callable, Iterator, MutableSequence

from mvm.core import protocol
from mvm.core.errors import VmError

TYPE_CHECKING = False  # typing, dataclasses and state's pathlib cost imports on every `mvmctl exec`
if TYPE_CHECKING:
    from typing import Any, BinaryIO

    from mvm.core.state import VmPaths

Sink = Callable[[bytes], None]
CONNECT_TIMEOUT_S = 10.0
SURFACES = ("cli", "sdk", "mcp")
# Requests the supervisor writes an audit record for: they say which surface asked.
AUDITED = frozenset({"exec", "console", "write", "read", "remove", "mkdir", "rename", "pause", "resume"})
_surface = "cli"  # what this process is: the CLI unless the SDK (or MCP, on the SDK) says so


def set_surface(surface: str) -> None:
    """Declare which of mvm's surfaces this process is, for its audit records (the SDK and MCP
    call this; the CLI is the default)."""
    global _surface
    if surface not in SURFACES:
        raise ValueError(f"surface {surface!r} is not one of {SURFACES}")
    _surface = surface


def current_surface() -> str:
    return _surface


class AgentError(VmError):
    """The guest refused a request (a file that is not there, a uid the image does not allow...)."""

    def __init__(self, message: str, errno: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ExecResult:
    """How a guest process ended, and its output when no sink took it."""

    __slots__ = ("code", "signal", "timed_out", "stdout", "stderr", "receipt")

    def __init__(self, code: int | None, signal: int | None, timed_out: bool, stdout: bytes = b"",
                 stderr: bytes = b"", receipt: str | None = None) -> None:
        self.code = code
        self.signal = signal
        self.timed_out = timed_out
        self.stdout = stdout
        self.stderr = stderr
        self.receipt = receipt  # its audit record's id, when the supervisor wrote one

    def __repr__(self) -> str:
        return (f"ExecResult(code={self.code!r}, signal={self.signal!r}, timed_out={self.timed_out!r}, "
                f"stdout={self.stdout!r}, stderr={self.stderr!r}, receipt={self.receipt!r})")

    def __eq__(self, other: object) -> bool:  # (and so unhashable, like the dataclass it was)
        if not isinstance(other, ExecResult):
            return NotImplemented
        return all(getattr(self, slot) == getattr(other, slot) for slot in self.__slots__)

    @property
    def exit_status(self) -> int:
        """As a shell reports it: the code, or 128 + the signal."""
        if self.code is not None:
            return self.code
        return 128 + (self.signal or 0)


class VmClient:
    """One connection to VM ``name``'s supervisor; ``paths`` is set when it was found by its VmPaths."""

    __slots__ = ("name", "paths", "sock", "receipts", "audit_warnings", "_decoder", "_queued", "_next_id")

    def __init__(self, name: str, sock: socket.socket | None = None, paths: VmPaths | None = None) -> None:
        self.name = name
        self.paths = paths
        self.sock = sock
        # ids of the audit records of what this client did (the SDK points it at its sandbox's)
        self.receipts: MutableSequence[str] = []
        self.audit_warnings: list[str] = []  # why a record could not be written (dev images go on)
        self._decoder = protocol.Decoder()
        self._queued: list[protocol.Frame] = []
        self._next_id = 1

    @classmethod
    def connect(cls, paths: VmPaths) -> VmClient:
        client = cls.connect_socket(str(paths.ctl_socket), paths.name)
        client.paths = paths
        return client

    @classmethod
    def connect_socket(cls, ctl_socket: str, name: str) -> VmClient:
        """Connect to VM ``name`` by its control socket's path, without its VmPaths (which cost
        `mvmctl exec` the import of core/state.py)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)  # a supervisor too busy to accept is an error, not a hang
        try:
            sock.connect(ctl_socket)
            sock.settimeout(None)
        except TimeoutError:
            sock.close()
            raise VmError(f"the supervisor of VM {name} did not accept a connection within {CONNECT_TIMEOUT_S:.0f} s",
                          f"`mvmctl status {name}`, or `mvmctl down --force {name}`") from None
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise VmError(f"VM {name} is not running", "`mvmctl ls` shows its state; `mvmctl up` starts it") from None
        except BaseException:
            sock.close()
            raise
        return cls(name, sock)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> VmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- frames ----------------------------------------------------------------------------------

    def send(self, header: dict[str, Any], body: bytes = b"") -> int:
        """Send a request; returns its id (a new one unless ``header`` has one)."""
        if "id" not in header:
            header = {**header, "id": self._next_id}
            self._next_id += 1
        if header.get("type") in AUDITED:
            header["surface"] = _surface
        assert self.sock is not None
        self.sock.sendall(protocol.encode(header, body))
        return header["id"]

    def receive(self) -> protocol.Frame:
        """The next frame from the supervisor, whatever request it answers."""
        while not self._queued:
            self._fill()
        return self._queued.pop(0)

    def _fill(self) -> None:
        """One read from the socket into the queue of decoded frames."""
        assert self.sock is not None
        data = self.sock.recv(1 << 20)
        if not data:
            raise VmError(f"the supervisor of VM {self.name} went away", f"`mvmctl status {self.name}` says why")
        frames, _ = self._decoder.feed_all(data)
        for frame in frames:
            receipt, warning = frame.header.get("receipt"), frame.header.get("audit_warning")
            if isinstance(receipt, str):
                self.receipts.append(receipt)
            if warning is not None:
                self.audit_warnings.append(str(warning)[:300])
        self._queued += frames

    def receive_batch(self) -> list[protocol.Frame]:
        """Every frame that has arrived, waiting for at least one."""
        frames = [self.receive()]
        frames += self._queued
        self._queued = []
        return frames

    def replies(self, request_id: int) -> Iterator[protocol.Frame]:
        """Frames answering one request, ending with its terminal reply; errors raise."""
        while True:
            frame = self.receive()
            if frame.id != request_id:
                continue
            if frame.type == "error":
                raise AgentError(str(frame.header.get("message")), frame.header.get("errno"))
            yield frame
            if frame.type in ("exit", "done", "result", "pong"):
                return

    def call(self, kind: str, body: bytes = b"", *, wait_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """One request, one reply: returns the reply's header. ``wait_s`` bounds the wait (a
        guest too busy to answer is then a VmError, not a hang)."""
        request_id = self.send({"type": kind, **fields}, body)
        assert self.sock is not None
        self.sock.settimeout(wait_s)
        try:
            *_, last = self.replies(request_id)
        except TimeoutError:
            raise VmError(f"VM {self.name} did not answer {kind!r} within {wait_s:g} s") from None
        finally:
            if self.sock is not None:
                self.sock.settimeout(None)
        return last.header

    # -- processes -------------------------------------------------------------------------------

    def exec(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
             timeout: float | None = None, stdin: bytes | int | None = None, pty: bool = False,
             rows: int | None = None, cols: int | None = None, stdout: Sink | None = None,
             stderr: Sink | None = None, kind: str = "exec") -> ExecResult:
        """Run ``argv`` in the guest; output goes to the sinks (or is collected in the result).

        ``stdin`` is bytes to send, or a file descriptor streamed until EOF.
        """
        header: dict[str, Any] = {"type": kind}
        if kind == "exec":
            header.update(stdin=stdin is not None, pty=pty)
        for key, value in (("argv", argv or None), ("env", env), ("cwd", cwd), ("timeout", timeout),
                           ("rows", rows), ("cols", cols)):
            if value is not None:  # a console without argv gets the guest's login shell
                header[key] = value
        request_id = self.send(header)
        if isinstance(stdin, bytes):
            for start in range(0, len(stdin), protocol.CHUNK):
                self.send({"type": "stdin", "id": request_id}, stdin[start : start + protocol.CHUNK])
            self.send({"type": "stdin", "id": request_id, "eof": True})
            stdin = None
        collected: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        sinks = {"stdout": stdout or collected["stdout"].extend, "stderr": stderr or collected["stderr"].extend}
        for frame in self._exec_frames(request_id, stdin):
            if frame.type in sinks:
                sinks[frame.type](frame.body)
            elif frame.type == "exit":
                receipt = frame.header.get("receipt")
                return ExecResult(frame.header.get("code"), frame.header.get("signal"),
                                  bool(frame.header.get("timed_out")), bytes(collected["stdout"]),
                                  bytes(collected["stderr"]), receipt if isinstance(receipt, str) else None)
        raise VmError("the exec ended without an exit status")  # replies() always ends with one

    def _exec_frames(self, request_id: int, stdin_fd: int | None) -> Iterator[protocol.Frame]:
        """The exec's replies, while relaying ``stdin_fd`` to it as it becomes readable."""
        if stdin_fd is None:
            yield from self.replies(request_id)
            return
        assert self.sock is not None
        selector = selectors.DefaultSelector()
        try:
            selector.register(stdin_fd, selectors.EVENT_READ, "stdin")
        except PermissionError:  # a regular file or /dev/null: always readable, epoll refuses it
            selector.close()
            while data := os.read(stdin_fd, protocol.CHUNK):
                self.send({"type": "stdin", "id": request_id}, data)
            self.send({"type": "stdin", "id": request_id, "eof": True})
            yield from self.replies(request_id)
            return
        selector.register(self.sock, selectors.EVENT_READ, "vm")
        try:
            while True:
                for frame in self._take(request_id):
                    yield frame
                    if frame.type == "exit":
                        return
                for key, _ in selector.select():
                    if key.data == "vm":
                        self._fill()
                        continue
                    data = os.read(stdin_fd, protocol.CHUNK)
                    if data:
                        self.send({"type": "stdin", "id": request_id}, data)
                    else:
                        self.send({"type": "stdin", "id": request_id, "eof": True})
                        selector.unregister(stdin_fd)
        finally:
            selector.close()

    def _take(self, request_id: int) -> list[protocol.Frame]:
        mine = [f for f in self._queued if f.id == request_id]
        self._queued = [f for f in self._queued if f.id != request_id]
        for frame in mine:
            if frame.type == "error":
                raise AgentError(str(frame.header.get("message")), frame.header.get("errno"))
        return mine

    # -- files -----------------------------------------------------------------------------------

    def read_file(self, path: str, sink: Sink, *, regular: bool = False) -> dict[str, Any]:
        """Stream a guest file into ``sink``; returns its size and mode. ``regular``: refuse
        anything else (a device or FIFO, also behind a link), whose read might never end."""
        request_id = self.send({"type": "read", "path": path, **({"regular": True} if regular else {})})
        for frame in self.replies(request_id):
            if frame.type == "data":
                sink(frame.body)
            elif frame.type == "done":
                return frame.header
        raise VmError(f"reading {path} ended early")

    def write_file(self, path: str, source: BinaryIO | bytes, mode: int = 0o644) -> int:
        """Write a guest file from a host file object (streamed) or bytes; returns its size."""
        request_id = self._next_id
        self._next_id += 1
        if isinstance(source, bytes):
            chunks: Iterator[bytes] = iter([source[i : i + protocol.CHUNK] for i in range(0, len(source), protocol.CHUNK)])
        else:
            chunks = iter(lambda: source.read(protocol.CHUNK), b"")
        chunk = next(chunks, b"")
        while True:
            following = next(chunks, None)
            self.send({"type": "write", "id": request_id, "path": path, "mode": mode,
                       "more": following is not None}, chunk)
            if following is None:
                break
            chunk = following
        *_, done = self.replies(request_id)
        return int(done.header.get("size", 0))
