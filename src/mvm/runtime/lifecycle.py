"""VM lifecycle functions shared by the CLI, the SDK and MCP: start, list, stop, copy.

Every VM has a supervisor (runtime/supervisor.py). Starting one is a small transaction:
`start_vm` takes the name's lock, writes the record, forks the supervisor and hands back a
:class:`Launch`; only ``commit()`` makes the VM outlive the caller. If the caller dies
first, the supervisor sees its pipe close, stops QEMU and removes the VM's directory, so a
failed or killed `up` leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mvm.core.bootimage import NETWORK_MODES, BootImage, PortForward
from mvm.core.errors import MvmError, UsageError, VmError
from mvm.core.state import (
    DamagedRecord,
    DamagedVm,
    MvmHome,
    VmPaths,
    VmRecord,
    check_vm_name,
    reconcile,
    write_json_atomic,
)
from mvm.runtime import backends, data_disks
from mvm.runtime.client import VmClient
from mvm.runtime.volumes import Mount, VolumeRequest, declared_volumes
from mvm.runtime.volumes import resolve as resolve_volumes

if TYPE_CHECKING:
    from mvm.runtime.snapshot import Snapshot

# The supervisor's socket appears within milliseconds; this is slack, and room for a clone's
# restore, which the launcher does before it execs the supervisor (qemu_restore.RESTORE_TIMEOUT_S).
SUPERVISOR_START_S = 30.0
SUPERVISOR_EXIT_S = 5.0


@dataclass
class Launch:
    """A VM whose supervisor runs but which dies with the caller until ``commit()``."""

    paths: VmPaths
    record: VmRecord
    client: VmClient
    _commit_fd: int
    _name_lock_fd: int

    new_disk: Path | None = None  # a data disk made by this start: removed if it is abandoned

    def commit(self) -> None:
        os.write(self._commit_fd, b"k")
        self.new_disk = None
        self._release()

    def abandon(self) -> None:
        """Close the pipe without committing: the supervisor stops the VM and removes it."""
        if self._commit_fd != -1:
            _remove_new_disk(self.new_disk)
        self._release()

    def _release(self) -> None:
        for fd in (self._commit_fd, self._name_lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._commit_fd = self._name_lock_fd = -1


def choose_backend(home: MvmHome, image: BootImage, requested: str | None,
                   host: backends.Host | None = None) -> backends.Choice:
    """--hypervisor, else mvm.toml's hypervisor, else the first available in priority order."""
    host = host or backends.Host(home)
    wanted = requested if requested not in (None, "auto") else image.hypervisor
    return backends.select_backend(wanted, lambda backend: backend.availability_for(image, host))


def check_argv(argv: list[str] | None) -> None:
    """`run -- ARGV` travels on the kernel command line: refuse what cannot, before booting."""
    if argv is None:
        return
    if not argv or not all(isinstance(a, str) and a and "\0" not in a for a in argv):
        raise UsageError("the command after -- must be one or more non-empty words", "e.g. `mvmctl run -- python3 -V`")
    size = len(json.dumps(argv)) * 4 // 3
    if size > backends.base.ARGV_LIMIT:
        raise UsageError(f"the command after -- is {size} bytes encoded, over the {backends.base.ARGV_LIMIT}-byte "
                         "limit of the kernel command line", "put a script in the image and run that")


def refuse_stub_agent(image: BootImage, allow_stub: bool) -> None:
    """A sealed image is trusted to carry mvm's real agent (its artifact says so); one that does
    not (a test's stub, or an artifact that records nothing) starts only when asked to."""
    if image.agent_binary != "real" and not allow_stub:
        raise UsageError(f"image {image.name}'s artifact records agent_binary = {image.agent_binary!r}, not 'real': "
                         "its agent is not mvm's", "rebuild it with this mvm, or pass --allow-stub to run it anyway")


