"""exec and console: each process in its own session, its output pumped to the host by a
thread of its own, so a chatty or stuck process never holds up the reading loop.

Commands run as the exec uid (the entrypoint's), never as the agent's own: the child sets
its uid and gid and clears its groups between fork and exec (subprocess does it in C). The
agent's capabilities are not ambient any more by then, so nothing exec'd inherits them; on a
sealed image the agent has no_new_privs, which every command inherits. So nothing a command
runs can signal, trace or impersonate the agent."""

from __future__ import annotations

import fcntl  # (fcntl and termios are used between fork and exec: imported here, never there)
import os
import pwd
import struct
import termios
import time
from _signal import NSIG, SIGKILL

from mvm.core import protocol

from .channel import write_all
from .dispatch import MISSING, Refused, arg, handles, int_arg, quietly
from .system import drop_ambient_capabilities, exec_uid, sealed

# subprocess, selectors, queue and threading are imported by the first exec, not at the agent's
# start: together they cost ~0.1 s under TCG, and the agent answers nothing until it is up.
# Signal numbers come from _signal, the C module: signal.py builds enums at import.
TYPE_CHECKING = False  # (typing costs its import at the agent's start; annotations are strings)
if TYPE_CHECKING:
    import queue
    import selectors
    import subprocess
    from typing import Any

    from .session import Session

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONSOLE_ARGV = ["/bin/sh", "-l"]
READ_SIZE = 64 * 1024  # one read of a process's output (a pipe holds 64 KiB)
LINGER_S = 1.0  # after a process exits, how long a background child may keep its output open
STDIN_LIMIT = 16 << 20  # input queued for a process that does not read it: beyond this, its stdin is closed


class ExecSpec:
    """A checked exec request (a plain class: dataclasses imports inspect, ~60 ms under TCG)."""

    __slots__ = ("argv", "cols", "cwd", "env", "pty", "rows", "stdin", "timeout")

    def __init__(self, *, argv: list[str], env: dict[str, str], cwd: str, stdin: bool, pty: bool, rows: int,
                 cols: int, timeout: float | None) -> None:
        self.argv, self.env, self.cwd, self.stdin, self.pty = argv, env, cwd, stdin, pty
        self.rows, self.cols, self.timeout = rows, cols, timeout


def exec_spec(frame: protocol.Frame, *, console: bool = False) -> ExecSpec:
    """Validate an exec (or console) request. Commands run as the exec uid only."""
    argv = arg(frame, "argv", list, list(CONSOLE_ARGV) if console else MISSING)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise Refused(f"{frame.type}: 'argv' must be a non-empty list of strings")
    env = arg(frame, "env", dict, {})
    if not all(isinstance(v, str) for v in env.values()):
        raise Refused(f"{frame.type}: 'env' values must be strings")
    uid = arg(frame, "uid", int, None)
    if uid is not None and uid != exec_uid():
        raise Refused(f"cannot run as uid {uid}: this image allows commands as uid {exec_uid()} only")
    timeout = arg(frame, "timeout", (int, float), None)
    if timeout is not None and not 0 < timeout <= protocol.MAX_TIMEOUT_S:  # (also false for NaN)
        raise Refused(f"{frame.type}: 'timeout' must be more than 0 and at most {protocol.MAX_TIMEOUT_S} s (7 days)")
    pty = console or arg(frame, "pty", bool, False)
    base = {"PATH": BASE_PATH, "HOME": home(), "LANG": "C.UTF-8", **proxy_env()}
    if pty:
        base["TERM"] = "xterm"  # a console request carries no env, and a terminal needs one
    return ExecSpec(argv=argv, env={**base, **env}, cwd=arg(frame, "cwd", str, "/"),
                    stdin=arg(frame, "stdin", bool, False), pty=pty,
                    rows=int_arg(frame, "rows", 24, 1, 0xFFFF), cols=int_arg(frame, "cols", 80, 1, 0xFFFF),
                    timeout=timeout)


PROXY_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
               "no_proxy")


def proxy_env() -> dict[str, str]:
    """An allow-list guest's proxy variables (/init sets them for the entrypoint and the agent):
    every command gets them, as the entrypoint does."""
    return {name: os.environ[name] for name in PROXY_NAMES if name in os.environ}


