"""The agent wire format, shared by the host and the guest (copied into every image).

A frame is ``u32 length`` (big-endian, of everything after it) + ``u32 header length`` +
a JSON header + raw body bytes. The header always has ``type`` and, for requests and their
replies, ``id``, so many calls can share one channel. Bodies carry bytes (file contents,
process output) without base64. Stdlib only: this module runs inside the guest.

Messages (host -> agent requests; every reply carries the request's ``id``):

    hello {version, role:"host"}          -> hello {version, role:"agent", uid, pid, uptime, imported?}
                                              (imported: the guest's uptime once the agent had
                                              loaded, for the boot report; only its word).
                                              The agent also says hello unasked when a connection
                                              opens: a new pid means /init restarted it.
    ping                                   -> pong {uptime}
    exec {argv, env?, cwd?, uid?, stdin?:bool, pty?:bool, rows?, cols?, timeout?:s}
                                           -> started {pid}, then stdout / stderr (body: bytes,
                                              a pty's output is all stdout), then
                                              exit {code:int|null, signal:int|null, timed_out}
    console {argv?, rows?, cols?}          -> like exec with a pty (default argv: a login shell);
                                              refused on sealed images
    stdin {id of the exec} (body; eof:true closes the process's stdin)
    signal {id of the exec, signal:int}    the process group gets it (no reply)
    resize {id of the exec, rows, cols}    (no reply)
    read {path}                            -> data (body, up to CHUNK bytes each) ..., then
                                              done {size, mode}
    write {path, mode?, more:bool} (body)  frames with one id append to a temporary file;
                                              the last (more:false) -> done {size}, after an
                                              fsync and a rename into place
    list {path}                            -> result {entries:[{name, type, size, mode, mtime}]}
    stat {path}                            -> result {stat:{name, type, size, mode, mtime, uid, gid}}
    remove {path, recursive?}              -> result {}
    mkdir {path, mode?, parents?}          -> result {}
    rename {src, dst}                      -> result {}
    telemetry                              -> result {uptime, load:[1,5,15], memory:{total,
                                              available}, disk:{total, free}, agent:{pid, uid},
                                              entrypoint:{pid, uid} | null}
    shutdown                               -> result {}, then the guest powers off
    connect {host:loopback, port}          -> connected {window}, then data (body: the guest's
                                              bytes) ..., done when the guest side closes (a port
                                              forward); ack {bytes} whenever another MiB of the
                                              host's bytes has been written to the connection: the
                                              host sends at most ``window`` bytes ahead of it
    send {id of the connect, eof?} (body)  the host's bytes for that connection (no reply)
    egress {listen:[[addr, port, host]], hosts:[[addr, name]]}
                                           -> egress-ready {failed:[...]}, then, on the same id
                                              for as long as the agent runs, dial {conn, host,
                                              port} for each guest connection to a listener
                                              (sent again, same id, when the list changes)
    connect {conn}                         the host connected dial ``conn`` onward: as connect
                                              above, on the guest's own connection; an egress
                                              tunnel also replies eof when the guest half-closes
    refuse {conn, message}                 the host refused dial ``conn`` (no reply)
    anything wrong                         -> error {message, errno?}  (the channel lives on)

``type`` for a file's entry is one of file, dir, link, other; ``mode`` is the permission bits.
"""

from __future__ import annotations

import os
import struct
import time

TYPE_CHECKING = False  # typing costs an import on every `mvmctl exec`; annotations are strings
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024
MAX_HEADER = 64 * 1024
CHUNK = 1024 * 1024  # body size of one data/stdout frame or one write frame
MAX_TIMEOUT_S = 7 * 24 * 3600  # an exec timeout beyond this (or infinite) is a mistake, refused on both sides
_U32 = struct.Struct(">I")

# Headers are read and written with the json module's own C scanner and encoder, called as
# json.loads and json.dumps(separators=(",", ":")) call them, so the results are theirs. Why
# not json itself: its Python layer imports re and enum, over half of the agent's start under
# TCG (a guest's agent answers nothing until it has imported this). Anything the fast path
# does not take as it is (another encoding, bad JSON) goes to json, for json's own answer.
try:
    from _json import encode_basestring_ascii as _encode_ascii
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:  # another Python without json's C part: json itself
    _make_scanner = None


