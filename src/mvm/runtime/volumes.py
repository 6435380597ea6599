"""Declared volumes: which host directories a VM may see, checked before anything starts.

A volume comes from mvm.toml's ``[[volumes]]`` or from ``up/run -v HOST:GUEST[:ro|rw]``. It
is read-only unless declared rw. The host path has its symlinks resolved first, then must be
an existing directory inside the workload's directory; ``/``, the user's home (or anything
above it) and anything outside the workload's directory are refused unless
``--allow-broad-mount``. ``$MVM_HOME`` (and anything inside or above it: keys, the audit chain,
other VMs) is refused always. The host side never reads what is in a volume.

How a backend shares it: virtiofs on QEMU (runtime/virtiofs.py), a bind mount on Docker.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from mvm.core.errors import UsageError

if TYPE_CHECKING:
    from mvm.core.bootimage import BootImage

MAX_VOLUMES = 8
GUEST_PATH_RE = re.compile(r"/[A-Za-z0-9._/+-]*")  # it travels on the kernel command line
# Guest paths that would hide what the guest needs to boot or what mvm puts there.
RESERVED_GUEST = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr",
                  "/.mvm", "/tmp", "/var")
BROAD_FIX = "share a directory inside the workload's directory, or pass --allow-broad-mount if you mean it"


@dataclass(frozen=True)
class VolumeRequest:
    """A volume as written: ``host`` may be relative (to ``base``) and may hold symlinks."""

    host: str
    guest: str
    readonly: bool = True
    origin: str = "-v"  # "-v" or "mvm.toml"


@dataclass(frozen=True)
class Mount:
    """A checked volume: ``host`` is the resolved directory; ``tag`` names it to the guest."""

    host: str
    guest: str
    readonly: bool
    tag: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Mount:
        return cls(str(data["host"]), str(data["guest"]), data.get("readonly") is not False, str(data["tag"]))


def parse_option(spec: str, base: Path | None = None) -> VolumeRequest:
    """``-v HOST:GUEST[:ro|rw]`` (HOST relative to ``base``, the current directory by default)."""
    fix = "write -v HOST:GUEST[:ro|rw], e.g. -v ./data:/data:ro"
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UsageError(f"-v {spec!r} is not HOST:GUEST[:ro|rw]", fix)
    access = parts[2] if len(parts) == 3 else "ro"
    if access not in ("ro", "rw"):
        raise UsageError(f"-v {spec!r}: {access!r} is neither ro nor rw", fix)
    host = os.path.normpath(os.path.join(base or Path.cwd(), os.path.expanduser(parts[0])))
    return VolumeRequest(host, parts[1], access == "ro", "-v")


def check_guest_path(path: str) -> str:
    fix = "mount it at a directory of its own, e.g. /data or /srv/input"
    if not GUEST_PATH_RE.fullmatch(path) or ".." in path.split("/"):
        raise UsageError(f"volume guest path {path!r} must be absolute, without '..', of letters, digits and ._/+-",
                         fix)
    normal = "/" + str(PurePosixPath(path)).lstrip("/")
    if normal == "/" or any(normal == r or normal.startswith(r + "/") for r in RESERVED_GUEST):
        raise UsageError(f"volume guest path {normal} would cover what the guest itself needs", fix)
    return normal


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def check_host_path(host: str, *, workload_dir: Path | None, mvm_home: Path, allow_broad: bool) -> str:
    """The resolved host directory, or UsageError saying why it may not be shared."""
    real = os.path.realpath(host)
    shown = host if real == os.path.normpath(host) else f"{host} (which resolves to {real})"
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise UsageError(f"volume host path {shown} does not exist", "create the directory first") from None
    except OSError as err:
        raise UsageError(f"volume host path {shown} cannot be read: {err.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"volume host path {shown} is not a directory", "share a directory")
    home = os.path.realpath(mvm_home)
    holds_home = _inside(real, home) or _inside(home, real)
    if not allow_broad:
        _refuse_broad(shown, real, workload_dir)
    if holds_home:
        raise UsageError(f"volume host path {shown} is or holds $MVM_HOME ({home}), which is never shared (keys, "
                         "audit, other VMs), not even with --allow-broad-mount", "share a directory of the workload's")
    return real


def _refuse_broad(shown: str, real: str, workload_dir: Path | None) -> None:
    if real == "/":
        raise UsageError(f"volume host path {shown} is the host's root directory", BROAD_FIX)
    user_home = os.path.realpath(os.path.expanduser("~"))
    if user_home != "/" and _inside(user_home, real):
        raise UsageError(f"volume host path {shown} is or holds your home directory {user_home}", BROAD_FIX)
    where = os.path.realpath(workload_dir) if workload_dir is not None else None
    if where is None or not _inside(real, where):
        raise UsageError(f"volume host path {shown} is outside the workload's directory "
                         f"{where or '(none: this start has no workload directory)'}", BROAD_FIX)


def resolve(requests: tuple[VolumeRequest, ...], *, workload_dir: Path | None, mvm_home: Path,
            allow_broad: bool = False) -> tuple[Mount, ...]:
    """Check every requested volume; the mounts in order, tagged mvm0, mvm1, ..."""
    if len(requests) > MAX_VOLUMES:
        raise UsageError(f"{len(requests)} volumes asked for; at most {MAX_VOLUMES}", "share fewer directories")
    mounts: list[Mount] = []
    for request in requests:
        guest = check_guest_path(request.guest)
        clash = [m for m in mounts if _inside(guest, m.guest) or _inside(m.guest, guest)]
        if clash:
            raise UsageError(f"volume guest path {guest} overlaps volume {clash[0].guest}",
                             "give each volume its own guest directory")
        host = check_host_path(request.host, workload_dir=workload_dir, mvm_home=mvm_home, allow_broad=allow_broad)
        mounts.append(Mount(host, guest, request.readonly, f"mvm{len(mounts)}"))
    return tuple(mounts)


def check_rw_owner(mounts: tuple[Mount, ...]) -> None:
    """An rw volume's files are created as its directory's owner (see runtime/virtiofs.py): one
    owned by root would make the guest's files root's on the host, so it is refused."""
    for mount in mounts:
        if not mount.readonly and os.stat(mount.host).st_uid == 0:
            raise UsageError(f"rw volume {mount.host} is owned by root: on qemu the guest's files there would be "
                             "root's on the host", f"chown it to an unprivileged user (e.g. `chown 1000: {mount.host}`)"
                                                   ", or share it ro")


def boot_words(mounts: tuple[Mount, ...]) -> str:
    """What /init reads from the kernel command line: ``mvm.vol=TAG,ro|rw,/guest/path`` each."""
    return " ".join(f"mvm.vol={m.tag},{'ro' if m.readonly else 'rw'},{m.guest}" for m in mounts)


def describe(mount: Mount) -> str:
    return f"{mount.host} -> {mount.guest} ({'ro' if mount.readonly else 'rw'})"


def declared_volumes(image: BootImage) -> tuple[VolumeRequest, ...]:
    """mvm.toml's [[volumes]] of ``image`` (host paths already absolute)."""
    return tuple(VolumeRequest(host, guest, readonly, "mvm.toml") for host, guest, readonly in image.volumes)


def workload_dir_of(project: str) -> Path:
    """The directory a project path names: itself, or an APP.py[:NAME]'s directory."""
    path = Path(project.split(":", 1)[0] if project.endswith(".py") or ".py:" in project else project)
    return path.parent if path.suffix == ".py" else path
