"""Start a VM's supervisor: fork it off as its own session, spawn the VM's process through its
backend, then exec the lean supervisor process (runtime/supervisor/) in its place.

The VM's process is spawned before the exec, from code `up` has already loaded, so the guest
starts booting at once; the exec'd supervisor inherits it as its child (PDEATHSIG still ties
its life to the supervisor) along with the console pipes, the commit pipe and the supervisor
lock.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from mvm.core.bootimage import BootImage
from mvm.core.state import VmPaths, VmRecord
from mvm.runtime import backends
from mvm.runtime.launchspec import LaunchSpec


def launch(paths: VmPaths, staged: Path, image: BootImage, record: VmRecord, lock_fd: int, commit_fd: int,
           replaced: Path | None = None) -> int:
    """Returns the supervisor's pid. A double fork, so it is nobody's child and has no terminal.

    The VM was registered in the hidden directory ``staged``; the supervisor renames it to
    ``paths.dir``, so a caller killed before this fork leaves no VM behind, only a hidden
    directory that the next start of that name sweeps away. A resume moves the suspended VM's
    directory to ``replaced`` first, which the supervisor removes once the start is committed
    and puts back if it is abandoned.
    """
    read_pid, write_pid = os.pipe()
    first = os.fork()
    if first:
        os.close(write_pid)
        pid = int(os.read(read_pid, 32) or b"0")
        os.close(read_pid)
        os.waitpid(first, 0)
        return pid
    try:
        os.close(read_pid)
        os.setsid()
        second = os.fork()
        if second:
            os.write(write_pid, str(second).encode())
            os._exit(0)
        os.close(write_pid)
        if replaced is not None:
            os.rename(paths.dir, replaced)
        os.rename(staged, paths.dir)
        _redirect_stdio(paths)
        _become_supervisor(paths, image, record, lock_fd, commit_fd, replaced)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the caller
        import traceback

        traceback.print_exc()
    os._exit(1)


def put_back(replaced: Path, vm_dir: Path) -> None:
    """A resume that was never committed: the suspended VM's directory, set aside by
    :func:`launch`, takes its name again as it was (its save was never touched). The name has
    a directory at every moment, so nobody sees the VM missing meanwhile."""
    trash = vm_dir.with_name(f".{vm_dir.name}.abandoned-{os.getpid()}")
    try:
        os.rename(vm_dir, trash)
    except FileNotFoundError:
        pass
    try:
        os.rename(replaced, vm_dir)
    except OSError as err:
        print(f"mvm: could not put suspended VM {vm_dir.name} back from {replaced}: {err}", file=sys.stderr, flush=True)
    shutil.rmtree(trash, ignore_errors=True)


def _redirect_stdio(paths: VmPaths) -> None:
    log = os.open(paths.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)


def _become_supervisor(paths: VmPaths, image: BootImage, record: VmRecord, lock_fd: int, commit_fd: int,
                       replaced: Path | None) -> None:
    try:
        spawned = backends.get(record.backend).spawn(image, record, paths)
    except Exception as err:  # noqa: BLE001 - any failure here is the VM's stop reason
        record.state, record.stopped_at = "stopped", time.time()
        record.stop_reason = f"{record.backend} did not start: {err}"
        record.save(paths)
        raise
    proc = spawned.process
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    handover = LaunchSpec(vm_dir=str(paths.dir), qemu_pid=proc.pid, qemu_stdin=proc.stdin.fileno(),
                          qemu_stdout=proc.stdout.fileno(), qemu_stderr=proc.stderr.fileno(), spawned=spawned.spawned,
                          commit_fd=commit_fd, lock_fd=lock_fd, expected_boot_ms=image.expected_boot_ms,
                          agent_listen_fd=spawned.agent_listen_fd, agent_fd=spawned.agent_fd,
                          restored=spawned.restored, replaced=None if replaced is None else str(replaced))
    keep = {handover.qemu_stdin, handover.qemu_stdout, handover.qemu_stderr, commit_fd, lock_fd}
    keep |= {fd for fd in (spawned.agent_listen_fd, spawned.agent_fd) if fd is not None}
    for fd in keep:
        os.set_inheritable(fd, True)
    for fd in _open_fds():
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    os.execv(sys.executable, [sys.executable, "-m", "mvm.runtime.supervisor", handover.to_json()])


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))
