"""`mvmctl cp` (and the SDK's file copies): files and directories between the host and a VM.

What comes out of a guest is hostile: its names, modes, links and sizes were chosen by
whatever runs there. So a copy out keeps permission bits only (no setuid, setgid or sticky
bit, and the host's umask applies), never creates a device, a link that leads outside the
destination or a path that climbs out of it (tarfile's ``data`` filter, member by member, so
one bad entry is skipped and named instead of failing the rest), and never writes through a
symlink already at the destination.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from mvm.core.errors import UsageError, VmError
from mvm.core.home import check_vm_name
from mvm.runtime.client import AgentError, VmClient

PERMISSION_BITS = 0o777


def split_vm_path(spec: str) -> tuple[str | None, str]:
    """``NAME:/path`` -> (NAME, /path); a host path -> (None, path)."""
    head, sep, tail = spec.partition(":")
    if sep and "/" not in head and head:
        if not tail.startswith("/"):
            raise UsageError(f"{printable(spec)}: the guest path must be absolute",
                             f"write {printable(head)}:/{printable(tail)}")
        return check_vm_name(head), tail
    return None, spec


def guest_type(client: VmClient, path: str) -> str:
    return str(client.call("stat", path=path)["stat"].get("type"))


def copy_in(client: VmClient, source: Path, dest: str) -> None:
    """Host file or directory -> guest path; modes are kept."""
    if source.is_dir():
        with tempfile.TemporaryFile() as archive:
            with tarfile.open(fileobj=archive, mode="w") as tar:
                tar.add(source, arcname=".")
            archive.seek(0)
            result = client.exec(["/bin/sh", "-c", 'mkdir -p -- "$1" && exec tar -x -p -f - -C "$1"', "sh", dest],
                                 stdin=archive.read())
        if result.exit_status != 0:
            raise VmError(f"unpacking into {dest} failed: {result.stderr.decode(errors='replace').strip()[:500]}")
        return
    if not source.is_file():
        raise UsageError(f"{source}: no such file or directory on the host")
    try:
        if guest_type(client, dest) == "dir":
            dest = str(PurePosixPath(dest) / source.name)
    except AgentError:
        pass
    with source.open("rb") as f:
        client.write_file(dest, f, mode=source.stat().st_mode & 0o7777)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_symlink(target: Path) -> None:
    if target.is_symlink():
        raise UsageError(f"{target} is a symlink: mvm does not copy out of a VM through one",
                         "remove it, or name another destination")


def copy_out(client: VmClient, source: str, dest: Path) -> list[str]:
    """Guest file or directory -> host path, with permission bits only. Returns what was
    skipped (one line each), for the caller to show."""
    target = dest / PurePosixPath(source).name if dest.is_dir() and not dest.is_symlink() else dest
    _refuse_symlink(target)
    if guest_type(client, source) == "dir":
        return _copy_dir_out(client, source, target)
    umask = _umask()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        try:
            info = client.read_file(source, tmp.write)
            tmp.flush()
            mode = info.get("mode")
            mode = mode if isinstance(mode, int) and not isinstance(mode, bool) else 0o644
            os.chmod(tmp.name, mode & PERMISSION_BITS & ~umask)
            os.replace(tmp.name, target)  # (replaces a name; never follows one)
        except BaseException:
            os.unlink(tmp.name)
            raise
    return []


def _copy_dir_out(client: VmClient, source: str, target: Path) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as archive:
        result = client.exec(["tar", "-c", "-f", "-", "-C", source, "."], stdout=archive.write)
        if result.exit_status != 0:
            raise VmError(f"packing {source} failed: {result.stderr.decode(errors='replace').strip()[:500]}")
        archive.seek(0)
        try:
            return extract_safely(archive, target)
        except tarfile.TarError as err:
            raise VmError(f"the guest's archive of {source} is not one tar can read: {err}") from None
        except OSError as err:
            raise VmError(f"writing what {source} holds into {target} failed: {err}") from None


def extract_safely(archive: BinaryIO, target: Path) -> list[str]:
    """Unpack a tar stream made by the guest into ``target``. Each member goes through tarfile's
    ``data`` filter (no absolute paths, nothing outside ``target``, no devices, links that stay
    inside) and is then created here, not by tarfile: a member never replaces or follows what
    is already at its path, hard links are not made, and modes lose setuid/setgid/sticky and
    obey the umask. Returns the members left out, each with why."""
    skipped: list[str] = []
    umask = _umask()
    dest = os.path.realpath(target)
    try:
        with tarfile.open(fileobj=archive, mode="r|") as tar:
            for member in tar:
                why = _extract_member(tar, member, dest, umask)
                if why:
                    skipped.append(f"{member.name}: {why}")
    except (KeyError, ValueError, EOFError, RecursionError) as err:
        raise tarfile.ReadError(str(err)) from None
    return skipped


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: str, umask: int) -> str | None:
    """Create one member under ``dest``; returns why it was skipped, or None."""
    try:
        member = tarfile.data_filter(member, dest)
    except tarfile.FilterError as err:
        return str(err)
    path = os.path.join(dest, member.name)
    if os.path.normpath(path) == dest:
        return None  # the destination itself ("."): it exists already
    if member.islnk():
        return "hard links are not copied out"
    mode = (member.mode or 0) & PERMISSION_BITS & ~umask
    if os.path.lexists(path) and not (member.isdir() and os.path.isdir(path) and not os.path.islink(path)):
        return "something is already at that path"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if member.isdir():
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode | 0o700)  # (we must still write into it)
    elif member.issym():
        os.symlink(member.linkname, path)
    elif member.isreg():
        source = tar.extractfile(member)
        assert source is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
            os.fchmod(out.fileno(), mode)
    else:
        return "not a file, directory or symlink"
    return None


def describe_skipped(skipped: list[str]) -> list[str]:
    """Lines for the user about entries a copy out left behind."""
    return [f"skipped {printable(line)}" for line in skipped]


def printable(text: str) -> str:
    """A guest-chosen name made safe for a terminal: control characters shown escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def file_mode_text(mode: object, kind: object) -> str:
    """``ls -l``'s mode column for an entry the guest described (its fields may be anything)."""
    types = {"dir": stat.S_IFDIR, "link": stat.S_IFLNK, "file": stat.S_IFREG}
    bits = mode if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o7777 else 0
    return stat.filemode(types.get(kind, 0) | bits) if isinstance(kind, str) else stat.filemode(bits)
