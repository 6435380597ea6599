"""How mvmctl ends on a failure a user can cause: one line on stderr and an exit status, never
a traceback. The click group and exec's fast path (which runs without click) both end this way."""

from __future__ import annotations

import os
import signal
import sys

from mvm.core.errors import MvmError


def report_failure(err: MvmError | KeyboardInterrupt) -> int:
    """Print the line for ``err``; returns the exit status mvmctl ends with."""
    if isinstance(err, KeyboardInterrupt):
        line, status = "mvmctl: interrupted", 130
        # Stopping already: a second Ctrl-C (or one Python raises again while the exit unwinds)
        # must not turn the reported end into a death by SIGINT with another status.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        line, status = f"mvmctl: error: {err}", err.exit_code
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return status


def end_on_broken_pipe() -> int:
    """Our reader went away (`mvmctl exec web -- yes | head -1`): exit 1 with no message, as
    click does, and without Python's complaint at exit that stdout could not be flushed."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):  # no such stream, or not one with a descriptor
            pass
    os.close(devnull)
    return 1
