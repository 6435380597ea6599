"""`mvmctl cp` (and the SDK's file copies): files and directories between the host and a VM.

What comes out of a guest is hostile: its names, modes, links and sizes were chosen by
whatever runs there. So a copy out keeps permission bits only (no setuid, setgid or sticky
bit, and the host's umask applies), never creates a device, a link that leads outside the
destination or a path that climbs out of it (member by member, so one bad entry is skipped
and named instead of failing the rest), and never writes through a symlink, in the archive or
already at the destination.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

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
    kind = guest_type(client, source)
    if kind == "dir":
        return _copy_dir_out(client, source, target)
    if kind not in ("file", "link"):  # (a device such as /dev/zero would never end)
        raise UsageError(f"{printable(source)} in the VM is not a regular file, a directory or a link to one",
                         "copy a file or a directory")
    umask = _umask()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        try:
            info = client.read_file(source, tmp.write, regular=True)
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
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file on the host; {printable(source)} in the VM is a directory",
                         "name a directory (or a path that does not exist yet) as the destination")
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
    """Unpack a tar stream made by the guest into ``target``; returns the members left out,
    each with why.

    Nothing here resolves a path the guest wrote: every member's directories are opened one
    component at a time from a descriptor of ``target`` with O_NOFOLLOW, so a symlink in the
    archive (or already there) is never passed through, whatever its length (tarfile's
    ``data`` filter checked with realpath, which long chains of links get past:
    CVE-2025-4517). Names that are absolute or hold ``..`` are refused; a member never
    replaces what is at its path; hard links, devices and FIFOs are not made; modes lose
    setuid/setgid/sticky and obey the umask. Symlinks are made last, and one whose target,
    followed link by link in what was unpacked, would lead out of ``target`` is removed."""
    skipped: list[str] = []
    links: list[tuple[list[str], str, str]] = []  # (path, target, the member's name)
    umask = _umask()
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with tarfile.open(fileobj=archive, mode="r|") as tar:
            for member in tar:
                parts, why = _member_parts(member.name)
                if why is None and not parts:
                    continue  # the destination itself ("."): it exists already
                if why is None and member.issym():
                    if member.linkname.startswith("/") or "\0" in member.linkname:
                        why = "a link to an absolute path (it would lead out of the copy)"
                    else:
                        links.append((parts, member.linkname, member.name))
                        continue
                if why is None:
                    why = _unless_os_error(_extract_member, tar, member, root, parts, umask)
                if why:
                    skipped.append(f"{member.name}: {why}")
        made: list[tuple[list[str], str, str]] = []
        try:
            for parts, linkname, name in links:
                why = _unless_os_error(_make_link, root, parts, linkname)
                if why:
                    skipped.append(f"{name}: {why}")
                else:
                    made.append((parts, linkname, name))
        finally:  # (each link made is checked, even if making the next failed or was interrupted)
            real_root = os.path.realpath(target)
            for parts, linkname, name in made:
                if not _stays_inside(real_root, parts):
                    _remove_link(root, parts)
                    skipped.append(f"{name}: a link that leads out of the copy ({linkname})")
    except (KeyError, ValueError, EOFError, RecursionError) as err:
        raise tarfile.ReadError(str(err)) from None
    finally:
        os.close(root)
    return skipped


def _unless_os_error(create: Callable[..., str | None], *args: Any) -> str | None:
    """One member's creation; a failure of it (a name too long, no such target) is that
    member's skip line, not the end of the copy. ENOSPC and the like end it."""
    try:
        return create(*args)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            raise
        return err.strerror or str(err)


def _member_parts(name: str) -> tuple[list[str], str | None]:
    """A member's path as components under the destination ([] for the destination itself)."""
    if name.startswith("/"):
        return [], "an absolute path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return [], "a path that climbs out of the copy (..)"
    if "\0" in name:
        return [], "a name with a NUL byte"
    return parts, None


def _open_parent(root: int, parts: list[str], make: bool) -> int:
    """A descriptor of the directory that holds ``parts[-1]``, walked from ``root`` without
    following any link (ELOOP/ENOTDIR if a component is one); missing ones are made (0700)."""
    fd = os.dup(root)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not make:
                    raise
                os.mkdir(part, 0o700, dir_fd=fd)
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


NOT_FOLLOWED = "a directory on its path is a link or a file (not followed)"


def _parent_of(root: int, parts: list[str]) -> int | None:
    """``_open_parent`` making what is missing; None if a component is a link or a file."""
    try:
        return _open_parent(root, parts, make=True)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            return None
        raise


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: int, parts: list[str],
                    umask: int) -> str | None:
    """Create one directory or file; returns why it was skipped, or None."""
    if member.islnk():
        return "hard links are not copied out"
    if not (member.isdir() or member.isreg()):
        return "not a file, directory or symlink"
    mode = (member.mode or 0) & PERMISSION_BITS & ~umask
    parent = _parent_of(root, parts)
    if parent is None:
        return NOT_FOLLOWED
    name = parts[-1]
    try:
        if member.isdir():
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            except OSError:
                return "something is already at that path"
            try:
                os.fchmod(fd, mode | 0o700)  # (we must still write into it)
            finally:
                os.close(fd)
            return None
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
        except FileExistsError:
            return "something is already at that path"
        with os.fdopen(fd, "wb") as out:
            source = tar.extractfile(member)
            assert source is not None
            while chunk := source.read(1 << 20):
                out.write(chunk)
            os.fchmod(out.fileno(), mode)
        return None
    finally:
        os.close(parent)


def _make_link(root: int, parts: list[str], linkname: str) -> str | None:
    parent = _parent_of(root, parts)
    if parent is None:
        return NOT_FOLLOWED
    try:
        os.symlink(linkname, parts[-1], dir_fd=parent)
    except FileExistsError:
        return "something is already at that path"
    finally:
        os.close(parent)
    return None


def _remove_link(root: int, parts: list[str]) -> None:
    try:
        parent = _open_parent(root, parts, make=False)
    except OSError:
        return
    try:
        if stat.S_ISLNK(os.lstat(parts[-1], dir_fd=parent).st_mode):
            os.unlink(parts[-1], dir_fd=parent)
    except OSError:
        pass
    finally:
        os.close(parent)


MAX_LINK_HOPS = 40  # as the kernel's


def _stays_inside(root: str, parts: list[str]) -> bool:
    """Whether the link at ``parts`` leads to a place inside ``root`` (or to nothing there),
    followed one component and one link at a time, by hand: no realpath, whose answer is not
    the kernel's once paths grow past PATH_MAX. Anything odd (a loop, a name too long) is
    taken as leading out."""
    todo = list(parts)
    where: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not where:
                return False
            where.pop()
            continue
        try:
            info = os.lstat(os.path.join(root, *where, part))
        except FileNotFoundError:
            where.append(part)  # (nothing below a missing name can be a link)
            continue
        except OSError:
            return False
        if not stat.S_ISLNK(info.st_mode):
            where.append(part)
            continue
        hops += 1
        try:
            target = os.readlink(os.path.join(root, *where, part))
        except OSError:
            return False
        if hops > MAX_LINK_HOPS or target.startswith("/"):
            return False
        todo = target.split("/") + todo
    return True


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