def refuse_unenforced_settings(image: BootImage) -> None:
    """A setting mvm.toml holds that this version would not carry out is refused, not ignored:
    the guest would otherwise run without what its author asked for."""
    if image.network_mode not in NETWORK_MODES:
        raise UsageError(f"image {image.name} asks for [network] mode = {image.network_mode!r}, which this version "
                         "does not know", 'use mode = "deny", "allow-list" or "open"')
    if image.network_mode == "allow-list":
        from mvm.security.egress_policy import EgressPolicy, EntryError

        try:
            EgressPolicy.parse(image.allow)
        except EntryError as err:
            raise UsageError(f"image {image.name}'s [network] allow: {err}", "fix the entry in mvm.toml") from None


def start_vm(home: MvmHome, image: BootImage, *, name: str, mode: str = "detached",
             vcpus: int | None = None, memory_mib: int | None = None, hypervisor: str | None = None,
             progress: Callable[[str], None] | None = None, argv: list[str] | None = None,
             lifetime_s: float | None = None, ephemeral: bool = False, workload_id: str | None = None,
             snapshot: Snapshot | None = None, policies: tuple[str | Path, ...] = (),
             forwards: tuple[PortForward, ...] = (), overcommit: bool = False, allow_stub: bool = False,
             volumes: tuple[VolumeRequest, ...] = (), workload_dir: Path | None = None,
             allow_broad_mount: bool = False, resumes: bool = False) -> Launch:
    """Register ``name`` and boot ``image`` under a new supervisor (running ``argv`` instead of
    its entrypoint when given). ``lifetime_s``: its supervisor stops it that long after now;
    ``ephemeral``: nothing of it is kept once it stops; ``snapshot``: start from it instead of
    booting (runtime/cloning.py has checked it fits); ``overcommit``: boot it even if it asks
    for more than the host has (runtime/sizing.py); ``volumes`` (besides mvm.toml's) are checked
    against ``workload_dir`` (runtime/volumes.py). The plan is admitted first (the home's
    policy and ``policies``; ``forwards`` are the ones `up` will add). A VM suspended to disk
    is replaced only by its own resume (``resumes``)."""
    from mvm.runtime import plan

    check_vm_name(name)
    check_argv(argv)
    refuse_stub_agent(image, allow_stub)
    refuse_unenforced_settings(image)
    mounts = check_volumes(home, image, volumes, workload_dir, allow_broad_mount, snapshot)
    admitted = plan.admit(home, plan.make_plan(home, image, name=name, vcpus=vcpus, memory_mib=memory_mib,
                                               hypervisor=hypervisor, argv=argv, forwards=forwards,
                                               overcommit=overcommit, mounts=mounts),
                          policies, sealed=image.sealed, record=False)
    paths = home.vm(name)
    host = backends.Host(home)
    vm_backend = choose_backend(home, image, hypervisor, host).backend
    paths.check_socket_paths(vm_backend.socket_paths(paths))
    vm_backend.prepare_image(image, progress)
    accel = vm_backend.accel_for(image, host)
    home.vms.mkdir(parents=True, exist_ok=True)
    name_lock = os.open(home.name_lock(name), os.O_RDWR | os.O_CREAT, 0o600)
    os.fchmod(name_lock, 0o600)  # (one made by an older mvm was 0644)
    try:
        fcntl.flock(name_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(name_lock)
        raise UsageError(f"VM {name} is being started by another mvmctl", "wait for it, or pick another --name") from None
    try:
        existing = settle(paths)
        if existing is not None and existing.running:
            raise UsageError(f"VM {name} is already running", f"`mvmctl down {name}` first, or pick another --name")
        if existing is not None and existing.suspended and not resumes:
            raise UsageError(f"VM {name} is suspended to disk", f"`mvmctl resume {name}`, or `mvmctl down {name}` first")
        if existing is not None:
            # Stopped, but its supervisor may still be tidying up by path (an attached `run`
            # returns on the exit frame, before that): let it finish before the name is reused.
            wait_supervisor_exit(paths, existing)
        # A suspended VM being resumed is set aside, not removed, until its start is committed
        # (launcher.launch; the supervisor removes it then, or puts it back if abandoned).
        replaced = set_aside_dir(home, name) if existing is not None and existing.suspended else None
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)  # (one a supervisor that crashed left)
        else:
            shutil.rmtree(paths.dir, ignore_errors=True)
        _sweep_abandoned_starts(home, name)
        # Registered out of sight until the supervisor exists (see launcher.launch); 0700:
        # sockets inside, only the owner may drive the VM.
        staged = VmPaths(Path(tempfile.mkdtemp(prefix=f".{name}.starting-", dir=home.vms)))
        staged.dir.chmod(0o700)
        record = VmRecord(name=name, artifact_key=image.key, artifact_name=image.name, backend=vm_backend.name,
                          accel=accel, mode=mode, vcpus=vcpus or image.vcpus, memory_mib=memory_mib or image.memory_mib,
                          accessible=image.accessible, sealed=image.sealed,
                          uids={"agent": image.agent_uid, "entrypoint": image.entrypoint_uid}, argv=argv,
                          deadline=None if lifetime_s is None else time.time() + lifetime_s, ephemeral=ephemeral,
                          workload_id=workload_id)
        record.network = image.network_mode
        record.allow = list(image.allow) if image.network_mode == "allow-list" else []
        record.volumes = [mount.as_dict() for mount in mounts]
        record.policies = [str(Path(p).resolve()) for p in policies]  # (`mvmctl network` holds changes to them)
        record.arch = image.arch
        if snapshot is not None:
            record.snapshot, record.restore_from = snapshot.tag, str(snapshot.dir)
            record.vcpus, record.memory_mib = snapshot.manifest.vcpus, snapshot.manifest.memory_mib
        new_disk = None
        try:
            keeps_data = bool(image.data_disk_bytes) and not ephemeral and snapshot is None  # (a sandbox keeps nothing)
            if keeps_data:
                data_disks.attach_kept(home, vm_backend, staged, name, progress)
            vm_backend.prepare(image, record, staged)
            if keeps_data:
                new_disk = data_disks.keep_new(home, vm_backend, staged, name)
            write_json_atomic(staged.mode, {"mode": mode})
            record.save(staged)
            launch = _fork_supervisor(paths, staged, image, record, name_lock, replaced)
        except BaseException:
            shutil.rmtree(staged.dir, ignore_errors=True)
            _remove_new_disk(new_disk)
            raise
        launch.new_disk = new_disk
    except BaseException:
        os.close(name_lock)
        raise
    try:  # (written while the guest boots; a sealed image's VM goes if it cannot be)
        plan.record_admitted(home, admitted, sealed=image.sealed)
    except BaseException:
        launch.abandon()
        launch.client.close()
        wait_supervisor_exit(launch.paths, launch.record)  # (it removes the VM: nothing is left)
        raise
    return launch


