"""QEMU snapshots through QMP: save a stopped VM to files, and start a new QEMU from them.

Measured here (DESIGN.md, "This machine"): with guest RAM in a shared file-backed memory
backend and the ``x-ignore-shared`` capability on both sides, the migration stream is only
device state (~60 KB) and a restore maps the saved RAM file privately (copy-on-write), so
any number of clones share one file's page cache and the file is never written. A VM whose
RAM is not such a file (a clone: its RAM is a private mapping) is saved the plain way, RAM
inside the stream. QEMU runs with ``-sandbox on,spawn=deny``, so the stream goes through a
file descriptor handed over QMP (``getfd``), never an ``exec:`` URI.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mvm.core.errors import VmError
from mvm.runtime.backends.qemu_restore import MIGRATION_TIMEOUT_S, POLL_S, check_version, migration_done, version_text

QMP_TIMEOUT_S = 10.0


@asynccontextmanager
async def qmp_session(socket: Path, name: str) -> AsyncIterator[Any]:
    from qemu.qmp import QMPClient

    qmp = QMPClient(name)
    try:
        await asyncio.wait_for(qmp.connect(str(socket)), QMP_TIMEOUT_S)
        yield qmp
    except TimeoutError:
        raise VmError(f"QEMU did not answer on QMP within {QMP_TIMEOUT_S:.0f} s") from None
    finally:
        await qmp.disconnect()


async def execute(qmp: Any, command: str, arguments: dict[str, Any] | None = None) -> Any:
    from qemu.qmp import ExecuteError

    try:
        return await asyncio.wait_for(qmp.execute(command, arguments), QMP_TIMEOUT_S)
    except TimeoutError:
        raise VmError(f"QEMU did not answer QMP {command!r} within {QMP_TIMEOUT_S:.0f} s") from None
    except ExecuteError as err:
        raise VmError(f"QEMU refused {command}: {err.error.desc}") from None


async def migrate_through(qmp: Any, fd: int, command: str) -> None:
    """``migrate`` (out) or ``migrate-incoming`` through ``fd``, handed to QEMU over QMP; ``fd``
    is closed once the migration has completed (or failed)."""
    try:
        qmp.send_fd_scm(fd)
        await execute(qmp, "getfd", {"fdname": "mvm-migration"})
        await execute(qmp, command, {"uri": "fd:mvm-migration"})
        await wait_migration(qmp)
    finally:
        os.close(fd)


async def wait_migration(qmp: Any) -> None:
    """Until the migration (out or in) has completed; its error if it failed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MIGRATION_TIMEOUT_S
    while not migration_done(await execute(qmp, "query-migrate"), loop.time() > deadline):
        await asyncio.sleep(POLL_S)


async def set_ignore_shared(qmp: Any, state: bool) -> None:
    """Set either way, always: a clone's QEMU had it on for its own restore, and a stream
    saved with it on carries block addresses that a loader with it off cannot parse."""
    await execute(qmp, "migrate-set-capabilities",
                  {"capabilities": [{"capability": "x-ignore-shared", "state": state}]})


async def save(qmp: Any, dest: Path, *, ram_file: Path | None, disk: Path) -> dict[str, str]:
    """Stop the VM and write its state into ``dest``. The VM is left stopped (post-migrate):
    the caller continues it (``cont``) or ends it."""
    await set_ignore_shared(qmp, ram_file is not None)
    version = await execute(qmp, "query-version")
    await execute(qmp, "stop")
    fd = os.open(dest / "state", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    await migrate_through(qmp, fd, "migrate")
    # The migration has flushed the disk and left it inactive: the overlay is now whole.
    await asyncio.to_thread(_copy_files, ram_file, dest, disk)
    return {"kind": "ram-file" if ram_file is not None else "stream", "hypervisor_version": version_text(version)}


def _copy_files(ram_file: Path | None, dest: Path, disk: Path) -> None:
    if ram_file is not None:
        copy_sparse(ram_file, dest / "ram")
    copy_sparse(disk, dest / "disk.qcow2")


async def load(qmp: Any, state: Path, *, ram_file_kind: bool, expected_version: str) -> None:
    """Feed ``state`` to a QEMU started with ``-incoming defer``, then run the guest."""
    check_version(await execute(qmp, "query-version"), expected_version)
    await set_ignore_shared(qmp, ram_file_kind)
    await migrate_through(qmp, os.open(state, os.O_RDONLY | os.O_CLOEXEC), "migrate-incoming")
    status = await execute(qmp, "query-status")
    if status.get("status") != "running":
        await execute(qmp, "cont")


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` keeping its holes: untouched guest RAM and unwritten disk stay unallocated."""
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fin.fileno()).st_size
            os.ftruncate(fd, size)
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
                _copy_range(fin.fileno(), fd, data, hole)
                offset = hole
            os.fsync(fd)
        finally:
            os.close(fd)


ZERO_BLOCK = bytes(1 << 16)
ZERO_CHUNK = bytes(1 << 20)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Bytes start..end, leaving a hole for every 64 KiB of zeros: a RAM file that an incoming
    migration stream filled (a clone of a stream snapshot) is allocated throughout, though
    most of the guest's memory is zeros. (Checking costs ~0.06 s per 256 MiB.)"""
    position = start
    while position < end:
        chunk = os.pread(src, min(end - position, len(ZERO_CHUNK)), position)
        if not chunk:
            raise VmError(f"a snapshot file was cut short at byte {position}")
        if chunk != ZERO_CHUNK[:len(chunk)]:
            for at in range(0, len(chunk), len(ZERO_BLOCK)):
                block = chunk[at:at + len(ZERO_BLOCK)]
                if block != ZERO_BLOCK[:len(block)]:
                    _write_all(dst, block, position + at)
        position += len(chunk)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