class _DecoderContext:
    """What json.JSONDecoder() hands its C scanner."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


if _make_scanner is not None:
    _scan = _make_scanner(_DecoderContext())

    def _dumps(header: dict[str, Any]) -> str:
        # A fresh encoder each time, as json.dumps does: its circular-reference marks start empty.
        return "".join(_make_encoder({}, _not_serializable, _encode_ascii, None, ":", ",", False, False,
                                     True)(header, 0))

    def _loads(raw: bytes) -> Any:
        # json.loads takes bytes in UTF-8, -16 or -32; one that starts with "{" and no NUL is UTF-8.
        if raw[:1] == b"{" and raw[1:2] != b"\0":
            try:
                text = raw.decode("utf-8", "surrogatepass")
                value, end = _scan(text, 0)
                if end == len(text) or not text[end:].strip(" \t\n\r"):
                    return value
            except Exception:  # noqa: BLE001, S110 -- json.loads says what is wrong (the C scanner reports
                pass  # errors through json.decoder, which may not be imported: a SystemError then)
        import json

        return json.loads(raw)
else:
    def _dumps(header: dict[str, Any]) -> str:
        import json

        return json.dumps(header, separators=(",", ":"))

    def _loads(raw: bytes) -> Any:
        import json

        return json.loads(raw)


class ProtocolError(Exception):
    """A frame that cannot be read; the peer gets an error reply and the channel lives on.

    ``frames`` holds the good frames decoded before the bad one in the same ``feed``.
    """

    frames: list[Frame] = []


class Frame:
    """One frame: its JSON header and raw body (``extra`` is for whoever holds it, never sent)."""

    __slots__ = ("body", "extra", "header")

    def __init__(self, header: dict[str, Any], body: bytes = b"", extra: dict[str, Any] | None = None) -> None:
        self.header = header
        self.body = body
        self.extra = {} if extra is None else extra

    def __repr__(self) -> str:
        return f"Frame(header={self.header!r}, body={self.body!r}, extra={self.extra!r})"

    def __eq__(self, other: object) -> bool:  # (and so unhashable, like the dataclass it was)
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.header, self.body, self.extra) == (other.header, other.body, other.extra)

    @property
    def type(self) -> str:
        return str(self.header.get("type", ""))

    @property
    def id(self) -> int | None:
        value = self.header.get("id")
        return value if isinstance(value, int) else None


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    raw = _dumps(header).encode()
    if len(raw) > MAX_HEADER:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
    length = _U32.size + len(raw) + len(body)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return _U32.pack(length) + _U32.pack(len(raw)) + raw + body


class Decoder:
    """Incremental: feed bytes as they arrive, get whole frames out.

    A frame that is too large or malformed raises ProtocolError after the decoder has skipped
    it (when its length is known), so the caller can reply with an error and keep reading.
    """

    __slots__ = ("_buf", "_skip")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0

    def feed_all(self, data: bytes) -> tuple[list[Frame], list[ProtocolError]]:
        """Every whole frame in the stream so far, and what was wrong with the bad ones."""
        frames: list[Frame] = []
        errors: list[ProtocolError] = []
        while True:
            try:
                return frames + self.feed(data), errors
            except ProtocolError as err:
                frames += err.frames
                errors.append(err)
                data = b""

    def feed(self, data: bytes) -> list[Frame]:
        """Whole frames; raises at a bad frame (after skipping it: feed b"" to go on)."""
        self._buf += data
        frames: list[Frame] = []
        try:
            return self._frames(frames)
        except ProtocolError as err:
            err.frames = frames
            raise

    def missing(self) -> int:
        """Bytes still to come before ``feed`` can return another frame (at least 1): a reader
        may ``stash`` what arrives until then instead of feeding it piece by piece."""
        if self._skip:
            return 1
        if len(self._buf) < _U32.size:
            return _U32.size - len(self._buf)
        (length,) = _U32.unpack_from(self._buf)
        if length > MAX_FRAME or length < _U32.size:
            return 1  # (feed reports it)
        return max(1, _U32.size + length - len(self._buf))

    def stash(self, data: bytes) -> None:
        """Keep ``data`` for the frame in progress without looking for frames (see missing)."""
        self._buf += data

    def _frames(self, frames: list[Frame]) -> list[Frame]:
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
                if self._skip:
                    return frames
            if len(self._buf) < _U32.size:
                return frames
            (length,) = _U32.unpack_from(self._buf)
            if length > MAX_FRAME or length < _U32.size:
                del self._buf[: _U32.size]
                self._skip = length if length <= MAX_FRAME * 16 else 0
                if self._skip == 0:
                    self._buf.clear()  # cannot find the next frame: drop what we have
                raise ProtocolError(f"frame length {length} out of range")
            if len(self._buf) < _U32.size + length:
                return frames
            view = memoryview(self._buf)  # (the body is copied once, straight out of the buffer)
            try:
                frame = _parse_at(view, _U32.size, _U32.size + length)
            finally:
                view.release()
                del self._buf[: _U32.size + length]
            frames.append(frame)


def _parse_at(buf: memoryview, start: int, end: int) -> Frame:
    """The frame whose payload is ``buf[start:end]`` (slices are never kept: ``buf`` is released)."""
    (header_len,) = _U32.unpack_from(buf, start)
    if header_len > MAX_HEADER or header_len > end - start - _U32.size:
        raise ProtocolError(f"header length {header_len} out of range")
    raw = bytes(buf[start + _U32.size : start + _U32.size + header_len])
    body = bytes(buf[start + _U32.size + header_len : end])
    try:
        header = _loads(raw)
    except (ValueError, RecursionError) as err:  # (RecursionError: a header nested thousands deep)
        raise ProtocolError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("header must be an object with a string 'type'")
    return Frame(header, body)


def hello(role: str, **info: Any) -> bytes:
    return encode({"type": "hello", "version": PROTOCOL_VERSION, "role": role, **info})


# The host's hello, byte for byte: the first thing the host sends on a connection, and again
# to an agent /init restarted. That agent may find the tail of a frame meant for the one that
# died on its channel (a virtio-serial port outlives its reader), so it reads nothing as a
# frame until these bytes (guest/agent/serve.py).
HOST_HELLO = hello("host")


IDENTITY_ID = 1  # the channel id of a clone's identity request (the host's first request)


def identity(hostname: str, *, resumed: bool) -> bytes:
    """A clone's identity request (guest/agent/identity.py): fresh entropy, the host's time, its
    own hostname and machine-id ("-": the same machine, resumed from disk, keeps its own)."""
    import uuid

    return encode({"type": "identity", "id": IDENTITY_ID, "entropy": os.urandom(64).hex(), "time": time.time(),
                   "hostname": hostname, "machine_id": "-" if resumed else uuid.uuid4().hex})


def error(request_id: int | None, message: str) -> bytes:
    return encode({"type": "error", "id": request_id, "message": message})