def set_aside_dir(home: MvmHome, name: str) -> Path:
    """Where a suspended VM's directory waits while its resume starts (launcher.put_back)."""
    return home.vms / f".{name}.resuming"


def check_volumes(home: MvmHome, image: BootImage, requests: tuple[VolumeRequest, ...], workload_dir: Path | None,
                  allow_broad: bool, snapshot: Snapshot | None = None) -> tuple[Mount, ...]:
    """mvm.toml's volumes and ``requests``, checked (runtime/volumes.py). A clone has none: its
    snapshot was taken of a VM without any, and a volume cannot join a running guest."""
    wanted = (*declared_volumes(image), *requests)
    if snapshot is not None and wanted:
        raise UsageError(f"a clone of snapshot {snapshot.tag} cannot mount volumes (image {image.name} declares "
                         f"{len(declared_volumes(image))}, -v gave {len(requests)})",
                         "boot it instead (`mvmctl up --cold`), with its volumes")
    return resolve_volumes(wanted, workload_dir=workload_dir, mvm_home=home.root, allow_broad=allow_broad)


def _remove_new_disk(path: Path | None) -> None:
    """A start that fails leaves nothing, not even the data disk it made (a kept one stays)."""
    if path is not None and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path is not None:
        path.unlink(missing_ok=True)


