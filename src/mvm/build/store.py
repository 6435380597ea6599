"""The content-addressed artifact store.

An artifact directory is written under a temporary name and renamed into ``store/<key>``
only when complete, so the store never holds half an artifact, and an artifact is never
changed once there. ``store/refs/<name>`` names the newest good build of a workload; it
moves only after a build succeeds, so a failed build leaves the previous artifact in use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from mvm.core.artifact import ARTIFACT_FILE, Artifact
from mvm.core.bootimage import INITRD_FILE, KERNEL_FILE, ROOTFS_FILE
from mvm.core.errors import UsageError
from mvm.core.state import MvmHome, write_atomic

STAGING_PREFIX = ".staging-"


class ArtifactStore:
    def __init__(self, home: MvmHome) -> None:
        self.root = home.store
        self.refs = home.refs

    def get(self, key: str) -> Artifact | None:
        """The artifact stored under ``key``; None when there is none, or it is damaged (a file
        missing, or artifact.json unreadable), so the build makes it again and replaces it."""
        path = self.root / key
        if not all((path / name).is_file() for name in (ARTIFACT_FILE, KERNEL_FILE, ROOTFS_FILE)):
            return None
        try:
            artifact = Artifact.load(path)
        except (OSError, ValueError):  # (pydantic's ValidationError is a ValueError)
            return None
        if artifact.meta.workload.kernel != "mvm" and not (path / INITRD_FILE).is_file():
            return None  # (our kernel needs no initramfs; Debian's does)
        return artifact

    def by_name(self, name: str) -> Artifact | None:
        ref = self.refs / name
        if not ref.is_file():
            return None
        return self.get(ref.read_text().strip())

    def require(self, name: str) -> Artifact:
        artifact = self.by_name(name)
        if artifact is None:
            raise UsageError(f"no built image named {name!r}", "run `mvmctl build` in its directory first")
        return artifact

    def set_ref(self, name: str, key: str) -> None:
        write_atomic(self.refs / name, key + "\n")

    @contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A scratch directory beside the store; removed unless :meth:`commit` took it."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_staging()
        path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{key[:12]}-", dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, staged: Path, key: str) -> Artifact:
        """Move a finished artifact directory into place (replacing one a --no-cache build redid)."""
        final = self.root / key
        if final.exists():
            old = self.root / f"{STAGING_PREFIX}{os.getpid()}-old-{key[:12]}"
            os.rename(final, old)
            os.rename(staged, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, final)
        return Artifact.load(final)

    def remove_stale_staging(self) -> None:
        """Staging left by a build that was killed (its pid is gone)."""
        for entry in self.root.glob(f"{STAGING_PREFIX}*"):
            try:
                pid = int(entry.name[len(STAGING_PREFIX):].split("-", 1)[0])
            except ValueError:
                continue
            if not psutil.pid_exists(pid):
                shutil.rmtree(entry, ignore_errors=True)
