"""``sandbox.files``: the guest's files, read and written as the image's exec uid."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, overload

from mvm.errors import ModeError, UsageError, VmError
from mvm.runtime import transfer
from mvm.runtime.client import AgentError, VmClient
from mvm.sdk import record

if TYPE_CHECKING:
    from mvm.sdk.sandbox import Sandbox

LIST_DEPTH_MAX = 32  # files.list(depth=...)
LIST_LIMIT = 100_000  # entries one files.list returns at most


class Files:
    """``sandbox.files``: the guest's files, read and written as the image's exec uid."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @overload
    def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...
    @overload
    def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...
    @overload
    def read(self, path: str, *, format: Literal["stream"]) -> Iterator[bytes]: ...

    def read(self, path: str, *, format: Literal["text", "bytes", "stream"] = "text") -> str | bytes | Iterator[bytes]:
        """A guest file's contents: ``"text"`` (str), ``"bytes"``, or ``"stream"``: an iterator
        of byte chunks as they arrive (a file bigger than you want in memory). A missing file
        raises at the call, not at the first chunk; leaving a stream unfinished closes its
        connection."""
        if format not in ("text", "bytes", "stream"):
            raise UsageError(f"files.read(format={format!r}) is not a format", 'pass "text", "bytes" or "stream"')
        if format == "stream":
            return self._stream(path)
        buffer = io.BytesIO()
        with self._sandbox._client() as client:
            client.read_file(path, buffer.write)
        return buffer.getvalue().decode() if format == "text" else buffer.getvalue()

    def _stream(self, path: str) -> Iterator[bytes]:
        client = self._sandbox._client()
        try:
            frames = client.replies(client.send({"type": "read", "path": path}))
            first = next(frames)  # (an error reply raises here: a missing file is known at the call)
        except BaseException:
            client.close()
            raise

        def chunks() -> Iterator[bytes]:
            try:
                for frame in itertools.chain([first], frames):
                    if frame.type == "data":
                        yield frame.body
                    elif frame.type == "done":
                        return
                raise VmError(f"reading {path} in sandbox {self._sandbox.name} ended early")
            finally:
                client.close()
        return chunks()

    def write(self, path: str, data: str | bytes | BinaryIO, *, mode: int = 0o644) -> int:
        """Write a file (a temporary file renamed into place: never seen half written); returns its size."""
        source = data.encode() if isinstance(data, str) else data
        if self._sandbox._recording:
            raw = source if isinstance(source, bytes) else source.read()
            record.plan().add("write", self._sandbox.name, path=path, mode=mode, **record.file_fields(raw))
            return len(raw)
        with self._sandbox._client() as client:
            return client.write_file(path, source, mode=mode)

    def write_many(self, files: dict[str, str | bytes]) -> None:
        for path, data in files.items():
            self.write(path, data)

    def list(self, path: str, depth: int = 1) -> list[dict[str, Any]]:
        """Entries of a directory: name, path, type (file, dir, link, other), size, mode, mtime.
        ``depth`` > 1 goes that many levels into subdirectories (never through links), parents
        before their entries; at most LIST_LIMIT entries in all (the guest could make a tree
        without end), past which it raises."""
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= LIST_DEPTH_MAX:
            raise UsageError(f"files.list(depth={depth!r}): depth is a whole number from 1 to {LIST_DEPTH_MAX}")
        found: list[dict[str, Any]] = []
        with self._sandbox._client() as client:
            self._list_into(client, path.rstrip("/") or "/", depth, found)
        return found

    def _list_into(self, client: VmClient, path: str, depth: int, found: list[dict[str, Any]]) -> None:
        for entry in client.call("list", path=path)["entries"]:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                continue  # (not an entry a directory holds: a guest's lie)
            child = f"{path.rstrip('/')}/{name}"
            if len(found) >= LIST_LIMIT:
                raise UsageError(f"files.list({path!r}) in sandbox {self._sandbox.name} passed {LIST_LIMIT} entries",
                                 "list a narrower directory or a smaller depth")
            item = {**entry, "path": child}
            found.append(item)
            if depth > 1 and entry.get("type") == "dir":
                try:
                    self._list_into(client, child, depth - 1, found)
                except AgentError as err:  # (one the exec user may not read: said, not fatal)
                    item["error"] = str(err)

    def info(self, path: str) -> dict[str, Any]:
        with self._sandbox._client() as client:
            return dict(client.call("stat", path=path)["stat"])

    def exists(self, path: str) -> bool:
        try:
            self.info(path)
        except AgentError as err:
            if err.errno == "ENOENT":
                return False
            raise
        return True

    def remove(self, path: str, *, recursive: bool = False) -> None:
        if self._sandbox._recording:
            record.plan().add("remove", self._sandbox.name, path=path, recursive=recursive)
            return
        with self._sandbox._client() as client:
            client.call("remove", path=path, recursive=recursive)

    def rename(self, src: str, dst: str) -> None:
        if self._sandbox._recording:
            record.plan().add("rename", self._sandbox.name, src=src, dst=dst)
            return
        with self._sandbox._client() as client:
            client.call("rename", src=src, dst=dst)

    def make_dir(self, path: str) -> None:
        if self._sandbox._recording:
            record.plan().add("make_dir", self._sandbox.name, path=path)
            return
        with self._sandbox._client() as client:
            client.call("mkdir", path=path, parents=True)

    def copy_in(self, host_path: str | Path, guest_path: str) -> None:
        """Copy a host file or tree into the guest at ``guest_path``."""
        if self._sandbox._recording:
            raise ModeError(f"copy_in({str(host_path)!r}) on sandbox {self._sandbox.name}: a plan cannot carry a host "
                            "tree (it would be read when the plan runs, not when it was reviewed)",
                            "write its files with files.write (recorded with their bytes), or run in live mode")
        with self._sandbox._client() as client:
            transfer.copy_in(client, Path(host_path), guest_path)

    def copy_out(self, guest_path: str, host_path: str | Path) -> list[str]:
        """Copy a guest file or tree to the host, by the hostile-guest rules (README, "Threat
        model"); returns the entries left out, with why."""
        with self._sandbox._client() as client:
            return transfer.copy_out(client, guest_path, Path(host_path))
