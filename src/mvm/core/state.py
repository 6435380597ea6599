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

from mvm.core.errors import UsageError
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
    overlay = property(lambda self: self.dir / "overlay.qcow2")
    data_disk = property(lambda self: self.dir / "data.ext4")
    ctl_socket = property(lambda self: self.dir / CTL_SOCKET)
    agent_socket = property(lambda self: self.dir / "agent.sock")
    qmp_socket = property(lambda self: self.dir / "qmp.sock")
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

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running", "paused")

    def save(self, paths: VmPaths) -> None:
        write_json_atomic(paths.record, asdict(self))

    @classmethod
    def load(cls, paths: VmPaths) -> VmRecord:
        data = json.loads(paths.record.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def reconcile(paths: VmPaths) -> VmRecord | None:
    """The record, corrected if its supervisor is gone; None when there is no VM by that name."""
    try:
        record = VmRecord.load(paths)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        raise UsageError(f"the record of VM {paths.name} is damaged ({err})", f"remove it with `mvmctl down {paths.name}`") from None
    if record.running and not paths.supervisor_alive():
        record.state = "stopped"
        record.stopped_at = record.stopped_at or time.time()
        record.stop_reason = f"its supervisor (pid {record.supervisor_pid}) died; QEMU went with it"
        record.save(paths)
    return record