def _sweep_abandoned_starts(home: MvmHome, name: str) -> None:
    """Hidden registrations of ``name`` whose `up` died before forking its supervisor."""
    for entry in home.vms.glob(f".{name}.starting-*"):
        if not VmPaths(entry).supervisor_alive():
            shutil.rmtree(entry, ignore_errors=True)


def settle(paths: VmPaths) -> VmRecord | None:
    """``reconcile``, plus releasing what a dead VM's backend may still hold (a container)."""
    record = reconcile(paths)
    if record is None:
        return None
    try:
        backend = backends.get(record.backend)
    except UsageError:
        raise DamagedRecord(DamagedVm(paths.name, f"its backend {record.backend[:40]!r} is not one mvm knows")) from None
    if record.state == "stopped" and not record.backend_released and backend.release(paths, record):
        record.backend_released = True
        record.save(paths)
    return record


def _fork_supervisor(paths: VmPaths, staged: VmPaths, image: BootImage, record: VmRecord,
                     name_lock: int, replaced: Path | None = None) -> Launch:
    from mvm.runtime import launcher

    # The supervisor lock is taken here and inherited, so the VM is never without a live owner.
    lock = os.open(staged.supervisor_lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    commit_read, commit_write = os.pipe()
    try:
        pid = launcher.launch(paths, staged.dir, image, record, lock, commit_read, replaced)
    finally:
        os.close(commit_read)
        os.close(lock)
    deadline = time.monotonic() + SUPERVISOR_START_S
    try:
        while True:
            try:
                client = VmClient.connect(paths)
                break
            except VmError:
                # Staged first: the supervisor renames staged -> paths.dir, lock and all.
                alive = staged.supervisor_alive() or paths.supervisor_alive()
                if not alive or time.monotonic() > deadline:
                    record = reconcile(paths) or record
                    detail = _tail(paths.supervisor_log)
                    shutil.rmtree(staged.dir, ignore_errors=True)
                    if replaced is None:
                        shutil.rmtree(paths.dir, ignore_errors=True)
                    elif replaced.is_dir() and not alive:  # (a live one puts it back itself as it ends)
                        launcher.put_back(replaced, paths.dir)
                    raise VmError(f"the supervisor of VM {paths.name} (pid {pid}) did not start: "
                                  f"{record.stop_reason or detail or 'no reason given'}") from None
                time.sleep(0.005)
    except BaseException:
        os.close(commit_write)  # (an `up` that gives up: its supervisor abandons the start)
        raise
    return Launch(paths, record, client, commit_write, name_lock)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def add_forward(client: VmClient, forward: PortForward) -> list[dict[str, object]]:
    """The address was written by the user (or defaults to loopback): a non-loopback one is
    what they asked for, which the supervisor wants said explicitly. Returns every forward.
    On a sealed VM a forward whose audit record cannot be written is taken down again and
    the call fails (AuditError)."""
    started, error, reply = time.monotonic(), None, {}
    detail = {"host_addr": forward.host_addr, "host_port": forward.host_port, "guest_port": forward.guest_port}
    try:
        reply = client.call("forward", host_addr=forward.host_addr, host_port=forward.host_port,
                            guest_port=forward.guest_port, public=True)
    except VmError as err:
        error = err
        raise
    finally:
        try:
            _audit_client_action(client, "forward", started, error, detail)
        except MvmError:  # (the AuditError of a sealed VM: no forward runs unrecorded)
            try:
                client.call("unforward", host_addr=forward.host_addr, host_port=forward.host_port)
            except VmError:
                pass
            raise
    return list(reply.get("forwards") or [])


def _audit_client_action(client: VmClient, operation: str, started: float, error: BaseException | None,
                         detail: dict[str, object]) -> str | None:
    """The record of an action asked of a VM's supervisor by this process, strict (a failed
    append raises AuditError) when the action worked and the VM runs a sealed image, or its
    record cannot be read to say (an action that failed raises its own error either way)."""
    if client.paths is None:
        return None
    home = MvmHome(client.paths.dir.parent.parent)
    try:
        vm: VmRecord | None = VmRecord.load(client.paths)
    except (OSError, ValueError, TypeError, KeyError, MvmError):
        vm = None
    return audit_action(home, operation, name=client.name, vm=vm, started=started, error=error,
                        sealed=error is None and (vm.sealed if vm is not None else True), detail=detail)


def audit_action(home: MvmHome, operation: str, **fields: object) -> str | None:
    """One audit record of a lifecycle action done by this process (security/audit.py's
    record_action; loaded only when a record is written)."""
    from mvm.security import audit

    return audit.record_action(home, operation, **fields)  # type: ignore[arg-type]


def remove_forward(client: VmClient, host_port: int, host_addr: str | None = None) -> list[dict[str, object]]:
    """Stop forwarding ``host_port`` (on ``host_addr``, or whichever address it listens on);
    the connections it carries are closed. Returns the forwards left. Recorded as
    ``forward-remove``; on a sealed VM a removal that cannot be recorded fails (AuditError),
    though the forward is gone by then (closing a way in needs no undoing)."""
    started, error, reply = time.monotonic(), None, {}
    try:
        reply = client.call("unforward", host_addr=host_addr, host_port=host_port)
    except VmError as err:
        error = err
        raise
    finally:
        _audit_client_action(client, "forward-remove", started, error,
                             {"host_addr": host_addr, "host_port": host_port})
    return list(reply.get("forwards") or [])


def list_forwards(home: MvmHome, name: str) -> list[PortForward]:
    """A running VM's forwards, from its record (a stopped VM has none)."""
    _, record = require_vm(home, name)
    return recorded_forwards(record) if record.running else []


def recorded_forwards(record: VmRecord) -> list[PortForward]:
    """The forwards a record lists (a suspended VM's are set up again when it resumes)."""
    found = []
    for entry in record.forwards:  # (the record is a file under $MVM_HOME: checked, not trusted)
        try:
            found.append(PortForward(str(entry["host_addr"]), int(entry["host_port"]), int(entry["guest_port"])))
        except (KeyError, TypeError, ValueError):
            raise VmError(f"the record of VM {record.name} holds a forward that is not one: {str(entry)[:80]}",
                          f"`mvmctl down {record.name}` and start it again") from None
    return found


def add_start_forwards(launch: Launch, image: BootImage, forwards: tuple[PortForward, ...]) -> dict[str, object]:
    """Wait until the VM is ready, then set up mvm.toml's [network] forward and ``forwards``
    (before the caller commits: one that cannot listen fails the start). The ready reply."""
    reply = launch.client.call("ready")
    if reply.get("state") == "running":
        for forward in dict.fromkeys([*image.forwards, *forwards]):  # (a resumed VM's list holds the image's)
            add_forward(launch.client, forward)
    return reply


def up(home: MvmHome, image: BootImage, *, name: str, vcpus: int | None = None, memory_mib: int | None = None,
       hypervisor: str | None = None, progress: Callable[[str], None] | None = None,
       forwards: tuple[PortForward, ...] = (), argv: list[str] | None = None, lifetime_s: float | None = None,
       ephemeral: bool = False, workload_id: str | None = None, snapshot: Snapshot | None = None,
       operation: str = "up", on_receipt: Callable[[str], None] | None = None,
       policies: tuple[str | Path, ...] = (), overcommit: bool = False, allow_stub: bool = False,
       volumes: tuple[VolumeRequest, ...] = (), workload_dir: Path | None = None,
       allow_broad_mount: bool = False, resumes: bool = False) -> VmRecord:
    """Start a detached VM and return once its agent answers (or it has already finished).

    Port forwards (the image's and ``forwards``) are set up before the VM is committed: one
    that cannot listen fails the whole `up`, leaving nothing. So is its audit record
    (``operation``: up or run; its id goes to ``on_receipt``): on a sealed image, a VM whose
    start cannot be recorded is not started.
    """
    started = time.monotonic()
    try:
        launch = start_vm(home, image, name=name, mode="detached", vcpus=vcpus, memory_mib=memory_mib,
                          hypervisor=hypervisor, progress=progress, argv=argv, lifetime_s=lifetime_s,
                          ephemeral=ephemeral, workload_id=workload_id, snapshot=snapshot, policies=policies,
                          forwards=forwards, overcommit=overcommit, allow_stub=allow_stub, volumes=volumes,
                          workload_dir=workload_dir, allow_broad_mount=allow_broad_mount, resumes=resumes)
    except Exception as err:
        audit_action(home, operation, name=name, image=image, started=started, error=err, argv=argv)
        raise
    try:
        reply = add_start_forwards(launch, image, forwards)
        receipt = audit_action(home, operation, name=name, image=image, vm=launch.record, started=started,
                               sealed=image.sealed, argv=argv, detail={"state": reply.get("state")})
        launch.commit()
        if receipt is not None and on_receipt is not None:
            on_receipt(receipt)
    finally:
        launch.abandon()
        launch.client.close()
    try:
        record = VmRecord.load(launch.paths)
    except FileNotFoundError:  # an ephemeral VM that ended at once: its supervisor removed it
        raise VmError(f"VM {name} stopped before it was ready", "run its image with `mvmctl run --attached`") from None
    if reply.get("state") == "stopped" and record.exit_status is None:
        raise VmError(f"VM {name} stopped before it was ready: {record.stop_reason}",
                      f"`mvmctl logs {name}` shows its console")
    return record


def require_vm(home: MvmHome, name: str) -> tuple[VmPaths, VmRecord]:
    paths = home.vm(check_vm_name(name))
    record = settle(paths)
    if record is None:
        raise UsageError(f"there is no VM named {name}", "`mvmctl ls` lists them")
    return paths, record


def connect(home: MvmHome, name: str) -> VmClient:
    paths, record = require_vm(home, name)
    if not record.running:
        raise VmError(f"VM {name} is stopped: {record.stop_reason}", "`mvmctl up` starts it again")
    return VmClient.connect(paths)


def list_vms(home: MvmHome) -> list[VmRecord | DamagedVm]:
    """Every VM, reconciled with reality; one whose record cannot be read is listed as damaged
    (with why) and hides none of the others."""
    if not home.vms.is_dir():
        return []
    records: list[VmRecord | DamagedVm] = []
    for entry in sorted(home.vms.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
            try:
                record = settle(VmPaths(entry))
            except DamagedRecord as err:
                records.append(err.damaged)
                continue
            if record is not None:
                records.append(record)
    return records


def down(home: MvmHome, name: str, *, force: bool = False, timeout: float = 10.0,
         purge: bool = False) -> VmRecord | DamagedVm | None:
    """Stop the VM (gracefully unless ``force``), then remove everything it had on disk but its
    kept data disk; ``purge`` removes that too (and works when only the disk is left: None).
    With ``force`` a VM whose record is damaged goes too."""
    paths = home.vm(check_vm_name(name))
    if purge:
        try:
            stopped = down(home, name, force=force, timeout=timeout)
        except UsageError:  # no VM by that name: perhaps only its kept disk is left
            if not data_disks.purge(home, name):
                raise
            return None
        data_disks.purge(home, name)  # (after the stop: nothing has it open any more)
        return stopped
    try:
        _, record = require_vm(home, name)
    except DamagedRecord as err:
        if not force:
            raise
        _stop_unknown_supervisor(paths)
        shutil.rmtree(paths.dir, ignore_errors=True)
        audit_action(home, "down", name=name, detail={"force": True, "damaged": err.damaged.why})
        return err.damaged
    started = time.monotonic()
    record = _until_stopped(paths, record, "stop", force=force, timeout=timeout, reason="stopped by `mvmctl down`")
    shutil.rmtree(paths.dir, ignore_errors=True)
    if record.suspended:
        _drop_suspend_save(home, name, record.suspended)
    audit_action(home, "down", name=name, vm=record, started=started, exit_status=record.exit_status,
                 detail={"force": force, "stop_reason": record.stop_reason})
    return record


def _drop_suspend_save(home: MvmHome, name: str, tag: str) -> None:
    """What `pause --to-disk` saved of VM ``name`` goes with it; unless a clone runs from it
    (`fork`, `pause --to-disk` and `prune` remove it once none does), or the record names a
    snapshot that is not that save (the record is a file: a damaged one is not followed)."""
    from mvm.runtime.snapshot import SnapshotStore

    store = SnapshotStore(home)
    try:
        with store.locked(tag):
            manifest = store.load(tag, check_files=False).manifest
            in_use = any(isinstance(r, VmRecord) and r.running and r.snapshot == tag for r in list_vms(home))
            if manifest.purpose == "suspend" and manifest.source_vm == name and not in_use:
                store.remove(tag)
    except MvmError:
        pass  # no such snapshot (or no such tag): nothing to remove


def _stop_unknown_supervisor(paths: VmPaths) -> None:
    """A damaged record names no pids: ask whatever supervisor holds the VM's lock to stop."""
    if not paths.supervisor_alive():
        return
    try:
        with VmClient.connect(paths) as client:
            client.call("stop", force=True, reason="stopped by `mvmctl down --force` (its record was damaged)")
    except VmError:
        pass
    deadline = time.monotonic() + SUPERVISOR_EXIT_S
    while paths.supervisor_alive():
        if time.monotonic() > deadline:
            raise VmError(f"the supervisor of VM {paths.name} still runs and does not answer",
                          f"find it with `fuser {paths.supervisor_lock}` and stop it")
        time.sleep(0.02)


def _until_stopped(paths: VmPaths, record: VmRecord, request: str, **fields: object) -> VmRecord:
    """Send ``request`` (stop, wait) to a running VM's supervisor, see the supervisor gone,
    and return the final record."""
    if not record.running:
        return record
    try:
        with VmClient.connect(paths) as client:
            client.call(request, **fields)
    except VmError:
        pass  # it stopped on its own meanwhile, or its supervisor died: both fine
    wait_supervisor_exit(paths, record)
    return reconcile(paths) or record


def wait_supervisor_gone(paths: VmPaths) -> None:
    """Once a VM has stopped, wait until its supervisor has tidied up and exited, so that an
    attached `run` returns with the name free for the next one (as `docker run` returns after
    its container is gone)."""
    record = reconcile(paths)
    if record is not None and not record.running:
        wait_supervisor_exit(paths, record)


def wait_supervisor_exit(paths: VmPaths, record: VmRecord) -> None:
    deadline = time.monotonic() + SUPERVISOR_EXIT_S
    while paths.supervisor_alive():
        if time.monotonic() > deadline:
            # Still holding its lock, so the pid is still our supervisor: end it (QEMU follows).
            if record.supervisor_pid:
                os.kill(record.supervisor_pid, signal.SIGKILL)
            deadline = time.monotonic() + SUPERVISOR_EXIT_S
        time.sleep(0.02)


def wait_vm(home: MvmHome, name: str) -> VmRecord:
    """Block until the VM stops; its record then holds the entrypoint's status."""
    paths, record = require_vm(home, name)
    return _until_stopped(paths, record, "wait")


def detach(home: MvmHome, name: str) -> None:
    with connect(home, name) as client:
        client.call("detach")


def logs(home: MvmHome, name: str, sink: Callable[[bytes], None], *, follow: bool = False) -> None:
    paths, record = require_vm(home, name)
    if record.running:
        try:
            with VmClient.connect(paths) as client:
                for frame in client.replies(client.send({"type": "logs", "follow": follow})):
                    sink(frame.body)
                return
        except VmError:
            pass  # stopped meanwhile: the file has everything
    for path in (paths.console_log_previous, paths.console_log):  # (the log is rotated at a size cap)
        try:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    sink(chunk)
        except FileNotFoundError:
            pass
