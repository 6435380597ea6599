"""Backends: what each can do, and which one a VM runs on.

A backend turns an artifact into a running guest whose console is a pipe and whose agent
channel is a unix socket, so the supervisor and every client above it are the same on all
of them. Each declares its capabilities; a verb that needs one the VM's backend lacks is
refused before anything is done. ``select_backend`` walks the priority order
firecracker > qemu > docker unless one is named.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass

from mvm.core.errors import BackendUnavailable, UsageError

PRIORITY = ("firecracker", "qemu", "docker")
ALL_BACKENDS = ("qemu", "firecracker", "docker", "apple-container", "libkrun", "lima")


@dataclass(frozen=True)
class Capabilities:
    """What mvm can do with a VM on this backend (this version, not the hypervisor in theory)."""

    snapshots: bool
    pause_resume: bool
    vsock: bool
    tap_networking: bool
    port_forwarding: bool
    detach: bool
    console: bool
    isolation: str  # "microvm" or "container" (reduced: shares the host kernel)

    def as_dict(self) -> dict[str, bool | str]:
        return asdict(self)


CAPABILITIES: dict[str, Capabilities] = {
    "qemu": Capabilities(snapshots=False, pause_resume=True, vsock=False, tap_networking=False,
                         port_forwarding=True, detach=True, console=True, isolation="microvm"),
    "firecracker": Capabilities(snapshots=True, pause_resume=True, vsock=True, tap_networking=True,
                                port_forwarding=True, detach=True, console=True, isolation="microvm"),
    "docker": Capabilities(snapshots=False, pause_resume=True, vsock=False, tap_networking=False,
                           port_forwarding=True, detach=True, console=True, isolation="container"),
    "apple-container": Capabilities(snapshots=False, pause_resume=False, vsock=True, tap_networking=False,
                                    port_forwarding=True, detach=True, console=True, isolation="microvm"),
    "libkrun": Capabilities(snapshots=False, pause_resume=False, vsock=True, tap_networking=False,
                            port_forwarding=True, detach=True, console=True, isolation="microvm"),
    "lima": Capabilities(snapshots=False, pause_resume=False, vsock=False, tap_networking=False,
                         port_forwarding=True, detach=True, console=True, isolation="microvm"),
}

REDUCED_ISOLATION = ("docker runs the guest as a container: reduced isolation (it shares the host kernel), "
                     "not a microVM")


def require_capability(backend: str, capability: str, vm: str) -> None:
    """Refuse, before doing anything, a verb the VM's backend cannot serve."""
    if not getattr(CAPABILITIES[backend], capability):
        raise UsageError(f"VM {vm} runs on {backend}, which has no {capability.replace('_', '/')} "
                         "capability in this mvm version", "`mvmctl doctor` shows what each backend can do")


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def select_backend(requested: str | None, available: Callable[[str], tuple[bool, str]]) -> Choice:
    """The backend to use. ``available(name)`` says whether it can run here, and why (not)."""
    if requested and requested != "auto":
        if requested not in ALL_BACKENDS:
            raise UsageError(f"unknown hypervisor {requested!r}", f"use one of: auto, {', '.join(ALL_BACKENDS)}")
        ok, why = available(requested)
        if not ok:
            raise BackendUnavailable(f"{requested} is not available here: {why}",
                                     "`mvmctl doctor` lists every backend and what it needs")
        return Choice(requested, f"{requested} was asked for")
    passed = []
    for name in PRIORITY:
        ok, why = available(name)
        if ok:
            skipped = "; ".join(passed)
            return Choice(name, f"{name} is the first available in the order {' > '.join(PRIORITY)}"
                          + (f" ({skipped})" if skipped else ""))
        passed.append(f"{name}: {why}")
    raise BackendUnavailable("no backend can run a VM here: " + "; ".join(passed),
                             "run `mvmctl bootstrap` to install QEMU, or start dockerd")


ELSEWHERE = {
    "apple-container": "needs macOS 26+ on Apple Silicon",
    "libkrun": "needs libkrun and usable KVM, and is not supported by this mvm version",
    "lima": "needs limactl, and is not supported by this mvm version",
}


def availability(name: str, kvm_usable: Callable[[], bool | None]) -> tuple[bool, str]:
    """Whether ``name`` can start a VM here now, and why (not). Cheap checks first."""
    if name == "qemu":
        missing = [tool for tool in ("qemu-system-x86_64", "qemu-img") if shutil.which(tool) is None]
        if missing:
            return False, f"{' and '.join(missing)} not installed (run `mvmctl bootstrap`)"
        return True, "QEMU is installed (KVM when the probe boot works, else TCG)"
    if name == "docker":
        from mvm.runtime import docker

        ok, why = docker.daemon_status()
        return ok, f"{why}; {REDUCED_ISOLATION}" if ok else why
    if name == "firecracker":
        if shutil.which("firecracker") is None:  # decided without a KVM probe boot, or its imports
            return False, "no firecracker binary on PATH; not exercised on this host"
        from mvm.runtime import firecracker

        return firecracker.available(kvm_usable())
    if name in ELSEWHERE:
        return False, f"{ELSEWHERE[name]}; this host is {platform.system()} {platform.machine()}"
    return False, "unknown backend"
