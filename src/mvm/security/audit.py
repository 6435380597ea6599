"""The audit chain: one signed JSON line per security-relevant action, under ``$MVM_HOME/audit/``.

Each line is ``{"entry": {...}, "prev_hash": "...", "signature": "..."}``: ``prev_hash`` is the
SHA-256 (hex) of the previous line's bytes (64 zeros for the first), ``signature`` is the host
key's Ed25519 signature (security/host_key.py) over the canonical JSON of ``{"entry",
"prev_hash"}``. So a line cannot be edited, removed, moved or added without breaking either
its own signature or the next line's ``prev_hash``, unless whoever does it holds the key.

The current segment is ``audit.jsonl``; at ``SEGMENT_BYTES`` it is renamed to
``audit.NNNNNN.jsonl`` and the chain goes on in a new ``audit.jsonl`` (its first line's
``prev_hash`` is the last line of the one before). Every entry carries its ``seq`` (1, 2, ...
across segments) and ``segment``, which is how `audit verify` tells a deletion from a swap.

Writers are many processes (every VM's supervisor, every mvmctl, SDK and MCP process), so an
append takes an exclusive ``flock`` on ``audit/lock``, reads the head, appends, fsyncs and
updates the head (``head.json``: segment, count, last hash, size, signed), all under the lock.
The head is a hint for speed that the writer checks against the file's size; `verify` uses
it only to see records cut off the end. Contents are never logged: stdout, stderr and file
bodies appear only as sizes and SHA-256 (they may hold secrets).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvm.core.errors import MvmError
from mvm.core.state import MvmHome
from mvm.runtime.client import current_surface

if TYPE_CHECKING:
    from mvm.security.host_key import HostKey

AUDIT_DIR = "audit"
CURRENT = "audit.jsonl"
HEAD = "head.json"
LOCK = "lock"
GENESIS = "0" * 64
SEGMENT_BYTES = 32 << 20  # a segment is rotated once it reaches this size
FORMAT_VERSION = 1
OFF_FOR_BENCHMARK = "MVM_AUDIT_OFF_FOR_BENCHMARK"  # benchmarks/run.py only; see docs/audit.md

_keys: dict[tuple[Path, int, int], HostKey] = {}  # one load per key file per process


class AuditError(MvmError):
    """The audit chain could not be written or read."""


def audit_dir(home: MvmHome) -> Path:
    return home.root / AUDIT_DIR


def segment_path(home: MvmHome, number: int) -> Path:
    """A rotated segment (the current one is always ``audit.jsonl``)."""
    return audit_dir(home) / f"audit.{number:06d}.jsonl"


def line_hash(line: bytes) -> str:
    """What the next line's ``prev_hash`` holds: SHA-256 of the line without its newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def host_key(home: MvmHome) -> HostKey:
    """The home's key, loaded once per process while its file stays the same one. (Imported
    here, not at the top: ``cryptography`` costs a process ~8 MiB, and a VM's supervisor
    imports this module but pays only once it appends.)"""
    from mvm.security.host_key import KEY_FILE, HostKey

    try:
        info = (home.keys / KEY_FILE).stat()
    except FileNotFoundError:
        return HostKey.load_or_create(home.keys)
    cache = (home.keys, info.st_ino, info.st_mtime_ns)
    key = _keys.get(cache)
    if key is None:
        key = _keys[cache] = HostKey.load_or_create(home.keys)
    return key


