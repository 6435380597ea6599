"""What `mvmctl exec` does once its arguments are parsed. The click command (cli/guest.py) and
the fast path that skips click (cli/main.py) both call :func:`run_exec`, so they behave alike.

Import-light on purpose: it reaches the VM through core/home.py and runtime/client.py, and loads
core/state.py and runtime/lifecycle.py only when the direct way fails and their errors are needed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mvm.cli.terminal import interactive, write_stderr, write_stdout
from mvm.core.errors import MvmError, UsageError
from mvm.core.home import ctl_socket_path
from mvm.core.protocol import MAX_TIMEOUT_S
from mvm.runtime.client import VmClient


def env_from_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {pair!r} is not K=V")
        env[key] = value
    return env


def connect(name: str) -> VmClient:
    """Straight to the VM's control socket. When that fails, for whatever reason, through its
    record (lifecycle.connect), whose error says what is wrong: no such VM, stopped, a bad name."""
    try:
        return VmClient.connect_socket(ctl_socket_path(name), name)
    except (MvmError, OSError):
        from mvm.core.state import MvmHome
        from mvm.runtime import lifecycle

        return lifecycle.connect(MvmHome.default(), name)


def run_exec(name: str, argv: Sequence[str], env_pairs: Sequence[str] = (), cwd: str | None = None,
             timeout: float | None = None, stdin: bool = False, tty: bool = False, receipt: bool = False) -> int:
    """Run ``argv`` in VM ``name`` with this process's stdout/stderr (and stdin, or terminal);
    returns the exit status mvmctl should end with. Raises MvmError for what the user can fix.
    ``receipt``: say the id of its audit record on stderr."""
    env = env_from_pairs(env_pairs)
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:  # (also refuses inf and nan)
        raise UsageError(f"--timeout {timeout:g}: must be more than 0 and at most {MAX_TIMEOUT_S} s (7 days)")
    with connect(name) as client:
        if tty:
            result = interactive(client, list(argv), kind="exec", env=env or None, cwd=cwd, timeout=timeout)
        else:
            result = client.exec(list(argv), env=env or None, cwd=cwd, timeout=timeout,
                                 stdin=sys.stdin.fileno() if stdin else None, stdout=write_stdout, stderr=write_stderr)
    for warning in client.audit_warnings:
        write_stderr(f"mvmctl: warning: this command is not in the audit log: {warning}\n".encode())
    if receipt:
        write_stderr(f"mvmctl: receipt {result.receipt or 'none (no audit record was written)'}\n".encode())
    if result.timed_out:  # its process group was killed: 137, whatever its leader managed to exit with
        sys.stderr.write(f"mvmctl: {argv[0]} was killed after its {timeout:g} s timeout\n")
        sys.stderr.flush()
        return 128 + 9
    return result.exit_status
