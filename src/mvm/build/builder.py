"""IR -> artifact, in four phases: resolve, download, assemble, image.

The store key is a hash of everything that decides the bytes: the IR, the package lock, the
builder version and mvm's guest files. With a lock and an artifact under that key, a build is
a cache hit that touches neither apt nor the disk images.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mvm.build import apt_arch, image, kernel, kernel_source, packages, rootfs
from mvm.build.packages import DebCache, PackageLock
from mvm.build.stamps import BUILDER_VERSION, guest_sources_digest
from mvm.build.store import ArtifactStore
from mvm.core.arch import guest_arch
from mvm.core.artifact import Artifact, ArtifactHashes, ArtifactMeta, ArtifactUids
from mvm.core.bootimage import (
    ARTIFACT_FILE,
    DEBS_FILE,
    INITRD_FILE,
    KERNEL_CONFIG_FILE,
    KERNEL_FILE,
    ROOTFS_FILE,
)
from mvm.core.digest import sha256_file
from mvm.core.errors import BuildError
from mvm.core.state import MvmHome, write_atomic
from mvm.core.workdir import LOCK_FILE
from mvm.core.workload import Workload

IMAGE_EPOCH = 1704067200  # 2024-01-01: every timestamp in an image
ROOT_HEADROOM_MIB = 256  # free space in the writable root (sparse: costs no disk until used)
PHASES = ("resolve", "download", "kernel", "assemble", "image")  # kernel: only when building ours

Progress = Callable[[str, str], None]
"""progress(phase, detail): called when a phase starts, and with details as it goes."""


@dataclass
class BuildResult:
    artifact: Artifact
    cache_hit: bool
    lock_written: bool
    seconds: dict[str, float] = field(default_factory=dict)


def store_key(workload: Workload, lock: PackageLock) -> str:
    material = json.dumps({
        "builder": BUILDER_VERSION,
        "guest": guest_sources_digest(),
        "workload": json.loads(workload.canonical_json()),
        "lock": lock.model_dump(mode="json"),
        # ours is named by its config: a new config in the repository makes a new image
        **({"kernel": kernel_source.config_digest(workload.arch)} if workload.kernel == "mvm" else {}),
    }, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


def _quiet(phase: str, detail: str) -> None:
    pass


class Builder:
    """Builds workloads into ``home``'s store, sharing its package and kernel caches."""

    def __init__(self, home: MvmHome, progress: Progress = _quiet) -> None:
        self.home = home
        self.store = ArtifactStore(home)
        self.debs = DebCache(home.debs)
        self.progress = progress

    def build(self, workload: Workload, manifest_dir: Path, *, no_cache: bool = False,
              lock_path: Path | None = None) -> BuildResult:
        """``lock_path``: the workload's package lock (core.workdir.lock_file); by default
        mvm.lock in ``manifest_dir``."""
        seconds: dict[str, float] = {}
        workload = self.settle_kernel(workload)
        with self._phase("resolve", "reading mvm.lock", seconds):
            lock_path = lock_path or manifest_dir / LOCK_FILE
            lock, lock_is_new = self._lock_for(workload, lock_path)
            key = store_key(workload, lock)
            existing = self.store.get(key)
        if existing is not None and not no_cache:
            self.store.set_ref(workload.name, key)
            if lock_is_new:  # resolved afresh to what an earlier build already made
                write_atomic(lock_path, lock.dump())
            return BuildResult(existing, cache_hit=True, lock_written=lock_is_new, seconds=seconds)

        with self._phase("download", f"{len(lock.all_debs())} packages", seconds):
            target = guest_arch(lock.arch)
            if self.debs.missing(lock.all_debs()):
                apt_arch.ensure_lists(target, self.home)
            self.debs.ensure(lock.all_debs(), apt_arch.state_options(target, self.home))

        with self.store.staging(key) as scratch:
            own_kernel = None
            if workload.kernel == "mvm":
                with self._phase("kernel", "mvm's own kernel", seconds):
                    own_kernel = kernel_source.ensure_kernel(self.home, workload.arch, self.progress)
            with self._phase("assemble", "unpacking packages", seconds):
                guest_kernel = kernel.prepare_kernel(self.debs.path(lock.kernel), lock.kernel, self.home.kernels)
                meta = self._meta(workload, lock, key, guest_kernel.release)
                if own_kernel is not None:
                    meta.kernel_release = own_kernel.release
                    meta.kernel = {"name": "mvm", "build": own_kernel.name, "configDigest": own_kernel.config_digest,
                                   "source": own_kernel.source}
                else:
                    meta.kernel = {"name": "debian", "package": lock.kernel.filename}
                owners = rootfs.stage_root(scratch / "root", [self.debs.path(d) for d in lock.packages],
                                           [self.debs.path(d) for d in lock.setpriv], workload, meta.to_json())
                # After staging and pruning, so it compiles the final sources (extra files too).
                self.progress("assemble", "compiling the guest's Python bytecode")
                rootfs.compile_python(scratch / "root", workload.arch)
                if own_kernel is None:
                    rootfs.stage_initramfs(scratch / "initramfs", scratch / "root" / "bin" / "busybox", guest_kernel)

            with self._phase("image", "writing rootfs.ext4", seconds):
                out = scratch / "artifact"
                out.mkdir()
                image.normalize_times(scratch / "root", IMAGE_EPOCH)
                image.make_ext4(scratch / "root", out / ROOTFS_FILE, uuid=str(uuid.UUID(key[:32])),
                                epoch=IMAGE_EPOCH, headroom_mib=ROOT_HEADROOM_MIB, owners=owners)
                if own_kernel is None:
                    image.make_initramfs(scratch / "initramfs", out / INITRD_FILE, IMAGE_EPOCH)
                    _link_or_copy(guest_kernel.vmlinux, out / KERNEL_FILE)
                else:  # every driver built in: no initramfs; its config goes along (doctor, Firecracker's check)
                    _link_or_copy(own_kernel.vmlinux, out / KERNEL_FILE)
                    _link_or_copy(own_kernel.directory / "config", out / KERNEL_CONFIG_FILE)
                meta.hashes = ArtifactHashes(vmlinux=sha256_file(out / KERNEL_FILE),
                                             initrd=sha256_file(out / INITRD_FILE) if own_kernel is None else None,
                                             rootfs=sha256_file(out / ROOTFS_FILE))
                (out / ARTIFACT_FILE).write_text(meta.to_json())
                (out / DEBS_FILE).write_text("".join(f"{deb.filename}\n" for deb in lock.all_debs()))
                artifact = self.store.commit(out, key)

        # Only a build that produced an artifact moves the name and writes the lock.
        self.store.set_ref(workload.name, key)
        if lock_is_new:
            write_atomic(lock_path, lock.dump())
        return BuildResult(artifact, cache_hit=False, lock_written=lock_is_new, seconds=seconds)

    @contextmanager
    def _phase(self, name: str, detail: str, seconds: dict[str, float]) -> Iterator[None]:
        """Time a phase, report it, and turn OS errors inside it into a BuildError naming it."""
        self.progress(name, detail)
        started = time.monotonic()
        try:
            yield
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise BuildError(name, f"no space left on the device holding {self.home.root}",
                                 "free disk space (or point MVM_HOME elsewhere) and build again") from None
            raise BuildError(name, f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")) from None
        seconds[name] = time.monotonic() - started

    def settle_kernel(self, workload: Workload) -> Workload:
        """``kernel = "auto"`` made concrete for this home, so the key and the artifact name the
        kernel the image really boots."""
        if workload.kernel != "auto":
            return workload
        return workload.model_copy(update={"kernel": kernel_source.default_kernel(self.home, workload.arch)})

    def _lock_for(self, workload: Workload, lock_path: Path) -> tuple[PackageLock, bool]:
        """The lock beside mvm.toml if it covers these packages; else a fresh resolution."""
        wanted = packages.requested_packages(workload.packages)
        if workload.kernel == "mvm" and workload.arch not in kernel_source.BUILT_ARCHES:
            raise BuildError("resolve", f"mvm's own kernel has no {workload.arch} configuration (only "
                             f"{', '.join(kernel_source.BUILT_ARCHES)})",
                             f'use kernel = "debian" (Debian\'s cloud kernel) for an {workload.arch} guest')
        if lock_path.is_file():
            lock = PackageLock.load(lock_path)
            if lock.requested == wanted and lock.arch == workload.arch:
                return lock, False
            self.progress("resolve", "packages or architecture changed since mvm.lock; resolving again")
        else:
            self.progress("resolve", f"resolving {len(wanted)} {workload.arch} packages with apt")
        return packages.resolve(workload.packages, self.home, workload.arch), True

    def _meta(self, workload: Workload, lock: PackageLock, key: str, release: str) -> ArtifactMeta:
        budget = dict(guest_arch(workload.arch).boot_budget_ms)  # this architecture's own
        return ArtifactMeta(
            key=key, name=workload.name, builder_version=BUILDER_VERSION,
            accessible=workload.accessible, sealed=workload.sealed,
            entrypoint_kind=workload.entrypoint.kind,
            uids=ArtifactUids(agent=workload.uids.agent, entrypoint=workload.uids.entrypoint),
            rootless_entrypoint=workload.uids.entrypoint != 0,
            agent_binary="real", expected_boot_ms=max(budget.values()), boot_budget_ms=budget,
            kernel_release=release,
            vcpus=workload.vcpus, memory_mib=workload.memory_mib, data_disk_bytes=workload.data_disk_bytes,
            packages=lock.packages, workload=workload,
        )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


__all__ = ["Builder", "BuildResult", "BuildError", "PHASES", "LOCK_FILE", "store_key"]
