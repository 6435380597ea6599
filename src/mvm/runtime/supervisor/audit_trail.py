"""The supervisor's half of the audit chain (security/audit.py): every exec, console session
and file change or read that a client asks of the agent becomes one record, written when it
ends, and its id goes back to the client in the terminal reply (``receipt``), so
`mvmctl exec --receipt` and the SDK's ``receipt_id`` need no second round trip.

The supervisor is where these are written because it sees every client (SO_PEERCRED gives
the peer's pid and uid; the client says which surface it is, cli/sdk/mcp) and every reply,
whoever sent the request. What a process printed and what a file held are never logged:
only their sizes, and for files their SHA-256. The append (flock, write, fsync) runs in a
thread so that the other clients of the VM never wait on the disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvm.core import protocol
from mvm.core.state import MvmHome

if TYPE_CHECKING:
    from mvm.runtime.supervisor.clients import Reader
    from mvm.runtime.supervisor.supervisor import Supervisor

AUDITED = frozenset({"exec", "console", "write", "read", "remove", "mkdir", "rename"})
COUNTED = frozenset({"stdout", "stderr", "stdin", "data", "write"})  # frames whose bodies are sized
SURFACES = frozenset({"cli", "sdk", "mcp"})
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def peer_credentials(writer: Any) -> tuple[int | None, int | None]:
    """(pid, uid) of the process at the other end of a unix stream."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None, None
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


@dataclass
class Track:
    """One audited request while it runs: who asked, what, and what went by (sizes only)."""

    record_id: str
    operation: str
    actor: dict[str, Any]
    fields: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    sizes: dict[str, int] = field(default_factory=dict)
    digest: Any = None  # sha256 of a file's bytes, for read and write

    def count(self, kind: str, body: bytes) -> None:
        if kind not in COUNTED:
            return
        self.sizes[kind] = self.sizes.get(kind, 0) + len(body)
        if self.digest is not None:
            self.digest.update(body)

    def entry(self, reply: dict[str, Any], result: str | None = None) -> dict[str, Any]:
        detail: dict[str, Any] = {f"{k}_bytes": v for k, v in self.sizes.items()}
        if self.digest is not None and reply.get("type") == "done":
            detail["sha256"] = self.digest.hexdigest()
        if reply.get("type") == "exit":
            outcome = "timed-out" if reply.get("timed_out") else "ok"
            code, sig = reply.get("code"), reply.get("signal")
            exit_status = code if isinstance(code, int) else (128 + sig if isinstance(sig, int) else None)
        else:
            outcome = "error" if reply.get("type") == "error" else "ok"
            exit_status = None
            if reply.get("type") == "error":
                detail["error"] = str(reply.get("message"))[:300]
        return {"id": self.record_id, "operation": self.operation, "actor": self.actor, **self.fields,
                "result": result or outcome, "exit_status": exit_status,
                "duration_ms": round((time.monotonic() - self.started) * 1000, 3), "detail": detail}


