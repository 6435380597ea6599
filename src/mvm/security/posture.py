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


class SecurityState(BaseModel):
    """doctor's security section: each fact checked now, or said to be unknown."""

    isolation: dict[str, str]  # backend -> microvm | container | ...
    qemu_seccomp_in_argv: bool | None  # `-sandbox on` in the argv mvm builds (None: no QEMU here)
    qemu_seccomp_running: list[dict[str, object]]  # per running QEMU VM: {vm, pid, seccomp} from /proc
    key: dict[str, object]  # {path, exists, mode, owner_ok, ok}
    audit: dict[str, object]  # {records, head_signed, last_verify}
    policy: dict[str, object]  # {files, rules} | {error}


class KernelState(BaseModel):
    """doctor's guest-kernel section: the default, and whether ours is built or could be."""

    default: str  # what an mvm.toml without `kernel` (kernel = "auto") boots on an x86_64 guest: mvm or debian
    ours: str | None  # the cached build of the current config (cache/kernels/<name>), if any
    ours_release: str | None
    build_needs_missing: list[str]  # packages to install before `mvmctl kernel build` can compile


class Posture(BaseModel):
    host: HostInfo
    kvm: KvmState
    backends: list[BackendReport]
    tools: list[ToolStatus]
    security: SecurityState | None = None
    kernels: KernelState | None = None

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
    return Posture(host=host_info(), kvm=kvm, backends=reports, tools=tools,
                   security=security_state(home, reports), kernels=kernel_state(home))


def kernel_state(home: MvmHome) -> KernelState:
    from mvm.build import kernel_source

    ours = kernel_source.cached_kernel(home)
    return KernelState(default=kernel_source.default_kernel(home), ours=ours.name if ours else None,
                       ours_release=ours.release if ours else None,
                       build_needs_missing=kernel_source.missing_build_needs())


def security_state(home: MvmHome, reports: list[BackendReport]) -> SecurityState:
    """Isolation per backend, QEMU's seccomp (asked of the kernel for running VMs), the host
    key's permissions, the audit chain's head and last verify, and the policy in force."""
    from mvm.security import admission, audit
    from mvm.security.host_key import KEY_FILE

    return SecurityState(
        isolation={r.name: str(r.capabilities.get("isolation")) for r in reports},
        qemu_seccomp_in_argv=_qemu_seccomp_in_argv(),
        qemu_seccomp_running=_running_seccomp(home),
        key=_key_state(home.keys / KEY_FILE),
        audit={"records": (audit.read_head(home) or {}).get("count"),
               "head_signed": _head_signed(home), "last_verify": audit.last_verify(home)},
        policy=_policy_state(home, admission),
    )


def _qemu_seccomp_in_argv() -> bool | None:
    from pathlib import Path

    from mvm.runtime.backends.qemu import QemuSpec

    try:
        argv = QemuSpec(kernel=Path("vmlinux"), initrd=Path("initrd"), root_disk=None).argv()
    except MvmError:  # no QEMU on this host
        return None
    return "-sandbox" in argv and argv[argv.index("-sandbox") + 1].startswith("on")


def _running_seccomp(home: MvmHome) -> list[dict[str, object]]:
    """Seccomp mode (2: a filter) of each running QEMU VM's process, from /proc/PID/status."""
    from mvm.core.state import VmRecord
    from mvm.runtime import lifecycle

    found: list[dict[str, object]] = []
    for record in lifecycle.list_vms(home):
        if not isinstance(record, VmRecord) or not record.running or record.accel not in ("kvm", "tcg"):
            continue
        mode = None
        try:
            with open(f"/proc/{record.qemu_pid}/status") as f:
                mode = next((line.split()[1] for line in f if line.startswith("Seccomp:")), None)
        except (OSError, TypeError):
            pass
        found.append({"vm": record.name, "pid": record.qemu_pid, "seccomp": mode == "2"})
    return found


def _key_state(path: object) -> dict[str, object]:
    import stat
    from pathlib import Path

    key = Path(str(path))
    try:
        info = key.lstat()
    except FileNotFoundError:
        return {"path": str(key), "exists": False, "ok": True, "mode": None}  # made on first use, 0600
    mode = stat.S_IMODE(info.st_mode)
    owner_ok = info.st_uid == os.geteuid()
    return {"path": str(key), "exists": True, "mode": f"{mode:o}", "owner_ok": owner_ok,
            "ok": owner_ok and not mode & 0o077 and stat.S_ISREG(info.st_mode)}


def _head_signed(home: MvmHome) -> bool | None:
    from mvm.security import audit
    from mvm.security.host_key import KEY_FILE, HostKey

    if audit.read_head(home) is None or not (home.keys / KEY_FILE).exists():
        return None
    try:
        return audit.read_head(home, HostKey.load(home.keys / KEY_FILE)) is not None
    except MvmError:
        return False


def _policy_state(home: MvmHome, admission: object) -> dict[str, object]:
    try:
        policy = admission.load(home.root)  # type: ignore[attr-defined]
    except MvmError as err:
        return {"files": [], "rules": [], "error": str(err)}
    return {"files": list(policy.files), "rules": [f"{r.name} = {r.value!r} ({r.where})" for r in policy.rules]}


