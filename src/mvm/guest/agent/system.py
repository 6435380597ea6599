"""What the host asks of the guest as a whole: telemetry, and a shutdown the agent cannot do
itself (it is not root), so it asks /init. Also who commands run as."""

from __future__ import annotations

import errno
import os

from mvm.core import protocol

from .channel import write_all
from .dispatch import Handler, handles

TYPE_CHECKING = False  # (typing costs its import at the agent's start; annotations are strings)
if TYPE_CHECKING:
    from .session import Session

# Guest paths, overridable by environment so tests can run the agent on the host.
ARTIFACT_JSON = os.environ.get("MVM_AGENT_ARTIFACT_JSON", "/etc/mvm/artifact.json")
ENTRYPOINT_PID = os.environ.get("MVM_AGENT_ENTRYPOINT_PID", "/run/mvm/entrypoint.pid")
CONTROL_FIFO = os.environ.get("MVM_AGENT_CONTROL", "/run/mvm/control")  # /init's root listener
EXEC_UID: list[int] = []  # --exec-uid: who exec and console run as (the entrypoint's uid)
IMPORTED: list[float] = []  # the guest's uptime once the agent had imported its modules (for its hello)


def exec_uid() -> int:
    """Commands run as this uid, never as the agent's own (unless told so, as tests do)."""
    return EXEC_UID[0] if EXEC_UID else os.getuid()


def _set_fs_identity(uid: int, gid: int) -> None:
    """This thread's filesystem uid and gid (Linux: per thread; needs CAP_SETUID/CAP_SETGID).
    ctypes is imported on first use: it is not worth its import time at the agent's start."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    if libc.setfsuid(-1) != uid or libc.setfsgid(-1) != gid:  # (-1 fails and returns the current one)
        raise PermissionError(errno.EPERM, f"cannot act as uid {uid}")


PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_ambient_dropped: list[bool] = []


def drop_ambient_capabilities() -> None:
    """/init gives the agent CAP_SETUID/SETGID/KILL as ambient capabilities (the only way a
    non-root process keeps them across exec). Ambient ones would pass on to every command it
    starts, so they go before the first; the agent keeps them as permitted and effective."""
    if _ambient_dropped:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise PermissionError(err, f"cannot clear the agent's ambient capabilities: {os.strerror(err)}")
    _ambient_dropped.append(True)


class acting_as_exec_uid:
    """This thread touches files as the exec uid meanwhile (its group: the same number, as
    /init's setpriv gives it). A class, not @contextmanager: contextlib is not worth its
    import at the agent's start."""

    def __enter__(self) -> None:
        self.uid = exec_uid()
        if self.uid != os.getuid():
            _set_fs_identity(self.uid, self.uid)

    def __exit__(self, *exc: object) -> None:
        if self.uid != os.getuid():
            _set_fs_identity(os.getuid(), os.getgid())


def as_exec_user(handler: Handler) -> Handler:
    """A file request's handler, run with the filesystem identity of the exec uid."""
    def wrapper(session: Session, frame: protocol.Frame) -> None:
        with acting_as_exec_uid():
            handler(session, frame)
    return wrapper


def uptime() -> float:
    fd = os.open("/proc/uptime", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return float(os.read(fd, 64).split()[0])
    finally:
        os.close(fd)


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
    import json  # (here, not at the agent's start: json's Python layer imports re and enum)

    try:
        with open(ARTIFACT_JSON) as f:
            return json.load(f).get("sealed") is not False
    except (OSError, ValueError, AttributeError):
        return True


@handles("telemetry")
def do_telemetry(session: Session, frame: protocol.Frame) -> None:
    session.channel.reply(frame.id, "result", uptime=uptime(), load=load(), memory=memory(), disk=disk(),
                          agent={"pid": os.getpid(), "uid": os.getuid()}, entrypoint=entrypoint(),
                          processes=processes())


PROCESSES_MAX = 512  # the reply must fit in a frame; `status` says when there were more


def processes() -> list[list[object]]:
    """[pid, real uid, name, effective uid] of every process (but kernel threads), for `status`
    to check that nothing runs as a uid the image does not name (a setuid program changes only
    the effective one)."""
    found: list[list[object]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except (OSError, ValueError):
            continue  # gone meanwhile
        if fields.get("Kthread", "0").strip() == "1" or int(fields.get("PPid", "0").strip() or 0) == 2:
            continue
        uids = fields["Uid"].split()
        found.append([int(entry), int(uids[0]), fields.get("Name", "").strip()[:32], int(uids[1])])
        if len(found) > PROCESSES_MAX:
            break
    return found


@handles("shutdown")
def do_shutdown(session: Session, frame: protocol.Frame) -> None:
    """We may not power off: /init's root listener on a fifo does it for us. A missing
    listener (or a full fifo) is an error reply, not a silent no-op, and only a request that
    went in is answered "result" (exactly one reply). The listener first stops the
    entrypoint, which leaves the host ample time to read the answer."""
    fd = os.open(CONTROL_FIFO, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        write_all(fd, b"poweroff\n")
    finally:
        os.close(fd)
    session.channel.reply(frame.id, "result")