def key_id(public_hex: str) -> str:
    """A short name of a public key, kept in each entry so a line signed by another is named."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def new_record_id() -> str:
    return uuid.uuid4().hex


def utc_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(64).decode(errors="replace").strip()
    except OSError:
        return "?"


def self_actor() -> dict[str, Any]:
    """The calling process as an actor: for records written by mvmctl, the SDK or MCP."""
    return {"uid": os.getuid(), "pid": os.getpid(), "surface": current_surface(), "process": process_name(os.getpid())}


def disabled_for_benchmark() -> bool:
    return os.environ.get(OFF_FOR_BENCHMARK) == "1"


def append(home: MvmHome, entry: dict[str, Any], *, segment_bytes: int = SEGMENT_BYTES, durable: bool = True) -> str:
    """Append one record; returns its id. ``entry`` gets ``seq``, ``segment``, ``key`` (and
    ``id``/``time`` if missing) here, under the lock. Raises AuditError when it cannot.
    ``durable=False`` skips the fsync: only for making test data in bulk (benchmarks)."""
    try:
        return _append(home, entry, segment_bytes, durable)
    except OSError as err:
        raise AuditError(f"cannot append to the audit log in {audit_dir(home)}: {err.strerror or err}",
                         "check the directory's owner and free space; `mvmctl audit verify` checks the chain") from None


def _append(home: MvmHome, entry: dict[str, Any], segment_bytes: int, durable: bool) -> str:
    from mvm.security.host_key import canonical_json

    key = host_key(home)
    directory = audit_dir(home)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        segment, count, prev, size = _tail(home, key)
        current = directory / CURRENT
        if size >= segment_bytes:
            os.rename(current, segment_path(home, segment))
            segment, size = segment + 1, 0
        full = {"v": FORMAT_VERSION, "id": entry.get("id") or new_record_id(), "time": utc_time(time.time()),
                **entry, "seq": count + 1, "segment": segment, "key": key_id(key.public_hex)}
        signed = {"entry": full, "prev_hash": prev}
        line = canonical_json({**signed, "signature": key.sign(canonical_json(signed))}) + b"\n"
        fd = os.open(current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line)
            if durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        _write_head(directory, key, {"segment": segment, "count": count + 1, "last_hash": line_hash(line),
                                     "size": size + len(line)})
        return str(full["id"])
    finally:
        os.close(lock)  # (releases the flock)


def _write_head(directory: Path, key: HostKey, head: dict[str, Any]) -> None:
    """No fsync: the head is a hint, checked against the file's size by the next writer."""
    from mvm.security.host_key import canonical_json

    data = canonical_json({**head, "signature": key.sign(canonical_json(head))})
    tmp = directory / f".{HEAD}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, directory / HEAD)


def read_head(home: MvmHome, key: HostKey | None = None) -> dict[str, Any] | None:
    """The head, when it is there, well-formed and (given ``key``) signed by it; else None."""
    from mvm.security.host_key import canonical_json, verify

    try:
        head = json.loads((audit_dir(home) / HEAD).read_bytes()[:4096])
    except (OSError, ValueError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("signature"), str):
        return None
    body = {k: v for k, v in head.items() if k != "signature"}
    if not (isinstance(body.get("segment"), int) and isinstance(body.get("count"), int)
            and isinstance(body.get("last_hash"), str) and isinstance(body.get("size"), int)):
        return None
    if key is not None and not verify(key.public_hex, head["signature"], canonical_json(body)):
        return None
    return body


def _tail(home: MvmHome, key: HostKey) -> tuple[int, int, str, int]:
    """(segment, record count, hash of the last line, size of audit.jsonl): from the head when
    the file's size agrees with it, else from the last line itself."""
    current = audit_dir(home) / CURRENT
    try:
        size = current.stat().st_size
    except FileNotFoundError:
        size = -1
    head = read_head(home, key)
    if head is not None and head["size"] == size:
        return head["segment"], head["count"], head["last_hash"], size
    return _tail_from_files(home, size)


def _tail_from_files(home: MvmHome, size: int) -> tuple[int, int, str, int]:
    """The slow way (no head, or a stale one): the last whole line of the newest segment."""
    rotated = rotated_segments(home)
    segment = (max(rotated) + 1) if rotated else 1
    for path in ([audit_dir(home) / CURRENT] if size > 0 else []) + [segment_path(home, n) for n in
                                                                        sorted(rotated, reverse=True)]:
        last = last_line(path)
        if last is None:
            continue
        try:
            seq = json.loads(last)["entry"]["seq"]
        except (ValueError, KeyError, TypeError):
            seq = None
        if not isinstance(seq, int):
            raise AuditError(f"the last line of {path} is not an audit record, so the chain cannot go on from it",
                             "`mvmctl audit verify` says what is wrong; move the damaged log aside to start a new one")
        return segment, seq, line_hash(last), max(size, 0)
    return segment, 0, GENESIS, max(size, 0)


