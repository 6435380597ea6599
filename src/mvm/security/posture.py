"""What this host can honestly do: the facts behind ``mvmctl doctor``.

Every claim here comes from a check made now (or from the KVM probe's cached verdict for
this host boot). A backend is ``available`` only when this mvm version supports it and its
prerequisites were found; ``tested_here`` says whether its program was actually run during
the check, and every reason says what is missing or what was verified.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import shutil
import stat

import psutil
from pydantic import BaseModel, computed_field

from mvm.core.errors import MvmError
from mvm.core.state import MvmHome
from mvm.runtime import docker
from mvm.runtime.backend import CAPABILITIES, REDUCED_ISOLATION
from mvm.runtime.hosttools import ToolStatus, host_tools, os_release
from mvm.runtime.kvm import probe_kvm

KVM_DEVICE = "/dev/kvm"
PVM_MODULE = "/sys/module/kvm_pvm"
DOCKER_SOCKET = "/var/run/docker.sock"
NOT_EXERCISED = "not exercised on this host"

# Backends this mvm version can start VMs with. A backend joins when its runtime lands;
# until then doctor still reports its prerequisites but never calls it available.
SUPPORTED_BACKENDS: frozenset[str] = frozenset({"qemu", "docker", "firecracker"})
BACKEND_NAMES: tuple[str, ...] = (
    "qemu", "firecracker", "docker", "apple-container", "libkrun", "lima",
)


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


class BackendStatus(BaseModel):
    name: str
    supported: bool
    available: bool
    tested_here: bool
    reason: str
    accel: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def capabilities(self) -> dict[str, bool | str]:
        """What mvm can do with a VM on it (see runtime/backend.py)."""
        return CAPABILITIES[self.name].as_dict()


class Posture(BaseModel):
    host: HostInfo
    kvm: KvmState
    backends: list[BackendStatus]
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

    def backend(self, name: str) -> BackendStatus:
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


def _kvm_phrase(kvm: KvmState) -> str:
    if kvm.usable:
        return "KVM usable"
    if kvm.usable is False:
        return f"KVM not usable ({kvm.reason})"
    hint = "; kvm_pvm loaded, nested PVM KVM usually cannot boot a guest" if kvm.pvm_hint else ""
    return f"KVM not verified ({kvm.reason}{hint})"


def _kvm_short(kvm: KvmState) -> str:
    """For backends other than qemu: the KVM section of the report carries the details."""
    if kvm.usable:
        return "KVM usable"
    return "KVM not usable" if kvm.usable is False else "KVM not verified"


def _unsupported(name: str) -> str:
    return "not supported by this mvm version yet" if name not in SUPPORTED_BACKENDS else ""


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _qemu(tools: dict[str, ToolStatus], kvm: KvmState) -> BackendStatus:
    system, img = tools["qemu-system-x86_64"], tools["qemu-img"]
    supported = "qemu" in SUPPORTED_BACKENDS
    # The version check executes the binary, so a found-and-ok tool has run here.
    ran = system.ok
    broken = [f"{t.name}: {t.problem}" for t in (system, img) if not t.ok]
    if broken:
        return BackendStatus(
            name="qemu", supported=supported, available=False, tested_here=ran,
            reason=_join(*broken, _unsupported("qemu"), "" if ran else NOT_EXERCISED),
        )
    if kvm.usable:
        accel = "kvm"
        why = "accel kvm: the probe booted a guest under KVM" + (
            f" in {kvm.boot_ms} ms" if kvm.boot_ms is not None else ""
        )
    else:
        accel = "tcg"
        why = (
            f"accel tcg (software emulation, slower) because {_kvm_phrase(kvm)}; "
            "doctor boots no guest under TCG"
        )
    return BackendStatus(
        name="qemu", supported=supported, available=supported, tested_here=True, accel=accel,
        reason=_join(
            f"qemu-system-x86_64 {system.version or '(version unknown)'} and qemu-img run "
            "(version check)",
            why,
            _unsupported("qemu"),
        ),
    )


def _firecracker(kvm: KvmState) -> BackendStatus:
    missing: list[str] = []
    if platform.system() != "Linux":
        missing.append(f"needs Linux, this host is {platform.system()}")
    if not kvm.usable:
        missing.append(f"needs usable KVM ({_kvm_short(kvm)})")
    binary = shutil.which("firecracker")
    if binary is None:
        missing.append("needs a `firecracker` binary on PATH (none found)")
    supported = "firecracker" in SUPPORTED_BACKENDS
    found = f"firecracker at {binary}" if binary and not missing else ""
    return BackendStatus(
        name="firecracker", supported=supported, available=supported and not missing,
        tested_here=False,
        reason=_join(*missing, found, _unsupported("firecracker"), NOT_EXERCISED),
    )


def _docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    return host.removeprefix("unix://") if host.startswith("unix://") else DOCKER_SOCKET


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _docker() -> BackendStatus:
    cli = shutil.which("docker")
    ok, why = docker.daemon_status()
    return BackendStatus(
        name="docker", supported=True, available=ok, tested_here=cli is not None,
        reason=_join(
            REDUCED_ISOLATION,
            f"docker CLI at {cli}" if cli else "",
            f"daemon socket {_docker_socket()}: {why}",
        ),
    )


def _apple_container() -> BackendStatus:
    system, arch = platform.system(), platform.machine()
    here = f"this host is {system} {arch}"
    if system == "Darwin":
        here = f"this host is macOS {platform.mac_ver()[0] or '?'} {arch}"
    return BackendStatus(
        name="apple-container", supported="apple-container" in SUPPORTED_BACKENDS,
        available=False, tested_here=False,
        reason=_join(
            "needs macOS 26+ on Apple Silicon", here, _unsupported("apple-container"),
            NOT_EXERCISED,
        ),
    )


def _libkrun(kvm: KvmState) -> BackendStatus:
    lib = ctypes.util.find_library("krun")
    return BackendStatus(
        name="libkrun", supported="libkrun" in SUPPORTED_BACKENDS,
        available=False, tested_here=False,
        reason=_join(
            "needs libkrun (libkrun.so) and usable KVM",
            f"found {lib}" if lib else "libkrun not found",
            _kvm_short(kvm),
            _unsupported("libkrun"),
            NOT_EXERCISED,
        ),
    )


def _lima() -> BackendStatus:
    limactl = shutil.which("limactl")
    return BackendStatus(
        name="lima", supported="lima" in SUPPORTED_BACKENDS,
        available=False, tested_here=False,
        reason=_join(
            "needs `limactl`",
            f"found {limactl}" if limactl else "limactl not on PATH",
            _unsupported("lima"),
            NOT_EXERCISED,
        ),
    )


def host_posture(home: MvmHome, *, probe: bool = True) -> Posture:
    """Check this host now. ``probe=False`` uses only a cached KVM verdict, never boots."""
    tools = host_tools()
    by_name = {t.name: t for t in tools}
    kvm = kvm_state(home, probe=probe)
    backends = [
        _qemu(by_name, kvm),
        _firecracker(kvm),
        _docker(),
        _apple_container(),
        _libkrun(kvm),
        _lima(),
    ]
    return Posture(host=host_info(), kvm=kvm, backends=backends, tools=tools)


