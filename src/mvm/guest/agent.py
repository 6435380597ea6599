"""The guest agent: serves the host over the virtio-serial port ``org.mvm.agent``.

/init starts it as uid 990 (never root) and restarts it if it dies. The message set is the
docstring of mvm/core/protocol.py. Many requests share the one channel by id, so nothing
long runs on the reading loop: every exec gets a thread that pumps its output and reports its
exit, file reads stream from a thread, and all writes to the port go through one lock.

When the host goes away the port reads EOF; everything tied to that connection (running
execs, half-written files) is dropped and the port is reopened for the next host.
Under Firecracker there is no virtio-serial: the agent listens on vsock port 1024
(``--vsock``) and serves one host connection at a time the same way.
Stdlib only: this runs on the guest's python3-minimal + libpython3.11-stdlib.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import pwd
import queue
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mvm.core import protocol

# Guest paths, overridable by environment so tests can run the agent on the host.
ARTIFACT_JSON = os.environ.get("MVM_AGENT_ARTIFACT_JSON", "/etc/mvm/artifact.json")
ENTRYPOINT_PID = os.environ.get("MVM_AGENT_ENTRYPOINT_PID", "/run/mvm/entrypoint.pid")
CONTROL_FIFO = os.environ.get("MVM_AGENT_CONTROL", "/run/mvm/control")  # /init's root listener

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONSOLE_ARGV = ["/bin/sh", "-l"]
READ_SIZE = 64 * 1024  # one read of a process's output (a pipe holds 64 KiB)
LINGER_S = 1.0  # after a process exits, how long a background child may keep its output open
MAX_MESSAGE = 2000  # error messages are cut so an error reply always fits in a frame


class Refused(Exception):
    """A request answered with an error reply: bad arguments, or not allowed here."""


# -- the channel ------------------------------------------------------------------------------


class Channel:
    """The write side of one host connection, shared by every thread.

    One lock keeps frames whole. Once the connection is closed, late writers (an exec thread
    still draining) are dropped instead of talking to the next host.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.closed = False

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        data = memoryview(protocol.encode(header, body))
        with self.lock:
            if self.closed:
                return
            try:
                while data:
                    data = data[os.write(self.fd, data) :]
            except OSError:
                pass  # no host connected: the port refuses writes, which is not fatal

    def reply(self, request_id: int | None, kind: str, body: bytes = b"", **fields: Any) -> None:
        self.send({"type": kind, "id": request_id, **fields}, body)

    def error(self, request_id: int | None, message: str, err: int | None = None) -> None:
        fields: dict[str, Any] = {"message": message[:MAX_MESSAGE]}
        if err is not None:
            fields["errno"] = errno.errorcode.get(err, str(err))
        self.reply(request_id, "error", **fields)

    def close(self) -> None:
        with self.lock:
            self.closed = True


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- request arguments ------------------------------------------------------------------------

_MISSING = object()


