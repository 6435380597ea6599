"""Where mvm keeps things: ``$MVM_HOME`` (default ``~/.mvm``).

    store/<key>/        built artifacts, content-addressed, never modified after the rename
    store/refs/<name>   the key of the newest successful build of a workload name
    store/stamps/<h>    the key that a workload's exact inputs built (build/stamps.py)
    cache/debs/         downloaded .deb files, named by Debian's file name, checked by sha256
    cache/kernels/      extracted kernels (vmlinux + modules) by kernel package version
    cache/host/         host facts worth keeping per host boot (the KVM probe verdict)
    vms/<name>/         one VM: record.json, mode.json, console.log, overlay.qcow2, ctl.sock,
                        agent.sock, supervisor.lock (held by its supervisor while it lives)
    vms/.<name>.lock    held by the `up` that is starting <name>, so two cannot race
    disks/<name>.ext4   a named VM's data disk (a directory, <name>.dir, on docker), kept across
                        `down`/`up` until `down --purge` or `prune --disks`
    snapshots/<tag>/    snapshots; manifest.json names the artifact each was taken from
    tmp/                scratch space of mvm's processes, <purpose>-<pid>-*: `prune` sweeps dead ones
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvm.core.errors import UsageError, VmError
from mvm.core.home import CTL_SOCKET, VMS_DIR, home_dir
from mvm.core.home import check_vm_name as check_vm_name  # callers import it from here too

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the NUL


def mvm_home() -> Path:
    return Path(home_dir())


@dataclass(frozen=True)
class MvmHome:
    root: Path

    @classmethod
    def default(cls) -> MvmHome:
        return cls(mvm_home())

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def refs(self) -> Path:
        return self.root / "store" / "refs"

    @property
    def stamps(self) -> Path:
        return self.root / "store" / "stamps"

    @property
    def debs(self) -> Path:
        return self.root / "cache" / "debs"

    @property
    def kernels(self) -> Path:
        return self.root / "cache" / "kernels"

    @property
    def host_cache(self) -> Path:
        return self.root / "cache" / "host"

    @property
    def vms(self) -> Path:
        return self.root / VMS_DIR

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def tmp(self) -> Path:
        """Scratch space of mvm's own processes (not the system /tmp), so leftovers are findable."""
        return self.root / "tmp"

    @property
    def disks(self) -> Path:
        """Named VMs' data disks, kept across `down`/`up` of the same name."""
        return self.root / "disks"

    def scratch(self, purpose: str) -> tempfile.TemporaryDirectory[str]:
        """A private scratch directory in tmp/, named ``<purpose>-<pid>-...``: removed when done,
        and if this process is killed first, `mvmctl prune` sees whose it was and that they are gone."""
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=f"{purpose}-{os.getpid()}-", dir=self.tmp)

    def vm(self, name: str) -> VmPaths:
        return VmPaths(self.vms / name)

    def name_lock(self, name: str) -> Path:
        return self.vms / f".{name}.lock"


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``path`` so readers see the old bytes or the new ones, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class VmPaths:
    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    record = property(lambda self: self.dir / "record.json")
    mode = property(lambda self: self.dir / "mode.json")
    console_log = property(lambda self: self.dir / "console.log")
    console_log_previous = property(lambda self: self.dir / "console.log.1")  # rotated out at its size cap
    overlay = property(lambda self: self.dir / "overlay.qcow2")
    data_disk = property(lambda self: self.dir / "data.ext4")
    ctl_socket = property(lambda self: self.dir / CTL_SOCKET)
    agent_socket = property(lambda self: self.dir / "agent.sock")
    qmp_socket = property(lambda self: self.dir / "qmp.sock")
    boot_socket = property(lambda self: self.dir / "boot.sock")  # QEMU: the boot markers' port
    channel_dir = property(lambda self: self.dir / "chan")  # docker: bind-mounted at /.mvm
    data_dir = property(lambda self: self.dir / "data")  # docker: bind-mounted at /data
    supervisor_lock = property(lambda self: self.dir / "supervisor.lock")
    supervisor_log = property(lambda self: self.dir / "supervisor.log")

    def check_socket_paths(self, backend_sockets: list[Path]) -> None:
        """The control socket and ``backend_sockets`` must fit a unix socket address."""
        longest = max(len(str(p)) for p in (self.ctl_socket, *backend_sockets))
        if longest > UNIX_PATH_MAX:
            raise UsageError(f"the VM's socket paths under {self.dir} are {longest} bytes, over the "
                             f"{UNIX_PATH_MAX}-byte unix socket limit", "use a shorter MVM_HOME or VM name")

    def supervisor_alive(self) -> bool:
        """True while a supervisor holds the lock; a dead one cannot (the kernel drops it)."""
        try:
            fd = os.open(self.supervisor_lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the lock if we just took it
        return False


@dataclass
class VmRecord:
    """What is known about one VM; the supervisor writes it, every command reconciles it."""

    name: str
    artifact_key: str
    artifact_name: str
    backend: str
    accel: str
    mode: str  # attached | detached
    vcpus: int
    memory_mib: int
    accessible: bool
    sealed: bool
    uids: dict[str, int]
    arch: str = "x86_64"  # the guest's CPU architecture (its image's; core/arch.py)
    state: str = "starting"  # starting | running | paused | stopped
    created_at: float = field(default_factory=time.time)
    supervisor_pid: int | None = None
    qemu_pid: int | None = None
    ready_at: float | None = None
    stopped_at: float | None = None
    stop_reason: str | None = None
    exit_status: int | None = None  # the entrypoint's, when it finished
    backend_id: str | None = None  # the backend's own name for it (docker: the container)
    backend_released: bool = False  # its backend resources are known to be gone
    markers: list[dict[str, Any]] = field(default_factory=list)  # {phase, args, guest_uptime, ms}
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {state, restarts, last_exit}
    forwards: list[dict[str, Any]] = field(default_factory=list)  # {host_addr, host_port, guest_port}
    argv: list[str] | None = None  # `run -- ARGV`: what runs instead of the image's entrypoint
    deadline: float | None = None  # time.time() at which its supervisor stops it (an SDK sandbox's lifetime)
    ephemeral: bool = False  # removed as soon as it stops (an SDK sandbox), instead of kept as "stopped"
    workload_id: str | None = None  # the SDK caller's label for it
    snapshot: str | None = None  # the tag of the snapshot it was cloned from
    restore_from: str | None = None  # that snapshot's directory: it starts from there, not by booting
    suspended: str | None = None  # stopped by `pause --to-disk`: the snapshot `resume` starts it from
    network: str = "deny"  # deny (no network device) | allow-list (egress checked by the host) | open
    allow: list[str] = field(default_factory=list)  # an allow-list VM's entries, as `mvmctl network` left them
    volumes: list[dict[str, Any]] = field(default_factory=list)  # runtime/volumes.py Mount: {host, guest, readonly, tag}
    policies: list[str] = field(default_factory=list)  # the `--policy` files it was admitted under (absolute)

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running", "paused")

    def save(self, paths: VmPaths) -> None:
        write_json_atomic(paths.record, asdict(self))

    @classmethod
    def load(cls, paths: VmPaths) -> VmRecord:
        """The record on disk; ValueError when it is not one (truncated, edited, garbage)."""
        data = json.loads(paths.record.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            record = cls(**known)
        except TypeError as err:  # a required field is missing
            raise ValueError(str(err).removeprefix("VmRecord.__init__() ")) from None
        record.check()
        return record

    def check(self) -> None:
        """Each field of the type the code relies on (the file may have been edited)."""
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"{name} is {type(value).__name__} {str(value)[:40]!r}")
        if self.state not in VM_STATES:
            raise ValueError(f"state {self.state[:40]!r} is not one of {', '.join(VM_STATES)}")
        if self.name != check_vm_name_quietly(self.name):
            raise ValueError(f"name {self.name[:40]!r} is not a VM name")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in self.uids.items()):
            raise ValueError("uids must map roles to numbers")
        if not all(isinstance(m, dict) and isinstance(m.get("ms"), int) and isinstance(m.get("phase"), str)
                   for m in self.markers):
            raise ValueError("markers are not {phase, ms, ...} objects")


