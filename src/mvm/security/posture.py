"""What this host can honestly do: the facts behind ``mvmctl doctor``.

Every claim here comes from a check made now (or from the KVM probe's cached verdict for
this host boot). A backend is ``available`` only when this mvm version supports it and its
prerequisites were found; ``tested_here`` says whether its program was actually run during
the check, and every reason says what is missing or what was verified.
"""

from __future__ import annotations

import os
import platform

import psutil
from pydantic import BaseModel, computed_field

from mvm.core.errors import MvmError
from mvm.core.state import MvmHome
from mvm.runtime import backends
from mvm.runtime.backends.base import BackendReport, HostFacts
from mvm.runtime.hosttools import ToolStatus, host_tools, os_release
from mvm.runtime.kvm import probe_kvm

KVM_DEVICE = "/dev/kvm"
PVM_MODULE = "/sys/module/kvm_pvm"
# doctor's order: the microVM backends this host might run, the fallback, then other hosts'.
DOCTOR_ORDER: tuple[str, ...] = ("qemu", "firecracker", "docker", "apple-container", "libkrun", "lima")


class HostInfo(BaseModel):
    os: str
    system: str
    kernel: str
    arch: str
    cpus: int
    memory_mib: int


class KvmState(BaseModel):
    """``usable`` is the probe's verdict: None when no probe boot has decided it."""

    device_present: bool
    accessible: bool
    pvm_hint: bool
    usable: bool | None
    reason: str
    boot_ms: int | None = None


class Posture(BaseModel):
    host: HostInfo
    kvm: KvmState
    backends: list[BackendReport]
    tools: list[ToolStatus]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def can_run_vm(self) -> bool:
        """At least one backend this version supports is available."""
        return any(b.supported and b.available for b in self.backends)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def can_build(self) -> bool:
        """Every tool the builder runs is present and usable."""
        return all(t.ok for t in self.tools if "builder" in t.needed_by)

    def backend(self, name: str) -> BackendReport:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)


def host_info() -> HostInfo:
    """OS, kernel, arch, CPUs and memory of this machine."""
    release = os_release()
    return HostInfo(
        os=release.get("PRETTY_NAME") or platform.platform(),
        system=platform.system(),
        kernel=platform.release(),
        arch=platform.machine(),
        cpus=os.cpu_count() or 1,
        memory_mib=psutil.virtual_memory().total // (1024 * 1024),
    )


def kvm_state(home: MvmHome, *, probe: bool = True) -> KvmState:
    """/dev/kvm presence and access checked directly; usability from the probe boot."""
    present = os.path.exists(KVM_DEVICE)
    accessible = present and os.access(KVM_DEVICE, os.R_OK | os.W_OK)
    pvm = os.path.exists(PVM_MODULE)
    usable: bool | None = None
    boot_ms: int | None = None
    try:
        verdict = probe_kvm(home, run_if_needed=probe)
    except NotImplementedError:
        reason = "probe not implemented"
    except MvmError as err:
        reason = f"probe failed: {err}"
    else:
        usable, reason, boot_ms = verdict.usable, verdict.reason, verdict.boot_ms
    if not present:
        usable, reason = False, f"no {KVM_DEVICE}"
    elif not accessible:
        usable = False
        reason = (
            f"{KVM_DEVICE} is not readable and writable by uid {os.getuid()} "
            "(add the user to the kvm group)"
        )
    return KvmState(
        device_present=present, accessible=accessible, pvm_hint=pvm,
        usable=usable, reason=reason, boot_ms=boot_ms,
    )


def host_posture(home: MvmHome, *, probe: bool = True) -> Posture:
    """Check this host now. ``probe=False`` uses only a cached KVM verdict, never boots."""
    tools = host_tools()
    kvm = kvm_state(home, probe=probe)
    facts = HostFacts(kvm_usable=kvm.usable, kvm_reason=kvm.reason, kvm_boot_ms=kvm.boot_ms, pvm_hint=kvm.pvm_hint,
                      tools={t.name: t for t in tools})
    reports = [backends.get(name).doctor(facts) for name in DOCTOR_ORDER]
    return Posture(host=host_info(), kvm=kvm, backends=reports, tools=tools)