def arg(frame: protocol.Frame, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """A header field of the expected JSON type (bool is not a number here), or Refused."""
    value = frame.header.get(key, default)
    if value is _MISSING:
        raise Refused(f"{frame.type}: missing {key!r}")
    if value is default:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise Refused(f"{frame.type}: {key!r} must be {names}")
    return value


def int_arg(frame: protocol.Frame, key: str, default: Any, low: int, high: int) -> Any:
    value = arg(frame, key, int, default)
    if value is not default and not low <= value <= high:
        raise Refused(f"{frame.type}: {key!r} must be in {low}..{high}")
    return value


# -- processes --------------------------------------------------------------------------------


@dataclass
class ExecSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    stdin: bool
    pty: bool
    rows: int
    cols: int
    timeout: float | None


def exec_spec(frame: protocol.Frame, *, console: bool = False) -> ExecSpec:
    """Validate an exec (or console) request. Commands can only run as the agent's own uid:
    it holds no privilege to become anyone else."""
    argv = arg(frame, "argv", list, list(CONSOLE_ARGV) if console else _MISSING)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise Refused(f"{frame.type}: 'argv' must be a non-empty list of strings")
    env = arg(frame, "env", dict, {})
    if not all(isinstance(v, str) for v in env.values()):
        raise Refused(f"{frame.type}: 'env' values must be strings")
    uid = arg(frame, "uid", int, None)
    if uid is not None and uid != os.getuid():
        raise Refused(f"cannot run as uid {uid}: this image allows commands as uid {os.getuid()} only")
    timeout = arg(frame, "timeout", (int, float), None)
    if timeout is not None and not timeout > 0:
        raise Refused(f"{frame.type}: 'timeout' must be positive")
    pty = console or arg(frame, "pty", bool, False)
    base = {"PATH": BASE_PATH, "HOME": home(), "LANG": "C.UTF-8"}
    if pty:
        base["TERM"] = "xterm"  # a console request carries no env, and a terminal needs one
    return ExecSpec(argv=argv, env={**base, **env}, cwd=arg(frame, "cwd", str, "/"),
                    stdin=arg(frame, "stdin", bool, False), pty=pty,
                    rows=int_arg(frame, "rows", 24, 1, 0xFFFF), cols=int_arg(frame, "cols", 80, 1, 0xFFFF),
                    timeout=timeout)


def home() -> str:
    try:
        directory = pwd.getpwuid(os.getuid()).pw_dir
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
        self.session, self.id, self.spec = session, request_id, spec
        self.lock = threading.Lock()  # guards proc.wait against kill, and tty_fd
        self.timed_out = False
        self.outputs: dict[int, str] = {}  # read fd -> "stdout" / "stderr"
        self.tty_fd: int | None = None  # for resize
        self.stdin: queue.Queue[bytes | None] | None = None  # None: no stdin, or it is closed
        self.stdin_eof: bytes | None = None  # what eof:true writes; None closes the pipe
        self.proc = self.spawn_pty() if spec.pty else self.spawn_pipes()

    def spawn_pipes(self) -> subprocess.Popen:
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
        return subprocess.Popen(self.spec.argv, env=self.spec.env, cwd=self.spec.cwd,
                                start_new_session=True, **kwargs)

    # stdin: a thread per process, so a child that does not read cannot stall the agent
    def start_stdin(self, fd: int, eof: bytes | None) -> None:
        self.stdin = queue.Queue()
        self.stdin_eof = eof
        threading.Thread(target=self.feed_stdin, args=(fd, self.stdin), daemon=True).start()

    @staticmethod
    def feed_stdin(fd: int, chunks: queue.Queue[bytes | None]) -> None:
        try:
            while (data := chunks.get()) is not None:
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
                self.kill(signal.SIGKILL)
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


# -- files ------------------------------------------------------------------------------------


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def entry(name: str, st: os.stat_result) -> dict[str, Any]:
    return {"name": name, "type": file_type(st.st_mode), "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime}


class Upload:
    """A file being written: a temporary file next to its destination, renamed into place
    at the end so nobody ever sees half a file."""

    def __init__(self, path: str, mode: int) -> None:
        directory, name = os.path.split(path)
        self.fd, self.tmp = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}.", suffix=".part")
        self.path, self.mode, self.size = path, mode, 0

    def append(self, data: bytes) -> None:
        write_all(self.fd, data)
        self.size += len(data)

    def commit(self) -> None:
        os.fsync(self.fd)
        os.fchmod(self.fd, self.mode)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def stream_file(channel: Channel, request_id: int | None, path: str, fd: int) -> None:
    """The body of a read, on its own thread so a big file does not hold up other requests."""
    try:
        st = os.fstat(fd)
        size = 0
        while data := os.read(fd, protocol.CHUNK):
            channel.reply(request_id, "data", data)
            size += len(data)
        channel.reply(request_id, "done", size=size, mode=stat.S_IMODE(st.st_mode))
    except OSError as err:
        channel.error(request_id, f"{path}: {err.strerror or err}", err.errno)
    finally:
        os.close(fd)


# -- telemetry --------------------------------------------------------------------------------


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def load() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def memory() -> dict[str, int]:
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    return {"total": fields["MemTotal"], "available": fields["MemAvailable"]}


def disk() -> dict[str, int]:
    """Of the root filesystem; "free" is what an unprivileged user (we) can still use."""
    st = os.statvfs("/")
    return {"total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}


def entrypoint() -> dict[str, int] | None:
    """The pid /init recorded for the entrypoint and its real uid; None once it is gone."""
    try:
        with open(ENTRYPOINT_PID) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, ValueError):
        return None
    if status.get("State", "").strip().startswith("Z"):
        return None  # exited, not yet reaped
    return {"pid": pid, "uid": int(status["Uid"].split()[0])}


def sealed() -> bool:
    """A sealed image has no console. Metadata that is unreadable or does not say
    "sealed": false counts as sealed: fail closed."""
    try:
        with open(ARTIFACT_JSON) as f:
            return json.load(f).get("sealed") is not False
    except (OSError, ValueError, AttributeError):
        return True


# -- requests ---------------------------------------------------------------------------------

Handler = Callable[["Session", protocol.Frame], None]
HANDLERS: dict[str, Handler] = {}


def handles(kind: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn
    return register


class Tunnel:
    """One forwarded TCP connection to a guest port: the host's bytes arrive in ``send``
    frames, the guest's go back as ``data``; ``done`` when the guest side closes."""

    def __init__(self, session: Session, request_id: int, sock: socket.socket) -> None:
        self.session, self.id, self.sock = session, request_id, sock

    def run(self) -> None:
        try:
            while data := self.sock.recv(protocol.CHUNK):
                self.session.channel.reply(self.id, "data", data)
        except OSError:
            pass
        finally:
            self.session.tunnels.pop(self.id, None)
            self.sock.close()
            self.session.channel.reply(self.id, "done")

    def send(self, data: bytes, eof: bool) -> None:
        try:
            if data:
                self.sock.sendall(data)
            if eof:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Session:
    """The state of one host connection: its running execs and unfinished writes."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.tunnels: dict[int, Tunnel] = {}
        self.execs: dict[int, Exec] = {}
        self.uploads: dict[int | None, Upload] = {}
        self.failed_uploads: set[int | None] = set()  # ignore their frames until more:false

    def handle(self, frame: protocol.Frame) -> None:
        handler = HANDLERS.get(frame.type)
        try:
            if handler is None:
                raise Refused(f"unknown request type {frame.type!r}")
            handler(self, frame)
        except (Refused, ValueError) as err:  # ValueError: e.g. a NUL byte in a path or argv
            self.channel.error(frame.id, str(err))
        except OSError as err:
            where = frame.header.get("path") or frame.header.get("src") or err.filename
            prefix = f"{where}: " if isinstance(where, str) else ""
            self.channel.error(frame.id, f"{prefix}{err.strerror or err}", err.errno)
        except protocol.ProtocolError as err:
            self.channel.error(frame.id, f"the reply does not fit in one frame: {err}")
        except Exception as err:  # noqa: BLE001 -- a bug must not take the channel down
            traceback.print_exc()
            self.channel.error(frame.id, f"agent error: {type(err).__name__}: {err}")

    def close(self) -> None:
        """The host is gone: silence the channel, kill its processes, drop partial files."""
        self.channel.close()
        for ex in list(self.execs.values()):
            ex.kill(signal.SIGKILL)
        for upload in self.uploads.values():
            upload.abort()
        self.uploads.clear()
        for tunnel in list(self.tunnels.values()):
            tunnel.close()


@handles("hello")
def do_hello(session: Session, frame: protocol.Frame) -> None:
    # The host speaks first: what it writes is queued for us, while what we write with
    # no host connected is lost. So every host hello gets our hello back.
    info: dict[str, Any] = {"uid": os.getuid(), "pid": os.getpid(), "uptime": uptime()}
    if frame.id is not None:
        info["id"] = frame.id
    session.channel.send({"type": "hello", "version": protocol.PROTOCOL_VERSION, "role": "agent", **info})


@handles("ping")
def do_ping(session: Session, frame: protocol.Frame) -> None:
    session.channel.reply(frame.id, "pong", uptime=uptime())


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
    threading.Thread(target=ex.run, daemon=True).start()


# stdin, signal and resize have no reply, and an error with the exec's id would end that
# exec's stream at the host. So a frame for a process that has already ended (a normal race)
# is dropped, and a malformed one is only logged.
def running(session: Session, frame: protocol.Frame) -> Exec | None:
    return session.execs.get(frame.id) if frame.id is not None else None


def quietly(fn: Handler) -> Handler:
    def wrapper(session: Session, frame: protocol.Frame) -> None:
        try:
            fn(session, frame)
        except Exception as err:  # noqa: BLE001 -- no reply, whatever it was
            print(f"mvm agent: {frame.type} {frame.id}: {err}", file=sys.stderr)
    return wrapper


@handles("stdin")
@quietly
def do_stdin(session: Session, frame: protocol.Frame) -> None:
    if ex := running(session, frame):
        ex.write_stdin(frame.body, arg(frame, "eof", bool, False))


@handles("signal")
@quietly
def do_signal(session: Session, frame: protocol.Frame) -> None:
    signum = int_arg(frame, "signal", _MISSING, 1, signal.NSIG - 1)
    if ex := running(session, frame):
        ex.kill(signum)


@handles("resize")
@quietly
def do_resize(session: Session, frame: protocol.Frame) -> None:
    rows, cols = int_arg(frame, "rows", _MISSING, 1, 0xFFFF), int_arg(frame, "cols", _MISSING, 1, 0xFFFF)
    if ex := running(session, frame):
        ex.resize(rows, cols)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@handles("connect")
def do_connect(session: Session, frame: protocol.Frame) -> None:
    """A port forward: connect to a service on the guest's loopback for the host."""
    if frame.id is None or frame.id in session.tunnels:
        raise Refused("connect needs a new integer 'id'")
    host = arg(frame, "host", str, "127.0.0.1")
    if host not in LOOPBACK:
        raise Refused(f"forwards reach the guest's loopback only, not {host!r}")
    port = int_arg(frame, "port", _MISSING, 1, 65535)
    sock = socket.create_connection((host, port), timeout=5)  # OSError -> error reply
    sock.settimeout(None)
    tunnel = session.tunnels[frame.id] = Tunnel(session, frame.id, sock)
    session.channel.reply(frame.id, "connected")
    threading.Thread(target=tunnel.run, daemon=True).start()


@handles("send")
@quietly
def do_send(session: Session, frame: protocol.Frame) -> None:
    if frame.id is not None and (tunnel := session.tunnels.get(frame.id)):
        tunnel.send(frame.body, arg(frame, "eof", bool, False))


@handles("read")
def do_read(session: Session, frame: protocol.Frame) -> None:
    path = arg(frame, "path", str)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    threading.Thread(target=stream_file, args=(session.channel, frame.id, path, fd), daemon=True).start()


@handles("write")
def do_write(session: Session, frame: protocol.Frame) -> None:
    more = arg(frame, "more", bool, False)
    if frame.id in session.failed_uploads:
        if not more:
            session.failed_uploads.discard(frame.id)
        return
    upload = session.uploads.get(frame.id)
    try:
        if upload is None:
            path = arg(frame, "path", str)
            upload = Upload(path, int_arg(frame, "mode", 0o644, 0, 0o7777))
            session.uploads[frame.id] = upload
        upload.append(frame.body)
        if not more:
            del session.uploads[frame.id]
            upload.commit()
            session.channel.reply(frame.id, "done", size=upload.size)
    except BaseException:
        if upload is not None:
            session.uploads.pop(frame.id, None)
            upload.abort()
        if more:
            session.failed_uploads.add(frame.id)
        raise


@handles("list")
def do_list(session: Session, frame: protocol.Frame) -> None:
    entries = []
    with os.scandir(arg(frame, "path", str)) as it:
        for item in it:
            try:
                entries.append(entry(item.name, item.stat(follow_symlinks=False)))
            except FileNotFoundError:
                pass  # removed while we looked
    entries.sort(key=lambda e: e["name"])
    session.channel.reply(frame.id, "result", entries=entries)


@handles("stat")
def do_stat(session: Session, frame: protocol.Frame) -> None:
    path = arg(frame, "path", str)
    st = os.lstat(path)
    info = {**entry(os.path.basename(path.rstrip("/")) or path, st), "uid": st.st_uid, "gid": st.st_gid}
    session.channel.reply(frame.id, "result", stat=info)


@handles("remove")
def do_remove(session: Session, frame: protocol.Frame) -> None:
    path = arg(frame, "path", str)
    if stat.S_ISDIR(os.lstat(path).st_mode):
        if arg(frame, "recursive", bool, False):
            shutil.rmtree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    session.channel.reply(frame.id, "result")


@handles("mkdir")
def do_mkdir(session: Session, frame: protocol.Frame) -> None:
    path, mode = arg(frame, "path", str), int_arg(frame, "mode", 0o755, 0, 0o7777)
    if arg(frame, "parents", bool, False):
        os.makedirs(path, mode, exist_ok=True)
    else:
        os.mkdir(path, mode)
    session.channel.reply(frame.id, "result")


@handles("rename")
def do_rename(session: Session, frame: protocol.Frame) -> None:
    os.rename(arg(frame, "src", str), arg(frame, "dst", str))
    session.channel.reply(frame.id, "result")


@handles("telemetry")
def do_telemetry(session: Session, frame: protocol.Frame) -> None:
    session.channel.reply(frame.id, "result", uptime=uptime(), load=load(), memory=memory(), disk=disk(),
                          agent={"pid": os.getpid(), "uid": os.getuid()}, entrypoint=entrypoint())


@handles("shutdown")
def do_shutdown(session: Session, frame: protocol.Frame) -> None:
    """We hold no privilege to power off: /init's root listener on a fifo does it for us.
    Opening it first means a missing listener is an error reply, not a silent no-op; the
    result goes out before the request, so the host has it before the guest is gone."""
    fd = os.open(CONTROL_FIFO, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        session.channel.reply(frame.id, "result")
        write_all(fd, b"poweroff\n")
    finally:
        os.close(fd)


# -- serving ----------------------------------------------------------------------------------


def decode(decoder: protocol.Decoder, data: bytes, channel: Channel) -> list[protocol.Frame]:
    """Whole frames in data; each bad frame gets an error reply and is skipped."""
    frames, errors = decoder.feed_all(data)
    for err in errors:
        channel.error(None, str(err))
    return frames


def serve_fd(fd: int) -> None:
    """Serve one host connection on fd until it reads EOF (or fails)."""
    session = Session(Channel(fd))
    decoder = protocol.Decoder()
    try:
        while True:
            try:
                data = os.read(fd, 1 << 20)
            except OSError:
                return
            if not data:
                return
            for frame in decode(decoder, data, session.channel):
                session.handle(frame)
    finally:
        session.close()


def open_port(path: str) -> int:
    """The virtio-serial device, or (for tests) a unix socket that stands in for one."""
    if stat.S_ISSOCK(os.stat(path).st_mode):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock.detach()
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def serve_port(path: str) -> None:
    """Serve host after host: virtio-serial reads EOF while no host is connected, so reopen."""
    while True:
        try:
            fd = open_port(path)
        except OSError:
            time.sleep(0.5)
            continue
        try:
            serve_fd(fd)
        finally:
            os.close(fd)
        time.sleep(0.05)


def serve_listener(listener: socket.socket) -> None:
    """Serve host after host on a listening socket: one connection at a time, each until EOF."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            time.sleep(0.5)
            continue
        fd = conn.detach()
        try:
            serve_fd(fd)
        finally:
            os.close(fd)


def serve_vsock(port: int) -> None:
    """Firecracker's agent channel: listen on AF_VSOCK port ``port`` of this guest. The host
    reaches it by connecting to the VM's vsock unix socket and sending ``CONNECT <port>``."""
    while True:
        listener = None
        try:
            listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            listener.bind((socket.VMADDR_CID_ANY, port))
            listener.listen(1)
            break
        except OSError:  # the vsock transport is not up yet
            if listener is not None:
                listener.close()
            time.sleep(0.5)
    serve_listener(listener)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="the virtio-serial device, e.g. /dev/vport0p1 (or a unix socket "
                                      "to connect to); reopened after every disconnect")
    where.add_argument("--fd", type=int, help="an inherited, connected descriptor; served until EOF")
    where.add_argument("--vsock", type=int, metavar="PORT",
                       help="listen on this AF_VSOCK port (Firecracker); hosts are served one at a time")
    parser.add_argument("--allow-root-for-tests", action="store_true",
                        help="tests on the host run as root; in a guest the agent never is")
    args = parser.parse_args(argv)
    if os.getuid() == 0 and not args.allow_root_for_tests:
        print("mvm agent: refusing to run as root", file=sys.stderr)
        return 2
    # /init starts us as a background job, and ash makes those ignore SIGINT and SIGQUIT;
    # ignored signals survive exec, so without this no process we start could be ^C'd.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    if args.fd is not None:
        serve_fd(args.fd)
    elif args.vsock is not None:
        serve_vsock(args.vsock)
    else:
        serve_port(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
