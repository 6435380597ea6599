"""Guest CPU architectures: the facts that differ between an x86_64 and an aarch64 guest.

One table, so the builder (Debian's architecture name, library directory, kernel package)
and the runtime (the boot budget, whether the host's CPU can run it natively) never compare
architecture names themselves. How QEMU runs each one is in runtime/backends/qemu_arch.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from mvm.core.errors import UsageError

GuestArchName = Literal["x86_64", "aarch64"]
DEFAULT_ARCH: GuestArchName = "x86_64"


@dataclass(frozen=True)
class GuestArch:
    """One guest architecture as Debian and the boot path see it."""

    name: str  # what mvm.toml's arch and `build --arch` say (uname -m in the guest)
    debian: str  # Debian's architecture name: the .debs' suffix, apt's APT::Architecture
    triplet: str  # the multiarch library directory (/lib/<triplet>)
    loader: str  # the dynamic loader's path in the guest
    kernel_metapackage: str  # Debian's cloud kernel for it
    # p50 ms from QEMU's start to agent-ready, per accelerator it can run under (artifact.json's
    # bootBudgetMs). aarch64 here is always emulated: no KVM for another architecture.
    boot_budget_ms: tuple[tuple[str, int], ...]


GUEST_ARCHES: dict[str, GuestArch] = {
    "x86_64": GuestArch(name="x86_64", debian="amd64", triplet="x86_64-linux-gnu", loader="/lib64/ld-linux-x86-64.so.2",
                        kernel_metapackage="linux-image-cloud-amd64",
                        boot_budget_ms=(("kvm", 300), ("tcg", 2500), ("container", 3000))),
    # Measured on the reference host (2 cores, docs/aarch64.md): p50 agent-ready 2.3-2.6 s under
    # TCG (no PIT calibration, no ACPI); the budget is about twice that, for a loaded machine.
    "aarch64": GuestArch(name="aarch64", debian="arm64", triplet="aarch64-linux-gnu",
                         loader="/lib/ld-linux-aarch64.so.1", kernel_metapackage="linux-image-cloud-arm64", boot_budget_ms=(("tcg", 5000),)),
}


_MACHINE_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def guest_arch(name: str) -> GuestArch:
    """The table entry for ``name``; a one-line error naming the ones mvm knows."""
    try:
        return GUEST_ARCHES[name]
    except KeyError:
        raise UsageError(f"guest architecture {name!r} is not one mvm builds",
                         f"use one of {', '.join(GUEST_ARCHES)}") from None


def host_arch() -> str:
    """The host CPU's architecture in mvm's spelling (``uname -m``, arm64 -> aarch64)."""
    machine = os.uname().machine.lower()
    return _MACHINE_ALIASES.get(machine, machine)


def is_native(name: str) -> bool:
    """Whether the host CPU runs this guest's code itself (KVM, a container) rather than only
    under emulation."""
    return name == host_arch()
