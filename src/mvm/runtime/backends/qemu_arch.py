"""How QEMU runs a guest of each architecture: binary, machine, CPU, console, kernel arguments.

The one place the QEMU backend's command line differs by guest architecture (qemu.py asks
this table and compares no architecture names itself). Measured on the reference host:

- x86_64: ``-M microvm`` with the ELF vmlinux via PVH; see qemu.py's docstring.
- aarch64 (always TCG on an x86_64 host): ``-M virt`` finds the virtio-mmio devices through
  its device tree, the serial console is the PL011 (ttyAMA0). ``-cpu cortex-a57`` reaches the
  initramfs in ~1.9 s of wall time; ``-cpu max`` takes ~3 s (it emulates pointer
  authentication and more). There is no TSC, so no ``tsc_early_khz``. Snapshots and clones
  work as on x86 (RAM in a file-backed memory backend, ``-M virt,memory-backend=ram0``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mvm.core.errors import UsageError


@dataclass(frozen=True)
class QemuGuestArch:
    """The QEMU facts for one guest architecture."""

    binary: str
    package: str  # the Debian package that ships ``binary``
    machine: str  # -M (",memory-backend=ram0" is appended for a file-backed RAM)
    tcg_cpu: str | None  # -cpu under TCG (None: QEMU's default model, the fastest for x86)
    boot_args: str  # the kernel command line before mvm's own arguments
    tsc_early_khz: bool  # pass the host TSC frequency (x86 under TCG: stops PIT calibration hangs)


QEMU_GUEST_ARCHES: dict[str, QemuGuestArch] = {
    "x86_64": QemuGuestArch(
        binary="qemu-system-x86_64", package="qemu-system-x86", machine="microvm,isa-serial=on", tcg_cpu=None,
        boot_args=("console=ttyS0 quiet loglevel=3 tsc=reliable no_timer_check mitigations=off cryptomgr.notests "
                   "8250.nr_uarts=1 random.trust_cpu=on panic=-1"),
        tsc_early_khz=True),
    "aarch64": QemuGuestArch(
        binary="qemu-system-aarch64", package="qemu-system-arm", machine="virt", tcg_cpu="cortex-a57",
        boot_args="console=ttyAMA0 quiet loglevel=3 mitigations=off cryptomgr.notests random.trust_cpu=on panic=-1",
        tsc_early_khz=False),
}


def qemu_guest_arch(arch: str) -> QemuGuestArch:
    """The table entry for ``arch``; a one-line error for an architecture QEMU here cannot run."""
    try:
        return QEMU_GUEST_ARCHES[arch]
    except KeyError:
        raise UsageError(f"the QEMU backend cannot run {arch!r} guests",
                         f"build the image for one of {', '.join(QEMU_GUEST_ARCHES)}") from None
