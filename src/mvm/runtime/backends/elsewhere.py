"""Backends of other hosts that this mvm version cannot start VMs with: named so that
`mvmctl doctor` reports what each needs and `--hypervisor NAME` is refused with the reason
instead of a usage error.
"""

from __future__ import annotations

import ctypes.util
import platform
import shutil

from mvm.runtime.backends.base import (
    NOT_EXERCISED,
    BackendReport,
    Capabilities,
    Host,
    HostFacts,
    VmBackend,
    join_reasons,
)

UNSUPPORTED = "not supported by this mvm version yet"


def _this_host() -> str:
    system, arch = platform.system(), platform.machine()
    if system == "Darwin":
        return f"this host is macOS {platform.mac_ver()[0] or '?'} {arch}"
    return f"this host is {system} {arch}"


class UnsupportedBackend(VmBackend):
    """Never available: ``needs`` says what it would take."""

    supported = False
    needs: str

    def availability(self, host: Host) -> tuple[bool, str]:
        return False, f"{self.needs}, and is not supported by this mvm version; {_this_host()}"

    def found(self, facts: HostFacts) -> list[str]:
        """What the host has of what it needs, for doctor."""
        return []

    def doctor(self, facts: HostFacts) -> BackendReport:
        return self.report(False, False,
                             join_reasons(self.needs, *self.found(facts), UNSUPPORTED, NOT_EXERCISED))


class AppleContainerBackend(UnsupportedBackend):
    name = "apple-container"
    process_label = "Apple's container runtime"
    needs = "needs macOS 26+ on Apple Silicon"
    capabilities = Capabilities(snapshots=False, pause_resume=False, vsock=True, tap_networking=False,
                                port_forwarding=True, detach=True, console=True, isolation="microvm")

    def availability(self, host: Host) -> tuple[bool, str]:
        return False, f"{self.needs}; {_this_host()}"

    def found(self, facts: HostFacts) -> list[str]:
        return [_this_host()]


class LibkrunBackend(UnsupportedBackend):
    name = "libkrun"
    process_label = "libkrun"
    needs = "needs libkrun (libkrun.so) and usable KVM"
    capabilities = Capabilities(snapshots=False, pause_resume=False, vsock=True, tap_networking=False,
                                port_forwarding=True, detach=True, console=True, isolation="microvm")

    def found(self, facts: HostFacts) -> list[str]:
        lib = ctypes.util.find_library("krun")
        return [f"found {lib}" if lib else "libkrun not found", facts.kvm_short()]


class LimaBackend(UnsupportedBackend):
    name = "lima"
    process_label = "Lima"
    needs = "needs `limactl`"
    capabilities = Capabilities(snapshots=False, pause_resume=False, vsock=False, tap_networking=False,
                                port_forwarding=True, detach=True, console=True, isolation="microvm")

    def found(self, facts: HostFacts) -> list[str]:
        limactl = shutil.which("limactl")
        return [f"found {limactl}" if limactl else "limactl not on PATH"]