def home() -> str:
    try:
        directory = pwd.getpwuid(exec_uid()).pw_dir
    except KeyError:
        return "/"
    return directory if os.path.isdir(directory) else "/"


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def take_terminal() -> None:
    """In a pty child, after its setsid: make the pty its controlling tty (^C, job control).

    Runs between fork and exec; it only calls into already-imported C code, so the usual
    preexec_fn hazard with threads (a lock held by another thread at fork) does not apply.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Exec:
    """One running process in its own session: a thread pumps its output to the host, then
    reports exactly one exit. The process group is signalled only while the leader is
    unreaped, so its id cannot have been reused."""

    def __init__(self, session: Session, request_id: int, spec: ExecSpec) -> None:
        import threading  # (first imported by a request, on the reading loop: see channel.py)

        self.session, self.id, self.spec = session, request_id, spec
        self.lock = threading.Lock()  # guards proc.wait against kill, and tty_fd
        self.timed_out = False
        self.outputs: dict[int, str] = {}  # read fd -> "stdout" / "stderr"
        self.tty_fd: int | None = None  # for resize
        self.stdin: queue.Queue[bytes | None] | None = None  # None: no stdin, or it is closed
        self.stdin_eof: bytes | None = None  # what eof:true writes; None closes the pipe
        self.proc = self.spawn_pty() if spec.pty else self.spawn_pipes()

    def spawn_pipes(self) -> subprocess.Popen:
        import subprocess

        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if self.spec.stdin else (subprocess.DEVNULL, -1)
        try:
            proc = self.popen(stdin=in_r, stdout=out_w, stderr=err_w)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                if fd >= 0:
                    os.close(fd)
        self.outputs = {out_r: "stdout", err_r: "stderr"}
        if in_w >= 0:
            self.start_stdin(in_w, eof=None)
        return proc

    def spawn_pty(self) -> subprocess.Popen:
        master, slave = os.openpty()
        try:
            set_winsize(slave, self.spec.rows, self.spec.cols)
            proc = self.popen(stdin=slave, stdout=slave, stderr=slave, preexec_fn=take_terminal)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.outputs = {master: "stdout"}
        self.tty_fd = os.dup(master)
        # A terminal's end of input is ^D; closing the master would hang the process up.
        self.start_stdin(os.dup(master), eof=b"\x04")
        return proc

    def popen(self, **kwargs: Any) -> subprocess.Popen:
        import subprocess

        uid = exec_uid()
        if uid != os.getuid():  # (tests run the agent as the exec uid)
            drop_ambient_capabilities()
            kwargs.update(user=uid, group=uid, extra_groups=[])  # set in the child, in C, before exec
        return subprocess.Popen(self.spec.argv, env=self.spec.env, cwd=self.spec.cwd, start_new_session=True,
                                **kwargs)

    # stdin: a thread per process, so a child that does not read cannot stall the agent
    def start_stdin(self, fd: int, eof: bytes | None) -> None:
        import queue
        import threading

        self.stdin = queue.Queue()
        self.stdin_eof = eof
        self.stdin_queued = 0  # bytes in the queue, bounded by STDIN_LIMIT
        self.stdin_lock = threading.Lock()
        threading.Thread(target=self.feed_stdin, args=(fd, self.stdin), daemon=True).start()

    def feed_stdin(self, fd: int, chunks: queue.Queue[bytes | None]) -> None:
        try:
            while (data := chunks.get()) is not None:
                with self.stdin_lock:
                    self.stdin_queued -= len(data)
                write_all(fd, data)
        except OSError:
            pass  # the process closed its stdin or ended
        finally:
            os.close(fd)

    def write_stdin(self, data: bytes, eof: bool) -> None:
        chunks = self.stdin  # the pump thread may drop it at any moment
        if chunks is None:
            raise Refused(f"exec {self.id} has no open stdin")
        if data:
            with self.stdin_lock:
                over = self.stdin_queued + len(data) > STDIN_LIMIT
                if not over:
                    self.stdin_queued += len(data)
            if over:  # the process is not reading: end its input rather than grow without bound
                self.session.channel.reply(self.id, "stderr", f"mvm agent: closed the input of a process that left "
                                                              f"{STDIN_LIMIT >> 20} MiB of it unread\n".encode())
                data, eof = b"", True
            else:
                chunks.put(data)
        if eof:
            chunks.put(self.stdin_eof)
            if self.stdin_eof is None:
                self.stdin = None

    def kill(self, signum: int) -> None:
        with self.lock:
            if self.proc.returncode is None:
                try:
                    os.killpg(self.proc.pid, signum)
                except OSError:
                    pass

    def resize(self, rows: int, cols: int) -> None:
        with self.lock:
            if self.tty_fd is not None:
                set_winsize(self.tty_fd, rows, cols)

    # the pump thread
    def run(self) -> None:
        import selectors

        selector = selectors.DefaultSelector()
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            for fd, name in self.outputs.items():
                selector.register(fd, selectors.EVENT_READ, name)
            selector.register(pidfd, selectors.EVENT_READ, None)
            self.pump_until_exit(selector)
            self.drain(selector, time.monotonic() + LINGER_S)
            self.report_exit()
        finally:
            for key in list(selector.get_map().values()):
                if key.data is not None:
                    os.close(key.fd)
            selector.close()
            os.close(pidfd)
            self.close()

    def pump_until_exit(self, selector: selectors.BaseSelector) -> None:
        deadline = time.monotonic() + self.spec.timeout if self.spec.timeout else None
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = selector.select(wait)
            if deadline is not None and time.monotonic() >= deadline:
                self.timed_out, deadline = True, None
                self.kill(SIGKILL)
            for key, _ in events:
                if key.data is None:  # the pidfd: the process has exited
                    selector.unregister(key.fd)
                    return
                self.pump(selector, key)

    def drain(self, selector: selectors.BaseSelector, until: float) -> None:
        """Output still in the pipes. A background child holding them open is cut off."""
        while len(selector.get_map()) and (left := until - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                self.pump(selector, key)

    def pump(self, selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        try:
            data = os.read(key.fd, READ_SIZE)
        except OSError:
            data = b""  # EIO: the pty's last user is gone
        if data:
            self.session.channel.reply(self.id, key.data, data)
        else:
            selector.unregister(key.fd)
            os.close(key.fd)

    def report_exit(self) -> None:
        with self.lock:
            status = self.proc.wait()
        self.session.execs.pop(self.id, None)
        code, signum = (status, None) if status >= 0 else (None, -status)
        self.session.channel.reply(self.id, "exit", code=code, signal=signum, timed_out=self.timed_out)

    def close(self) -> None:
        self.session.execs.pop(self.id, None)
        if self.stdin is not None:
            self.stdin.put(None)
            self.stdin = None
        with self.lock:
            if self.tty_fd is not None:
                os.close(self.tty_fd)
                self.tty_fd = None


@handles("exec")
def do_exec(session: Session, frame: protocol.Frame) -> None:
    start_exec(session, frame, exec_spec(frame))


@handles("console")
def do_console(session: Session, frame: protocol.Frame) -> None:
    if sealed():
        raise Refused("this image is sealed: it has no console")
    start_exec(session, frame, exec_spec(frame, console=True))


def start_exec(session: Session, frame: protocol.Frame, spec: ExecSpec) -> None:
    if frame.id is None:
        raise Refused(f"{frame.type} needs an integer 'id'")
    if frame.id in session.execs:
        raise Refused(f"id {frame.id} is already running")
    ex = Exec(session, frame.id, spec)  # OSError (ENOENT, EACCES, a bad cwd) -> error reply
    session.execs[frame.id] = ex
    session.channel.reply(frame.id, "started", pid=ex.proc.pid)
    import threading

    threading.Thread(target=ex.run, daemon=True).start()


# stdin, signal and resize have no reply, and an error with the exec's id would end that
# exec's stream at the host. So a frame for a process that has already ended (a normal race)
# is dropped, and a malformed one is only logged.
def running(session: Session, frame: protocol.Frame) -> Exec | None:
    return session.execs.get(frame.id) if frame.id is not None else None


@handles("stdin")
@quietly
def do_stdin(session: Session, frame: protocol.Frame) -> None:
    if ex := running(session, frame):
        ex.write_stdin(frame.body, arg(frame, "eof", bool, False))


@handles("signal")
@quietly
def do_signal(session: Session, frame: protocol.Frame) -> None:
    signum = int_arg(frame, "signal", MISSING, 1, NSIG - 1)
    if ex := running(session, frame):
        ex.kill(signum)


@handles("resize")
@quietly
def do_resize(session: Session, frame: protocol.Frame) -> None:
    rows, cols = int_arg(frame, "rows", MISSING, 1, 0xFFFF), int_arg(frame, "cols", MISSING, 1, 0xFFFF)
    if ex := running(session, frame):
        ex.resize(rows, cols)
