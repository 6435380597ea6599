"""The guest kernel: Debian's cloud kernel, unpacked once and cached.

``-M microvm`` boots an ELF ``vmlinux`` directly (PVH), which is faster than the bzImage.
Debian ships only the bzImage, whose payload is an LZ4 (legacy format) stream starting at
the magic bytes ``02 21 4c 18``: decompressing that stream gives the ELF. The virtio drivers
are modules in this kernel, so the few we need are kept beside it for the initramfs.

Debian's arm64 cloud kernel ships its ``vmlinuz`` as a plain arm64 ``Image`` (an EFI stub,
uncompressed; QEMU's ``-kernel`` takes it as it is); a gzip-compressed one is unpacked. Its
virtio drivers are modules with the same names, virtio_mmio among them (``modules.builtin``
has none of them), so the same list is loaded in the same order.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mvm.core.artifact import LockedPackage
from mvm.core.errors import BuildError

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
ELF_MAGIC = b"\x7fELF"
ARM64_IMAGE_MAGIC = b"ARM\x64"  # at offset 0x38 of an arm64 Image (Documentation/arm64/booting.rst)
GZIP_MAGIC = b"\x1f\x8b"
# Load order matters: the transport and ring before the drivers, failover before virtio_net.
MODULES = (
    "virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console", "virtio-rng",
    "failover", "net_failover", "virtio_net",
    # Firecracker's agent channel is virtio-vsock (QEMU here uses virtio-serial instead).
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
)
# virtiofs for volumes (QEMU): loaded by the initramfs only when the command line names a
# volume (mvm.vol=), so a boot without one does not pay for fuse.ko (400 KB).
VOLUME_MODULES = ("fuse", "virtiofs")


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel in the cache: ``vmlinux`` and ``modules/<name>.ko``."""

    directory: Path
    release: str

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def modules(self) -> Path:
        return self.directory / "modules"


def prepare_kernel(deb_path: Path, deb: LockedPackage, cache: Path) -> Kernel:
    """Unpack ``deb`` into ``cache/<version>-<sha>`` unless it is already there."""
    # The module list is part of the name: a new list must not reuse an old extraction.
    modules = hashlib.sha256(" ".join(MODULES + VOLUME_MODULES).encode()).hexdigest()[:8]
    directory = cache / f"{deb.name}_{deb.version}_{deb.sha256[:12]}_{modules}"
    if (directory / "release").is_file():
        return Kernel(directory, (directory / "release").read_text().strip())
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kernel-", dir=cache))
    try:
        release = _unpack(deb_path, staging)
        (staging / "release").write_text(release + "\n")
        try:
            os.rename(staging, directory)
        except OSError:  # another build unpacked it first
            shutil.rmtree(staging)
        return Kernel(directory, release)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _unpack(deb_path: Path, out: Path) -> str:
    (out / "modules").mkdir()
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb_path)], stdout=subprocess.PIPE)
    wanted = {f"{m}.ko" for m in MODULES + VOLUME_MODULES}
    release = None
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if re.fullmatch(r"\./boot/vmlinuz-.*", member.name) and member.isfile():
                release = base[len("vmlinuz-"):]
                bzimage = tar.extractfile(member)
                assert bzimage is not None
                _write_vmlinux(bzimage.read(), out / "vmlinux")
            elif base in wanted and member.isfile() and "/kernel/" in member.name:
                data = tar.extractfile(member)
                assert data is not None
                (out / "modules" / base).write_bytes(data.read())
    if proc.wait() != 0:
        raise BuildError("assemble", f"cannot read {deb_path.name}", "delete it from the cache and build again")
    missing = sorted(wanted - {p.name for p in (out / "modules").iterdir()})
    if release is None or missing:
        raise BuildError("assemble", f"{deb_path.name} lacks {'the kernel image' if release is None else missing}",
                         "this kernel package is not the Debian cloud kernel mvm expects")
    return release


def _write_vmlinux(bzimage: bytes, out: Path) -> None:
    """The kernel QEMU boots fastest: the ELF inside an x86 bzImage, or an arm64 Image."""
    if bzimage.startswith(GZIP_MAGIC):
        import zlib

        try:
            bzimage = zlib.decompress(bzimage, wbits=31)
        except zlib.error as err:
            raise BuildError("assemble", f"the kernel image is a damaged gzip stream ({err})",
                             "delete the kernel package from the cache and build again") from None
    if bzimage[0x38:0x3C] == ARM64_IMAGE_MAGIC:
        out.write_bytes(bzimage)
        return
    start = bzimage.find(LZ4_LEGACY_MAGIC)
    if start < 0:
        raise BuildError("assemble", "the kernel image has no LZ4 payload", "use Debian's cloud kernel")
    try:
        proc = subprocess.run(["lz4", "-d", "-c"], input=bzimage[start:], capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise BuildError("assemble", "decompressing the kernel did not finish within 120 s") from None
    # lz4 complains about the bytes after the stream (the bzImage trailer) but has written it all.
    if not proc.stdout.startswith(ELF_MAGIC):
        raise BuildError("assemble", f"decompressing the kernel failed: {proc.stderr.decode().strip()}",
                         "run `mvmctl bootstrap` to install lz4")
    out.write_bytes(proc.stdout)