VM_STATES = ("starting", "running", "paused", "stopped")
_OPTIONAL_INT = (int, type(None))
_OPTIONAL_NUMBER = (int, float, type(None))
_OPTIONAL_STR = (str, type(None))
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "artifact_key": (str,), "artifact_name": (str,), "backend": (str,), "accel": (str,),
    "mode": (str,), "vcpus": (int,), "memory_mib": (int,), "accessible": (bool,), "sealed": (bool,),
    "uids": (dict,), "arch": (str,), "state": (str,), "created_at": (int, float), "supervisor_pid": _OPTIONAL_INT,
    "qemu_pid": _OPTIONAL_INT, "ready_at": _OPTIONAL_NUMBER, "stopped_at": _OPTIONAL_NUMBER,
    "stop_reason": _OPTIONAL_STR, "exit_status": _OPTIONAL_INT, "backend_id": _OPTIONAL_STR,
    "backend_released": (bool,), "markers": (list,), "services": (dict,), "forwards": (list,),
    "argv": (list, type(None)), "deadline": _OPTIONAL_NUMBER, "ephemeral": (bool,),
    "workload_id": _OPTIONAL_STR, "snapshot": _OPTIONAL_STR, "restore_from": _OPTIONAL_STR,
    "suspended": _OPTIONAL_STR, "network": (str,), "allow": (list,), "policies": (list,),
}


def check_vm_name_quietly(name: str) -> str | None:
    try:
        return check_vm_name(name)
    except UsageError:
        return None


@dataclass(frozen=True)
class DamagedVm:
    """A VM directory whose record cannot be read: listed with why, removed by `down --force`."""

    name: str
    why: str
    state: str = "damaged"
    running: bool = False


class DamagedRecord(VmError):
    """The record of a VM cannot be read."""

    def __init__(self, damaged: DamagedVm) -> None:
        super().__init__(f"the record of VM {damaged.name} is damaged ({damaged.why})",
                         f"`mvmctl down --force {damaged.name}` removes it")
        self.damaged = damaged


def reconcile(paths: VmPaths) -> VmRecord | None:
    """The record, corrected if its supervisor is gone; None when there is no VM by that name.
    DamagedRecord when there is one but its record cannot be read."""
    try:
        record = VmRecord.load(paths)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DamagedRecord(DamagedVm(paths.name, str(err)[:200])) from None
    if record.name != paths.name:
        raise DamagedRecord(DamagedVm(paths.name, f"it names VM {record.name!r}"))
    if record.running and not paths.supervisor_alive():
        record.state = "stopped"
        record.stopped_at = record.stopped_at or time.time()
        record.stop_reason = f"its supervisor (pid {record.supervisor_pid}) died; QEMU went with it"
        record.save(paths)
    return record
