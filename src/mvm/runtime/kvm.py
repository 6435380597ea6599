"""Is KVM usable here? Only a real boot can tell.

On some hosts /dev/kvm exists but cannot run an ordinary guest (nested PVM KVM: the guest
crawls, then dies with an emulation failure). So the probe boots the cached kernel with a
tiny initramfs under KVM and waits a few seconds for a marker. The verdict is cached per host
boot (``/proc/sys/kernel/random/boot_id``) in ``cache/host/kvm-probe.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mvm.core.state import MvmHome


@dataclass(frozen=True)
class KvmProbe:
    """``usable`` is None when no probe could run (no /dev/kvm access, no kernel cached yet)."""

    device_present: bool
    pvm_hint: bool
    usable: bool | None
    reason: str
    boot_ms: int | None = None


def probe_kvm(home: MvmHome, *, run_if_needed: bool = True) -> KvmProbe:
    """The cached verdict for this host boot, or a fresh probe boot when ``run_if_needed``."""
    raise NotImplementedError("filled in by the QEMU runtime work")
