"""Can this kernel and initramfs run mvm under Firecracker? Read from the kernel's config
(in its Debian package) and the initramfs's module list, before anything is started.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvm.core.bootimage import KERNEL_CONFIG_FILE, BootImage

MIN_ACPI_VERSION = (1, 8, 0)  # Firecracker describes virtio-mmio devices through ACPI from 1.8.0


# -- the guest kernel ---------------------------------------------------------------------


@dataclass(frozen=True)
class KernelOption:
    name: str
    accepted: tuple[str, ...]  # "y" built in, "m" a module the initramfs must load
    module: str | None  # that module's name (modules.order in the initramfs)
    why: str


KERNEL_REQUIREMENTS: tuple[KernelOption, ...] = (
    KernelOption("CONFIG_KVM_GUEST", ("y",), None, "kvm-clock timekeeping on x86_64"),
    KernelOption("CONFIG_BLK_DEV_INITRD", ("y",), None, "mvm boots through its initramfs"),
    KernelOption("CONFIG_SERIAL_8250_CONSOLE", ("y",), None, "ttyS0 carries the mvm-boot: markers"),
    KernelOption("CONFIG_VIRTIO_MMIO", ("y", "m"), "virtio_mmio", "every Firecracker device is virtio-mmio"),
    KernelOption("CONFIG_VIRTIO_BLK", ("y", "m"), "virtio_blk", "the root and data disks"),
    KernelOption("CONFIG_VSOCKETS", ("y", "m"), "vsock", "the agent channel is vsock"),
    KernelOption("CONFIG_VIRTIO_VSOCKETS_COMMON", ("y", "m"), "vmw_vsock_virtio_transport_common",
                 "the agent channel is vsock"),
    KernelOption("CONFIG_VIRTIO_VSOCKETS", ("y", "m"), "vmw_vsock_virtio_transport", "the agent channel is vsock"),
)
# How the guest finds the virtio-mmio devices: ACPI (DSDT, Firecracker >= 1.8.0; CONFIG_PCI is
# needed for the kernel's ACPI init even though Firecracker has no PCI by default) or the legacy
# virtio_mmio.device= kernel arguments Firecracker appends (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y).
DEVICE_DISCOVERY_ACPI = ("CONFIG_ACPI", "CONFIG_PCI")
DEVICE_DISCOVERY_CMDLINE = "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"
# Measured on Debian 12's linux-image-6.1.0-*-cloud-amd64 (the default artifact's kernel):
# ACPI=y, PCI=y, KVM_GUEST=y, VIRTIO_MMIO=m, VIRTIO_MMIO_CMDLINE_DEVICES off, X86_MPPARSE off,
# VSOCKETS/VIRTIO_VSOCKETS(_COMMON)=m. So it can only find devices through ACPI (Firecracker
# >= 1.8.0), and mvm's initramfs (build/kernel.py MODULES) does not carry the three vsock modules.


def check_kernel(config: dict[str, str] | None, initramfs_modules: list[str] | None,
                 firecracker_version: tuple[int, int, int] | None = None) -> list[str]:
    """What stops this kernel + initramfs from running mvm under Firecracker; [] when nothing known does.

    ``config`` is the kernel's .config as {option: value} (None: unknown, only modules are
    checked); ``initramfs_modules`` the initramfs's modules.order (None: unknown).
    """
    problems: list[str] = []
    for option in KERNEL_REQUIREMENTS:
        value = config.get(option.name) if config is not None else None
        if config is not None and value not in option.accepted:
            problems.append(f"{option.name}={value or 'n'} (needs {' or '.join(option.accepted)}: {option.why})")
            continue
        module_needed = option.module is not None and (value == "m" or config is None)
        if module_needed and initramfs_modules is not None and option.module not in initramfs_modules:
            built = f"{option.name}=m" if value == "m" else f"{option.name} unknown, unless built in"
            problems.append(f"the initramfs does not load {option.module}.ko ({built}: {option.why})")
    if config is not None:
        acpi = all(config.get(name) == "y" for name in DEVICE_DISCOVERY_ACPI)
        cmdline = config.get(DEVICE_DISCOVERY_CMDLINE) == "y"
        if not acpi and not cmdline:
            problems.append(f"{DEVICE_DISCOVERY_CMDLINE} is off and {'+'.join(DEVICE_DISCOVERY_ACPI)} are not both "
                            "built in: the guest cannot find Firecracker's virtio-mmio devices")
        elif not cmdline and firecracker_version is not None and firecracker_version < MIN_ACPI_VERSION:
            problems.append(f"{DEVICE_DISCOVERY_CMDLINE} is off, and Firecracker "
                            f"{'.'.join(map(str, firecracker_version))} predates ACPI device discovery "
                            f"({'.'.join(map(str, MIN_ACPI_VERSION))})")
    return problems


def parse_kernel_config(text: str) -> dict[str, str]:
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            config[name] = value.strip().strip('"')
    return config


def kernel_config_from_deb(deb: Path) -> dict[str, str] | None:
    """``/boot/config-*`` from a kernel .deb (an ar archive holding data.tar.*), stdlib only."""
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            return None
        while header := f.read(60):
            if len(header) < 60:
                return None
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    return None  # tarfile cannot read zstd; Debian 12's kernel uses xz
                member_file: Any = _Limited(f, size)
                with tarfile.open(fileobj=member_file, mode="r|*") as tar:
                    for member in tar:
                        if re.fullmatch(r"\./boot/config-.*", member.name) and member.isfile():
                            data = tar.extractfile(member)
                            return parse_kernel_config(data.read().decode()) if data else None
                return None
            f.seek(size + (size & 1), os.SEEK_CUR)
    return None


class _Limited:
    """A read-only view of the next ``size`` bytes of a file (one ar member)."""

    def __init__(self, f: Any, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def initramfs_modules(initrd: Path) -> list[str] | None:
    """modules.order of mvm's initramfs (an uncompressed newc cpio); None if it cannot be read."""
    try:
        data = initrd.read_bytes()
    except OSError:
        return None
    offset = 0
    while data[offset:offset + 6] == b"070701":
        fields = [int(data[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start:name_start + namesize - 1].decode(errors="replace")
        body_start = (name_start + namesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        if name.lstrip("./") == "modules.order":
            return data[body_start:body_start + size].decode().split()
        offset = (body_start + size + 3) & ~3
    return None


def artifact_kernel_config(image: BootImage) -> dict[str, str] | None:
    """The image's kernel config, from the kernel .deb (``linux-image-<kernelRelease>_*.deb``)
    in ``$MVM_HOME/cache/debs`` if it is still there; None when it is not."""
    own = image.path / KERNEL_CONFIG_FILE  # our kernel's config travels with the artifact
    if own.is_file():
        try:
            return parse_kernel_config(own.read_text())
        except (OSError, ValueError):
            return None
    home = image.path.parent.parent  # $MVM_HOME/store/<key>
    release = image.kernel_release
    for deb in sorted((home / "cache" / "debs").glob(f"linux-image-{release}_*.deb"), reverse=True):
        try:
            config = kernel_config_from_deb(deb)
        except (OSError, ValueError, EOFError, tarfile.TarError):
            continue
        if config is not None:
            return config
    return None


