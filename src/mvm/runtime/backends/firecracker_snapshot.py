"""Firecracker snapshots: save a paused VM's memory, device state and root disk, and load them
into a bare Firecracker as a clone with a disk and an agent socket of its own.

Written against Firecracker's published API document and snapshot documentation, and never
run against a real Firecracker (this host has none, and no usable KVM): the unit tests check
every request against the document and the order they are sent in, nothing more.

Save (the VM stays paused; the supervisor resumes it with PATCH /vm Resumed, or stops it):
``GET /version``, ``PATCH /vm Paused``, ``PUT /snapshot/create`` (Full) into ``state`` and
``ram``, then a sparse copy of the root disk, which the create has flushed, as ``disk.raw``.

Load, into a process nothing was configured on (spawn starts it bare): ``GET /version`` (must
equal the manifest's), ``disk.raw`` copied to the clone's own root disk, ``PUT /snapshot/load``
(``mem_backend`` File: Firecracker maps it privately, so the snapshot's file is never written;
``resume_vm`` false; ``vsock_override``: the clone's agent socket), ``PATCH /drives/root`` to
the clone's disk, ``PATCH /vm Resumed``.

Disks: a snapshot records each drive's ``path_on_host`` and the load reopens that path before
any request could change it, so it must exist then, and must be the clone's copy (the source
VM may be stopped, its disk gone; and a clone must never open the source's or the snapshot's
disk). The root drive is therefore given to Firecracker relative to its working directory
(``firecracker.root_drive_path``): the VM's directory, or the jail's root. The PATCH after the
load (the spec allows it post-boot only; a loaded VM counts as booted, and it is what
firecracker-containerd does between load and resume) then names the same copy explicitly.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from mvm.core.errors import UsageError, VmError
from mvm.runtime.backends.firecracker import (
    JAIL_RAM,
    JAIL_STATE,
    ROOT_DISK_FILE,
    jail_ids,
    jail_root_of,
    root_drive_path,
)
from mvm.runtime.backends.firecracker_api import (
    FirecrackerApi,
    Request,
    drive_update_request,
    snapshot_create_request,
    snapshot_load_request,
    vm_state_request,
)

if TYPE_CHECKING:
    from mvm.core.state import VmPaths, VmRecord

STATE, RAM, DISK = "state", "ram", "disk.raw"  # the files of a Firecracker snapshot's directory
ROOT_DRIVE_ID = "root"
COPY_TIMEOUT_S = 300.0  # a guest's whole RAM, when no reflink is possible


def plan_snapshot(state: str, ram: str) -> list[Request]:
    """What saves a running VM (paths as Firecracker sees them); it stays paused after."""
    return [vm_state_request("Paused"), snapshot_create_request(state, ram)]


def plan_restore(state: str, ram: str, agent_socket: str, *, jailed: bool) -> list[Request]:
    """What turns a bare Firecracker into a running clone (paths as Firecracker sees them)."""
    return [snapshot_load_request(state, ram, resume=False, vsock_uds_path=agent_socket),
            drive_update_request(ROOT_DRIVE_ID, root_drive_path(jailed=jailed)),
            vm_state_request("Resumed")]


def save(api: FirecrackerApi, paths: VmPaths, record: VmRecord, dest: Path) -> dict[str, str]:
    """Write the VM's ``state``, ``ram`` and ``disk.raw`` into ``dest`` (a fresh 0700
    directory), all 0600. Returns the manifest's kind and Firecracker's version."""
    jail = jail_root_of(paths)
    home = jail or paths.dir
    data_disk = home / "data.ext4" if jail is not None else paths.data_disk
    if data_disk.exists():
        raise UsageError(f"VM {record.name} has a data disk, which its snapshot's clones would have to share",
                         "snapshot a VM started without --data-disk")
    disk = home / ROOT_DISK_FILE
    if not disk.is_file():
        raise VmError(f"VM {record.name} has no root disk at {disk}", "stop the VM and start it again")
    version = api.version()
    if jail is None:  # Firecracker writes straight into the snapshot's directory
        state, ram = dest / STATE, dest / RAM
        told = (str(state), str(ram))
    else:  # it sees only its chroot: write there, then move the files out
        state, ram = jail / JAIL_STATE, jail / JAIL_RAM
        told = (f"/{JAIL_STATE}", f"/{JAIL_RAM}")
    owner = jail_ids() if jail is not None else None
    try:
        for path in (state, ram):  # guest memory is never readable by others, not even briefly
            _create_private(path, owner)
        for request in plan_snapshot(*told):
            api.send(request)
        if jail is not None:
            _move_out(state, dest / STATE)
            _move_out(ram, dest / RAM)
        from mvm.runtime.backends.qemu_migration import copy_sparse

        copy_sparse(disk, dest / DISK)  # flushed by the create, and nothing writes it while paused
    finally:
        if jail is not None:
            state.unlink(missing_ok=True)
            ram.unlink(missing_ok=True)
    return {"kind": "ram-file", "hypervisor_version": version}


def load(api: FirecrackerApi, paths: VmPaths, snapshot: Path, expected_version: str) -> None:
    """Restore ``snapshot`` into this VM's bare Firecracker and run it."""
    version = api.version()
    if version != expected_version:
        raise VmError(f"the snapshot was made by Firecracker {expected_version[:64]}; this host runs Firecracker "
                      f"{version}", "take a new snapshot with this Firecracker")
    for name in (STATE, RAM, DISK):
        if not (snapshot / name).is_file():
            raise VmError(f"snapshot {snapshot.name} has no {name} file, which a Firecracker snapshot has",
                          f"remove it: `mvmctl snapshot rm {snapshot.name}`, and take a new one")
    jail = jail_root_of(paths)
    home = jail or paths.dir
    owner = jail_ids() if jail is not None else None
    _copy_private(snapshot / DISK, home / ROOT_DISK_FILE, owner)  # the clone's own disk, never the snapshot's
    copies: list[Path] = []
    if jail is None:
        told = (str(snapshot / STATE), str(snapshot / RAM), str(paths.agent_socket))
    else:  # the jailed process sees only its chroot, as another uid: private copies for it
        copies = [home / JAIL_STATE, home / JAIL_RAM]
        _copy_private(snapshot / STATE, copies[0], owner)
        _copy_private(snapshot / RAM, copies[1], owner)
        told = (f"/{JAIL_STATE}", f"/{JAIL_RAM}", "/agent.sock")
    try:
        for request in plan_restore(*told, jailed=jail is not None):
            api.send(request)
    finally:
        for copy in copies:  # the state is read by then, the memory mapped: their names can go
            copy.unlink(missing_ok=True)


def _create_private(path: Path, owner: tuple[int, int] | None) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)


def _move_out(src: Path, dst: Path) -> None:
    """A file the jailed Firecracker wrote, into the snapshot's directory, owned by us."""
    try:
        os.rename(src, dst)
    except OSError:  # the jail is on another filesystem
        from mvm.runtime.backends.qemu_migration import copy_sparse

        copy_sparse(src, dst)
        src.unlink()
    os.chown(dst, os.getuid(), os.getgid())
    os.chmod(dst, 0o600)


def _copy_private(src: Path, dst: Path, owner: tuple[int, int] | None) -> None:
    """A copy of ``src`` that shares no writes with it (reflinked where the filesystem can,
    sparse always), 0600, owned by ``owner`` (the jail's uid) when given."""
    dst.unlink(missing_ok=True)
    try:
        proc = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)],
                              capture_output=True, text=True, check=False, timeout=COPY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VmError(f"copying {src.name} to {dst} took over {COPY_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split())[:200]
        raise VmError(f"cannot copy {src} to {dst}: {detail or f'cp exited with {proc.returncode}'}")
    os.chmod(dst, 0o600)
    if owner is not None:
        os.chown(dst, *owner)
