"""Child processes whose life is tied to ours: QEMU, the docker CLI, Firecracker.

Each gets PDEATHSIG=SIGKILL, so if this process dies, even by SIGKILL, the child goes too,
and its own session, so the terminal's Ctrl-C reaches mvm, which stops the child itself.
Stdlib only: the lean supervisor and firecracker.py import it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Runs in the child between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()


def spawn_tied(argv: list[str], **popen_args) -> subprocess.Popen:
    """Start argv as a child that cannot outlive this process (spawn before any thread starts)."""
    return subprocess.Popen(argv, preexec_fn=die_with_parent, **popen_args)  # noqa: PLW1509


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
