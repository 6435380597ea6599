"""Where mvm keeps things: ``$MVM_HOME`` (default ``~/.mvm``).

    store/<key>/        built artifacts, content-addressed, never modified after the rename
    store/refs/<name>   the key of the newest successful build of a workload name
    cache/debs/         downloaded .deb files, named by Debian's file name, checked by sha256
    cache/kernels/      extracted kernels (vmlinux + modules) by kernel package version
    cache/host/         host facts worth keeping per host boot (the KVM probe verdict)
    vms/<name>/         one VM's record, overlay, console log, sockets
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def mvm_home() -> Path:
    return Path(os.environ.get("MVM_HOME") or Path.home() / ".mvm")


@dataclass(frozen=True)
class MvmHome:
    root: Path

    @classmethod
    def default(cls) -> "MvmHome":
        return cls(mvm_home())

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def refs(self) -> Path:
        return self.root / "store" / "refs"

    @property
    def debs(self) -> Path:
        return self.root / "cache" / "debs"

    @property
    def kernels(self) -> Path:
        return self.root / "cache" / "kernels"

    @property
    def host_cache(self) -> Path:
        return self.root / "cache" / "host"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    def vm_dir(self, name: str) -> Path:
        return self.vms / name


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``path`` so readers see the old bytes or the new ones, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