def rotated_segments(home: MvmHome) -> list[int]:
    numbers = []
    for path in audit_dir(home).glob("audit.*.jsonl"):
        middle = path.name[len("audit."):-len(".jsonl")]
        if middle.isdigit():
            numbers.append(int(middle))
    return sorted(numbers)


def last_line(path: Path) -> bytes | None:
    """The last newline-terminated line of ``path`` (a cut-off last line is skipped)."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            block = min(end, 1 << 16)
            f.seek(end - block)
            data = f.read(block)
    except FileNotFoundError:
        return None
    lines = data.split(b"\n")
    complete = lines[:-1]  # what follows the last newline is a cut-off line (or nothing)
    return complete[-1] if complete and complete[-1] else None


def record(home: MvmHome, *, operation: str, sealed: bool = False, actor: dict[str, Any] | None = None,
           record_id: str | None = None, **fields: Any) -> str | None:
    """Append a record of ``operation`` done by this process; returns its id.

    ``fields`` are the entry's (vm, artifact, backend, isolation, argv, paths, result,
    exit_status, duration_ms, detail, ...); None values are left out. When the append fails
    the action fails for a ``sealed`` image (AuditError) and is warned about otherwise:
    never dropped silently."""
    entry = {"id": record_id or new_record_id(), "operation": operation, "actor": actor or self_actor(),
             **{k: v for k, v in fields.items() if v is not None}}
    try:
        return append(home, entry)
    except (AuditError, MvmError) as err:
        if sealed:
            raise AuditError(f"{operation} refused: its audit record could not be written ({err})",
                             "fix the audit log; a sealed image's actions are never unrecorded") from None
        sys.stderr.write(f"mvmctl: warning: {operation} is not in the audit log: {err}\n")
        return None


def record_action(home: MvmHome, operation: str, *, name: str | None, image: Any = None, vm: Any = None,
                  started: float | None = None, error: BaseException | None = None, sealed: bool = False,
                  **fields: Any) -> str | None:
    """A record of a lifecycle action (up, run, down, forward, ...) done by this process:
    ``image`` is the BootImage and ``vm`` the VmRecord, when known; ``started`` is its
    ``time.monotonic()`` at the start; ``error`` is why it failed."""
    described: dict[str, Any] = {"vm": name} if name else {}
    if image is not None:
        described["artifact"] = image.key
    if vm is not None:
        described.update(vm_fields(vm))
    if error is not None:
        fields["detail"] = {**(fields.get("detail") or {}), "error": str(error)[:300]}
    return record(home, operation=operation, sealed=sealed, **described, **fields,
                  result="error" if error is not None else "ok",
                  duration_ms=None if started is None else round((time.monotonic() - started) * 1000, 3))


def vm_fields(record: Any) -> dict[str, Any]:
    """The entry's fields that describe a VM (a VmRecord): its name, artifact and backend."""
    from mvm.runtime import backends

    try:
        isolation = backends.get(record.backend).capabilities.isolation
    except MvmError:
        isolation = None
    return {"vm": record.name, "artifact": record.artifact_key, "backend": record.backend, "isolation": isolation}


LAST_VERIFY = "last-verify.json"


def save_last_verify(home: MvmHome, result: dict[str, Any]) -> None:
    """What the last `audit verify` found, for doctor (a hint: doctor says when it was made)."""
    try:
        path = audit_dir(home) / LAST_VERIFY
        tmp = path.with_name(f".{LAST_VERIFY}.{os.getpid()}")
        tmp.write_text(json.dumps({"time": utc_time(time.time()), **result}))
        os.replace(tmp, path)
    except OSError:
        pass


def last_verify(home: MvmHome) -> dict[str, Any] | None:
    try:
        data = json.loads((audit_dir(home) / LAST_VERIFY).read_text()[:4096])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
