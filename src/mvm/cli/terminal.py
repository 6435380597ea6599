"""This process's terminal as a guest process sees it: output sinks, raw mode, a PTY session.

Imports only os and sys up front: `mvmctl exec` loads this on every run, and needs termios
and tty only with ``-t``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mvm.runtime.client import ExecResult, VmClient


def write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def write_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


class raw_terminal:  # lowercase: used like a function, as contextlib.closing is
    """Raw mode for the length of an interactive session; ``with`` gives whether fd is a terminal.

    A class rather than a @contextmanager so that exec does not import contextlib for it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list | None = None

    def __enter__(self) -> bool:
        if not os.isatty(self.fd):
            return False
        import termios
        import tty

        self.saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd)
        return True

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None


def interactive(client: VmClient, argv: list[str] | None, *, kind: str, env: dict[str, str] | None = None,
                cwd: str | None = None, timeout: float | None = None) -> ExecResult:
    """A PTY session wired to this terminal (or to piped stdin)."""
    import shutil

    size = shutil.get_terminal_size()
    with raw_terminal(sys.stdin.fileno()):
        return client.exec(argv or [], env=env, cwd=cwd, timeout=timeout, stdin=sys.stdin.fileno(), pty=True,
                           rows=size.lines, cols=size.columns, stdout=write_stdout, kind=kind)
