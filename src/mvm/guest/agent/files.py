"""File requests: read, write, list, stat, remove, mkdir, rename, as the exec uid.

Each runs with the thread's filesystem uid and gid set to the exec uid (setfsuid: per thread,
and the agent holds CAP_SETUID for it), so a file the host writes belongs to the same user its
commands run as, and the agent reaches only what that user may.

A read streams from its own thread and a write lands in a temporary file renamed into place,
so a big file neither holds up other requests nor is ever seen half written. A read is
opened without blocking (a FIFO with no writer would hold the agent's loop for ever) and can
be cancelled: an endless one (/dev/zero) stops when the host sends ``cancel``, which the
supervisor does when its client goes away.
"""

from __future__ import annotations

import os
import select
import stat

from mvm.core import protocol

from .channel import write_all
from .dispatch import Refused, arg, handles, int_arg, quietly
from .system import as_exec_user

TYPE_CHECKING = False  # (typing costs its import at the agent's start; annotations are strings)
if TYPE_CHECKING:
    from typing import Any

    from .session import Session


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
        import tempfile  # (only writes need it: not worth its import at the agent's start)

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


class Read:
    """One file being streamed to the host, from its own thread, until EOF or ``cancel``."""

    def __init__(self, session: Session, request_id: int | None, path: str, fd: int) -> None:
        import threading  # (first imported by a request, on the reading loop: see channel.py)

        self.session, self.id, self.path, self.fd = session, request_id, path, fd
        self.cancelled = threading.Event()

    def run(self) -> None:
        channel = self.session.channel
        try:
            st = os.fstat(self.fd)
            size = 0
            while (data := self.next_chunk()) and not self.cancelled.is_set():
                channel.reply(self.id, "data", data)
                size += len(data)
            if not self.cancelled.is_set():
                channel.reply(self.id, "done", size=size, mode=stat.S_IMODE(st.st_mode))
        except OSError as err:
            channel.error(self.id, f"{self.path}: {err.strerror or err}", err.errno)
        finally:
            self.session.reads.pop(self.id, None)
            os.close(self.fd)

    def next_chunk(self) -> bytes:
        """The next bytes, waiting (cancellably) on a pipe or device that has none yet."""
        while not self.cancelled.is_set():
            try:
                return os.read(self.fd, protocol.CHUNK)
            except BlockingIOError:
                select.select([self.fd], [], [], 0.5)
        return b""


@handles("read")
@as_exec_user
def do_read(session: Session, frame: protocol.Frame) -> None:
    path = arg(frame, "path", str)
    if frame.id in session.reads:
        raise Refused(f"id {frame.id} is already reading")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    if arg(frame, "regular", bool, False) and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)  # (`cp` out: a device or FIFO, even behind a link, would never end)
        raise Refused(f"{path} is not a regular file (a device, FIFO or socket, or a link to one)")
    read = session.reads[frame.id] = Read(session, frame.id, path, fd)
    import threading

    threading.Thread(target=read.run, daemon=True).start()


@handles("cancel")
@quietly
def do_cancel(session: Session, frame: protocol.Frame) -> None:
    """Stop a read whose client has gone (no reply: nobody is waiting for one)."""
    if read := session.reads.get(frame.id):
        read.cancelled.set()


@handles("write")
@as_exec_user
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
@as_exec_user
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
@as_exec_user
def do_stat(session: Session, frame: protocol.Frame) -> None:
    path = arg(frame, "path", str)
    st = os.lstat(path)
    info = {**entry(os.path.basename(path.rstrip("/")) or path, st), "uid": st.st_uid, "gid": st.st_gid}
    session.channel.reply(frame.id, "result", stat=info)


@handles("remove")
@as_exec_user
def do_remove(session: Session, frame: protocol.Frame) -> None:
    path = arg(frame, "path", str)
    if stat.S_ISDIR(os.lstat(path).st_mode):
        if arg(frame, "recursive", bool, False):
            import shutil

            shutil.rmtree(path)
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    session.channel.reply(frame.id, "result")


@handles("mkdir")
@as_exec_user
def do_mkdir(session: Session, frame: protocol.Frame) -> None:
    path, mode = arg(frame, "path", str), int_arg(frame, "mode", 0o755, 0, 0o7777)
    if arg(frame, "parents", bool, False):
        os.makedirs(path, mode, exist_ok=True)
    else:
        os.mkdir(path, mode)
    session.channel.reply(frame.id, "result")


@handles("rename")
@as_exec_user
def do_rename(session: Session, frame: protocol.Frame) -> None:
    os.rename(arg(frame, "src", str), arg(frame, "dst", str))
    session.channel.reply(frame.id, "result")
