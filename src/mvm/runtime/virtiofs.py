"""virtiofsd for one QEMU volume: started jailed, tied to the supervisor's life.

QEMU 7.2's C virtiofsd (``/usr/lib/qemu/virtiofsd``) has no read-only option and no uid
mapping, and run as plain root it would let guest root create root-owned (even setuid) files
on the host. So each daemon is started in a user namespace and a mount namespace of its own:

- uid/gid map: the workload's uid (and gid) in the guest is the shared directory's owner on
  the host, guest root is ``nobody`` (65534); every other guest uid is unmapped, and virtiofsd
  cannot act as it (a create as such a uid fails). A setuid file the guest makes is at worst
  setuid to the directory's owner or to nobody, never to root.
- a read-only volume is a read-only bind mount in that mount namespace, so virtiofsd itself
  cannot write it whatever the guest sends (the guest also mounts it ``ro``).
- virtiofsd then applies its own sandbox (``sandbox=namespace``: pid, mount and net
  namespaces, pivot_root into the shared directory, seccomp), so the guest sees nothing
  outside the directory.

The daemon is a child of the launcher, which execs the supervisor: PR_SET_PDEATHSIG kills it
when the supervisor dies (even by SIGKILL); it also exits when QEMU goes (its socket closes).
Its pid is written to ``virtiofsd.pids`` in the VM's directory for the stale-VM cleanup.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from mvm.core.errors import HostToolMissing, VmError

if TYPE_CHECKING:
    from mvm.runtime.volumes import Mount

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
NOBODY = 65534
SHARE_POINT = "/mnt"  # where the shared directory is bound in virtiofsd's own mount namespace

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1


def check_host() -> None:
    """Volumes on QEMU need virtiofsd, and root to give it the uid map above."""
    if not os.access(VIRTIOFSD, os.X_OK):
        raise HostToolMissing(str(VIRTIOFSD), "qemu-system-common")
    if os.geteuid() != 0:
        raise VmError("volumes on qemu need mvm to run as root (virtiofsd is started in a user namespace whose uid "
                      "map only root may write)", "run as root, or use --hypervisor docker")


def id_map(workload_id: int, owner: int) -> str:
    """The map both for uids and gids: the workload is the owner; root is nobody (or the owner,
    when the workload is root itself)."""
    if workload_id == 0:
        return f"0 {owner} 1\n"
    return f"0 {NOBODY} 1\n{workload_id} {owner} 1\n"


def spawn_daemon(source: Path, socket_path: Path, *, readonly: bool, workload_uid: int, log: Path) -> int:
    """Start virtiofsd sharing ``source`` on a unix socket at ``socket_path`` (made here and
    handed over listening: in its namespace virtiofsd may not create files in the VM's
    directory); returns its pid. QEMU connects to it when it starts."""
    info = source.stat()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(socket_path))
        listener.listen(1)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child execs or exits
            try:
                os.close(ready_r)
                os.close(go_w)
                _child(source, listener.fileno(), readonly, log, ready_w, go_r)
            except BaseException as err:  # noqa: BLE001 - told to the parent, which raises it
                os.write(ready_w, f"!{err}".encode()[:400])
            finally:
                os._exit(127)
    finally:
        listener.close()
    os.close(ready_w)
    os.close(go_r)
    try:
        entered = os.read(ready_r, 400)
        if entered != b"u":
            raise VmError(f"virtiofsd for {source} did not start: {entered.decode(errors='replace').lstrip('!')}")
        _write_maps(pid, id_map(workload_uid, info.st_uid), id_map(workload_uid, info.st_gid))
        os.write(go_w, b"g")
        # The pipe is close-on-exec: EOF once virtiofsd runs, or why the child could not get there.
        failed = os.read(ready_r, 400)
        if failed:
            os.waitpid(pid, 0)
            raise VmError(f"virtiofsd for {source} did not start: {failed.decode(errors='replace').lstrip('!')}")
    except BaseException:
        _kill(pid)
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
    return pid


def _child(source: Path, listen_fd: int, readonly: bool, log: Path, ready_w: int, go_r: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    os.setsid()
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.set_inheritable(listen_fd, True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare of a user and mount namespace")
    os.write(ready_w, b"u")
    if os.read(go_r, 1) != b"g":
        return
    # Still the host's root here (the uid map makes us nobody only at setresuid): bind the
    # directory onto SHARE_POINT, which every uid can reach, while the path to it (a 0700
    # directory of root's, say) can still be walked.
    _mount(libc, None, "/", MS_REC | MS_PRIVATE)
    _mount(libc, str(source).encode(), SHARE_POINT, MS_BIND | MS_REC)
    # A remount in a namespace the user namespace owns must keep the flags the mount had (the
    # kernel locks them): statvfs's f_flag bits are the MS_ ones.
    kept = os.statvfs(SHARE_POINT).f_flag & (MS_RDONLY | MS_NOSUID | MS_NODEV | 8 | 1024 | 2048 | 4096)
    _mount(libc, None, SHARE_POINT, kept | MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0))
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # Only now: the kernel clears the parent-death signal when the euid changes (as it just did).
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before that took hold
        raise OSError("the VM's supervisor is gone")
    os.execv(str(VIRTIOFSD), [str(VIRTIOFSD), f"--fd={listen_fd}", "-o", f"source={SHARE_POINT}",
                              "-o", "sandbox=namespace", "-o", "cache=auto", "-o", "no_posix_lock",
                              "-o", "no_xattr", "--rlimit-nofile=0", "-o", "log_level=warn"])


def _mount(libc: ctypes.CDLL, source: bytes | None, target: bytes | str, flags: int) -> None:
    target = target.encode() if isinstance(target, str) else target
    if libc.mount(source, target, None, ctypes.c_ulong(flags), None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target!r} flags {flags:#x}")


def _write_maps(pid: int, uids: str, gids: str) -> None:
    Path(f"/proc/{pid}/uid_map").write_text(uids)
    Path(f"/proc/{pid}/gid_map").write_text(gids)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def stop_stale(pid_file: Path) -> None:
    """After a supervisor died: end the virtiofsd it recorded, if that pid still is one
    (PDEATHSIG should have done it already; this is the second net)."""
    try:
        pids = [int(p) for p in pid_file.read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if os.path.basename(exe) == VIRTIOFSD.name:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def pid_file(vm_dir: Path) -> Path:
    return vm_dir / "virtiofsd.pids"


def start_for_qemu(vm_dir: Path, mounts: tuple[Mount, ...], workload_uid: int) -> list[str]:
    """One daemon per volume (sockets ``<tag>.sock`` in the VM's directory, logs
    ``virtiofsd-<tag>.log``); returns QEMU's arguments for them. On a failure the daemons
    already started are stopped."""
    args: list[str] = []
    pids: list[int] = []
    try:
        for mount in mounts:
            socket_path = vm_dir / f"{mount.tag}.sock"
            socket_path.unlink(missing_ok=True)
            pids.append(spawn_daemon(Path(mount.host), socket_path, readonly=mount.readonly,
                                     workload_uid=workload_uid, log=vm_dir / f"virtiofsd-{mount.tag}.log"))
            pid_file(vm_dir).write_text(" ".join(map(str, pids)) + "\n")
            args += ["-chardev", f"socket,id={mount.tag},path={socket_path}",
                     "-device", f"vhost-user-fs-device,chardev={mount.tag},tag={mount.tag}"]
    except BaseException:
        for pid in pids:
            _kill(pid)
        raise
    return args