class AuditTrail:
    def __init__(self, sup: Supervisor) -> None:
        from mvm.security import audit

        self.sup = sup
        self.audit = audit
        self.home = MvmHome(Path(sup.paths.dir).parent.parent)  # (a VM lives in $MVM_HOME/vms/<name>)
        # (the benchmark-only switch never turns off a sealed VM's audit: it is refused there)
        self.off = audit.disabled_for_benchmark() and not sup.record.sealed
        self.vm_fields = {"vm": sup.record.name, "artifact": sup.record.artifact_key, "backend": sup.record.backend,
                          "isolation": sup.backend.capabilities.isolation}

    def started(self) -> None:
        """When the audit is off (benchmarks only), the chain says so once, for this VM."""
        if self.off:
            self.write({"operation": "audit-off", "actor": self.audit.self_actor(), **self.vm_fields,
                        "result": "ok", "detail": {"why": f"{self.audit.OFF_FOR_BENCHMARK}=1 in its environment"}})

    def begin(self, owner: Reader, frame: protocol.Frame) -> Track | None:
        if self.off or frame.type not in AUDITED or not hasattr(owner, "peer"):
            return None
        header = frame.header
        surface = header.get("surface")
        pid, uid = owner.peer  # type: ignore[attr-defined]
        actor = {"uid": uid, "pid": pid, "surface": surface if surface in SURFACES else "unknown",
                 "process": self.audit.process_name(pid) if pid else "?"}
        if frame.type in ("exec", "console"):
            fields: dict[str, Any] = {"argv": _words(header.get("argv")), "cwd": _text(header.get("cwd")),
                                      "env_names": sorted(map(str, header["env"]))[:64]
                                      if isinstance(header.get("env"), dict) else None,
                                      "pty": bool(header.get("pty")) or frame.type == "console"}
        elif frame.type == "rename":
            fields = {"paths": [_text(header.get("src")), _text(header.get("dst"))]}
        else:
            fields = {"paths": [_text(header.get("path"))]}
            if frame.type == "remove":
                fields["recursive"] = bool(header.get("recursive"))
        track = Track(self.audit.new_record_id(), frame.type, actor,
                      {**self.vm_fields, **{k: v for k, v in fields.items() if v is not None}})
        if frame.type in ("read", "write"):
            track.digest = hashlib.sha256()
        return track

    async def action(self, client: Reader, operation: str, error: str | None = None) -> str | None:
        """A request the supervisor answers itself (pause, resume): recorded before the reply
        goes out. Returns None, or why the record could not be written (the caller fails the
        request on a sealed VM, see :meth:`refusal`)."""
        if self.off:
            return None
        pid, uid = getattr(client, "peer", (None, None))
        surface = getattr(client, "surface", None)
        entry = {"operation": operation, "actor": {"uid": uid, "pid": pid,
                                                   "surface": surface if surface in SURFACES else "unknown",
                                                   "process": self.audit.process_name(pid) if pid else "?"},
                 **self.vm_fields, "result": "error" if error else "ok"}
        if error:
            entry["detail"] = {"error": error[:300]}
        return await asyncio.to_thread(self.write, entry)

    def refusal(self, operation: str, failure: str | None) -> str | None:
        """The error to reply with when ``operation`` was done but not recorded on a sealed VM."""
        if failure is None or not self.sup.record.sealed:
            return None
        return (f"the {operation} was done but its audit record could not be written, which a sealed image "
                f"does not allow: {failure}")

    def finish(self, owner: Reader, track: Track, reply: dict[str, Any], body: bytes,
               result: str | None = None) -> None:
        """Write the record, then send ``reply`` (the request's terminal frame) with its id."""
        asyncio.get_running_loop().create_task(self._finish(owner, track, reply, body, result))

    async def _finish(self, owner: Reader, track: Track, reply: dict[str, Any], body: bytes,
                      result: str | None) -> None:
        failure = await asyncio.to_thread(self.write, track.entry(reply, result))
        if failure is None:
            reply = {**reply, "receipt": track.record_id}
        elif self.sup.record.sealed:
            reply = {"type": "error", "id": reply.get("id"),
                     "message": f"the {track.operation} ran but its audit record could not be written, which a "
                                f"sealed image does not allow: {failure}"}
            body = b""
        else:
            reply = {**reply, "audit_warning": failure}
        try:
            owner.send(protocol.encode(reply, body))
        except protocol.ProtocolError:
            owner.send(protocol.error(reply.get("id"), "the agent sent a reply too large to pass on"))

    def abandon(self, track: Track, why: str) -> None:
        """A request whose client went away (its process was killed) or whose VM stopped."""
        entry = track.entry({"type": "error", "message": why}, result="interrupted")
        try:
            asyncio.get_running_loop().run_in_executor(None, self.write, entry)
        except RuntimeError:  # no loop (the supervisor is ending): write it now
            self.write(entry)

    def write(self, entry: dict[str, Any]) -> str | None:
        """Append; returns None, or why it failed (also said in supervisor.log)."""
        try:
            self.audit.append(self.home, entry)
        except Exception as err:  # noqa: BLE001 - any failure is reported, never dropped silently
            print(f"mvm-supervisor: audit append failed: {err}", file=sys.stderr, flush=True)
            return str(err)[:300]
        return None


def _words(value: Any) -> list[str] | None:
    if isinstance(value, list):
        return [str(v)[:4096] for v in value[:256]]
    return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:4096]
