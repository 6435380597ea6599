"""File requests: read, write, list, stat, remove, mkdir, rename, as the agent's own uid.

A read streams from its own thread and a write lands in a temporary file renamed into place,
so a big file neither holds up other requests nor is ever seen half written.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from mvm.core import protocol

from .channel import Channel, write_all
from .dispatch import arg, handles, int_arg

if TYPE_CHECKING:
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
