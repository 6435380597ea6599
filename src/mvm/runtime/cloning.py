"""Snapshots of running VMs, clones started from them, and forks: the functions the CLI, the
SDK and MCP share (runtime/snapshot.py keeps the files; the backend saves and loads).

A clone starts from the snapshot's saved memory instead of booting: its own writable disk
over the snapshot's frozen one, its own agent channel, and — before its agent takes any
work — its own entropy, clock, hostname and machine-id (see guest/agent/identity.py).
"""

from __future__ import annotations

import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from mvm.core.bootimage import BootImage, PortForward
from mvm.core.errors import MvmError, UsageError, VmError
from mvm.core.home import VM_NAME_MAX
from mvm.core.state import MvmHome, VmPaths, VmRecord, check_vm_name, check_vm_name_quietly
from mvm.runtime import backends, launcher, lifecycle
from mvm.runtime.allow_list import check_entries
from mvm.runtime.client import VmClient
from mvm.runtime.snapshot import Snapshot, SnapshotError, SnapshotManifest, SnapshotStore, check_tag

SNAPSHOT_WAIT_S = 300.0  # a stream snapshot writes the guest's whole RAM to disk


def snapshot_vm(home: MvmHome, name: str, tag: str, *, stop: bool = False, purpose: str = "snapshot") -> Snapshot:
    """Save running VM ``name`` as snapshot ``tag``; it runs on afterwards unless ``stop``."""
    check_tag(tag)
    paths, record = lifecycle.require_vm(home, name)
    backends.get(record.backend).require("snapshots", name)
    if not record.running:
        raise VmError(f"VM {name} is stopped: only a running VM can be snapshotted", "`mvmctl up` starts it")
    if record.state == "paused":  # (its agent cannot take the freeze every snapshot starts with)
        raise VmError(f"VM {name} is paused: only a running VM can be saved ({purpose})", f"`mvmctl resume {name}` first")
    if record.volumes:
        shared = ", ".join(str(v.get("host")) for v in record.volumes)
        raise UsageError(f"VM {name} has a live volume ({shared}), so it cannot be saved ({purpose}): its state would "
                         "hold the guest's view of a host directory (cached files, open handles) that no restore "
                         "can give back", "save a VM started without volumes")
    # A VM told to stop is gone once saved: Ctrl-C waits until the save is committed and audited.
    with _interrupt_after() if stop else nullcontext():
        return _save(home, name, tag, stop, purpose, paths, record)


def _save(home: MvmHome, name: str, tag: str, stop: bool, purpose: str, paths: VmPaths, record: VmRecord) -> Snapshot:
    store = SnapshotStore(home)
    started = time.monotonic()
    with store.locked(tag):
        if store.dir(tag).exists():
            raise UsageError(f"snapshot {tag} already exists", f"`mvmctl snapshot rm {tag}` first, or pick another tag")
        staged = store.stage(tag)
        try:
            with VmClient.connect(paths) as client:
                reply = client.call("snapshot", dir=str(staged), stop=stop, wait_s=SNAPSHOT_WAIT_S,
                                    suspend_tag=tag if purpose == "suspend" else None)
            manifest = SnapshotManifest(
                tag=tag, kind=reply["kind"], purpose=purpose, created_at=time.time(), source_vm=name,
                artifact_key=reply["artifact_key"], artifact_name=reply["artifact_name"], backend=reply["backend"],
                accel=reply["accel"], hypervisor_version=reply["hypervisor_version"], vcpus=reply["vcpus"],
                memory_mib=reply["memory_mib"], uids=reply["uids"], sealed=reply["sealed"],
                accessible=reply["accessible"], argv=reply["argv"], network=reply["network"], allow=reply["allow"])
            saved = store.commit(staged, manifest)
        except BaseException as err:
            shutil.rmtree(staged, ignore_errors=True)
            if isinstance(err, Exception):
                lifecycle.audit_action(home, f"{purpose}-create", name=name, vm=record, started=started, error=err,
                                       detail={"tag": tag, "stop": stop})
            raise
    lifecycle.audit_action(home, f"{purpose}-create", name=name, vm=record, started=started, sealed=record.sealed,
                           detail={"tag": tag, "stop": stop, "kind": saved.manifest.kind,
                                   "files": {n: {"size": f.size, "sha256": f.sha256}
                                             for n, f in saved.manifest.files.items()}})
    return saved


def clone_image(home: MvmHome, snapshot: Snapshot) -> BootImage:
    """The image the snapshot was taken of, which must still be in the store: its kernel and
    its root filesystem (the frozen disk's backing file) are part of the snapshot. It runs
    with the network its VM had (`up --network`, `mvmctl network`), not the image's own."""
    manifest = snapshot.manifest
    path = home.store / manifest.artifact_key  # (a checked key: 64 hex digits)
    if not path.is_dir():
        raise SnapshotError(f"snapshot {snapshot.tag} was taken of image {manifest.artifact_name} "
                            f"({manifest.artifact_key[:12]}), which is no longer in the store",
                            f"rebuild that image, or `mvmctl snapshot rm {snapshot.tag}`")
    image = BootImage.open(path)
    if manifest.network is None:  # (an older manifest: its VM ran as the image says, or could not be cloned)
        return image
    check_entries(manifest.allow)
    return replace(image, network_mode=manifest.network,
                   allow=tuple(manifest.allow) if manifest.network == "allow-list" else ())


@dataclass
class CloneRequest:
    """What `up --snapshot` may say: a clone is the snapshot's machine, so sizes can only match."""

    tag: str
    name: str
    vcpus: int | None = None
    memory_mib: int | None = None
    hypervisor: str | None = None
    lifetime_s: float | None = None
    ephemeral: bool = False
    workload_id: str | None = None
    forwards: tuple[PortForward, ...] = ()
    replace_suspended: bool = False  # resume: the name is that of the suspended VM itself
    policies: tuple[str | Path, ...] = ()  # admission policies beyond the home's
    on_receipt: Callable[[str], None] | None = None  # gets the id of the start's audit record
    overcommit: bool = False  # start it even if it is bigger than the host can give (runtime/sizing.py)


def clone(home: MvmHome, request: CloneRequest, progress: Callable[[str], None] | None = None) -> VmRecord:
    """Start VM ``request.name`` from snapshot ``request.tag``; returns once its agent answers
    with its own identity. Fails before anything starts if the snapshot cannot be used."""
    check_vm_name(request.name)
    snapshot = SnapshotStore(home).load(request.tag)
    manifest = snapshot.manifest
    for what, asked, saved in (("--cpus", request.vcpus, manifest.vcpus),
                               ("--memory", request.memory_mib, manifest.memory_mib)):
        if asked is not None and asked != saved:
            raise UsageError(f"{what} {asked} differs from snapshot {request.tag}'s {saved}: a clone is the same machine",
                             f"leave {what} out, or boot cold")
    if request.hypervisor not in (None, "auto", manifest.backend):
        raise UsageError(f"snapshot {request.tag} was taken on {manifest.backend}; it cannot start on {request.hypervisor}",
                         "leave --hypervisor out")
    image = clone_image(home, snapshot)
    backend = backends.get(manifest.backend)
    host = backends.Host(home)
    ok, why = backend.availability_for(image, host)
    if not ok:
        raise UsageError(f"snapshot {request.tag} needs {manifest.backend}, which is not available here: {why}")
    accel = backend.accel_for(image, host)
    if accel != manifest.accel:
        raise SnapshotError(f"snapshot {request.tag} was taken under {manifest.accel}; this host runs {manifest.backend} "
                            f"under {accel}", "take a new snapshot on this host")
    return lifecycle.up(home, image, name=request.name, hypervisor=manifest.backend, progress=progress,
                        forwards=request.forwards, argv=manifest.argv, lifetime_s=request.lifetime_s,
                        policies=request.policies, on_receipt=request.on_receipt, overcommit=request.overcommit, ephemeral=request.ephemeral,
                        workload_id=request.workload_id, snapshot=snapshot, resumes=request.replace_suspended,
                        operation="resume-from-disk" if request.replace_suspended else "clone")


def clones_by_snapshot(home: MvmHome) -> dict[str, list[str]]:
    """Each snapshot's running clones: they read its files as long as they run."""
    users: dict[str, list[str]] = {}
    for record in lifecycle.list_vms(home):
        if isinstance(record, VmRecord) and record.running and record.snapshot:
            users.setdefault(record.snapshot, []).append(record.name)
    return users


def remove_snapshot(home: MvmHome, tag: str) -> None:
    store = SnapshotStore(home)
    if not store.dir(tag).exists() and not store.dir(tag).is_symlink():
        raise SnapshotError(f"there is no snapshot {tag}", "`mvmctl snapshot ls` lists them")
    with store.locked(tag):
        records = [r for r in lifecycle.list_vms(home) if isinstance(r, VmRecord)]
        users = [r.name for r in records if r.running and r.snapshot == tag]
        if users:
            raise UsageError(f"snapshot {tag} is in use by running clone{'s' if len(users) > 1 else ''} "
                             f"{', '.join(users)}", f"`mvmctl down {users[0]}` first")
        waiting = [r.name for r in records if r.suspended == tag]
        if waiting:
            raise UsageError(f"snapshot {tag} holds VM {waiting[0]}, suspended to disk",
                             f"`mvmctl resume {waiting[0]}`, or `mvmctl down {waiting[0]}` (which removes it)")
        sealed = _snapshot_sealed(store, tag)
        store.remove(tag)
    lifecycle.audit_action(home, "snapshot-rm", name=None, sealed=sealed, detail={"tag": tag, "sealed": sealed})


def _snapshot_sealed(store: SnapshotStore, tag: str) -> bool:
    """Whether the snapshot was taken of a sealed image (its removal must then be recorded);
    a manifest that cannot be read counts as sealed (doubt is strict)."""
    try:
        return store.load(tag, check_files=False).manifest.sealed
    except MvmError:
        return True


def unneeded_snapshots(home: MvmHome) -> list[Snapshot]:
    """The snapshots forks and suspends made that nothing needs any more: no running VM was
    started from one, and no suspended VM is waiting to be resumed from it."""
    records = [r for r in lifecycle.list_vms(home) if isinstance(r, VmRecord)]
    needed = {r.snapshot for r in records if r.running} | {r.suspended for r in records if r.suspended}
    return [s for s in SnapshotStore(home).list()
            if isinstance(s, Snapshot) and s.manifest.purpose in ("fork", "suspend") and s.tag not in needed]


def sweep_unused_snapshots(home: MvmHome) -> list[str]:
    """Remove what :func:`unneeded_snapshots` finds (`fork`, `pause --to-disk` and `prune` do)."""
    removed = []
    for saved in unneeded_snapshots(home):
        try:
            remove_snapshot(home, saved.tag)
            removed.append(saved.tag)
        except MvmError:
            pass  # started being used meanwhile, or already gone
    return removed


def suspend_vm(home: MvmHome, name: str) -> Snapshot:
    """Save running VM ``name`` to disk and stop it (its memory is freed); ``resume_suspended``
    brings it back with its processes, from a new supervisor, even after a reboot."""
    paths, record = lifecycle.require_vm(home, name)
    if record.ephemeral:
        raise UsageError(f"VM {name} is removed as soon as it stops (an SDK sandbox), so it cannot be suspended",
                         "pause it without --to-disk")
    sweep_unused_snapshots(home)
    # (the supervisor marks the record suspended as it stops the VM: see Supervisor.snapshot)
    saved = snapshot_vm(home, name, f"suspend-{name}-{time.time_ns() // 1_000_000:x}", stop=True, purpose="suspend")
    lifecycle.wait_supervisor_exit(paths, record)  # (its memory is free once this returns)
    return saved


def resume_suspended(home: MvmHome, name: str) -> VmRecord:
    """Start the suspended VM ``name`` again from its save, with its forwards; if that fails
    or is interrupted, it stays suspended (a restore never changes the save)."""
    paths, record = lifecycle.require_vm(home, name)
    if not record.suspended or record.running:
        raise UsageError(f"VM {name} is not suspended to disk", "`mvmctl resume` thaws a paused VM")
    lifetime = None if record.deadline is None else max(1.0, record.deadline - time.time())
    request = CloneRequest(tag=record.suspended, name=name, replace_suspended=True, ephemeral=record.ephemeral,
                           workload_id=record.workload_id, forwards=tuple(lifecycle.recorded_forwards(record)),
                           policies=tuple(record.policies), lifetime_s=lifetime)
    try:
        return clone(home, request)
    except BaseException:
        _keep_suspended(home, paths, record)
        raise


def _keep_suspended(home: MvmHome, paths: VmPaths, record: VmRecord) -> None:
    """After a resume that failed: its start set the suspended VM's directory aside (never
    removed it), and its supervisor, if it got that far, puts it back as it ends. What is
    left to do here is for a supervisor that died before it could."""
    deadline = time.monotonic() + lifecycle.SUPERVISOR_EXIT_S
    while paths.supervisor_alive() and time.monotonic() < deadline:  # (the new supervisor's: not killed here)
        time.sleep(0.02)
    current = lifecycle.reconcile(paths)
    if current is not None and (current.running or current.suspended == record.suspended):
        return  # (it is back; or a VM of that name runs: this resume's, committed, or another's)
    aside = lifecycle.set_aside_dir(home, paths.name)
    if aside.is_dir() and not paths.supervisor_alive():
        launcher.put_back(aside, paths.dir)


_HOLDING: list[int] = []  # Ctrl-Cs held by the _interrupt_after block that is open (blocks nest into it)


@contextmanager
def _interrupt_after() -> Iterator[None]:
    """Ctrl-C is held until the block ends (then raised): a step that must not be cut short.
    Only in the main thread, where Python delivers signals (the SDK may call from others),
    and not where SIGINT is ignored (a background job)."""
    held = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread() or held is signal.SIG_IGN
            or held is _hold):
        yield
        return
    _HOLDING.clear()
    signal.signal(signal.SIGINT, _hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, held)
    if _HOLDING:
        raise KeyboardInterrupt


def _hold(signum: int, frame: object) -> None:
    _HOLDING.append(signum)


@dataclass
class ForkResult:
    name: str
    record: VmRecord | None = None
    error: str | None = None


def fork_vm(home: MvmHome, name: str, count: int, *, prefix: str | None = None,
            progress: Callable[[str], None] | None = None, lifetime_s: float | None = None,
            ephemeral: bool = False) -> tuple[Snapshot, list[ForkResult]]:
    """``count`` live copies of running VM ``name``, through a snapshot kept as long as any of
    them runs (`mvmctl snapshot rm` refuses it until then). Each copy succeeds or fails alone.
    They are named PREFIX-N with the first numbers no VM has, so forking again adds copies."""
    if not 1 <= count <= 64:
        raise UsageError(f"--count {count} is out of range", "fork 1 to 64 copies at a time")
    prefix = prefix or f"{name}-fork"
    taken = {vm.name for vm in lifecycle.list_vms(home)}
    names = [n for n in (f"{prefix}-{i}" for i in range(1, count + len(taken) + 1)) if n not in taken][:count]
    if check_vm_name_quietly(names[-1]) is None:  # (the longest)
        raise UsageError(f"the copies' names ({names[0]}, ...) are not valid VM names",
                         f"give a shorter --name-prefix (VM names are up to {VM_NAME_MAX} lowercase letters, "
                         "digits, '.', '_' or '-')")
    sweep_unused_snapshots(home)
    tag = check_tag(f"fork-{name}-{time.time_ns() // 1_000_000:x}")
    snapshot = snapshot_vm(home, name, tag, purpose="fork")
    results: list[ForkResult] = []
    for vm_name in names:
        try:
            request = CloneRequest(tag=tag, name=vm_name, lifetime_s=lifetime_s, ephemeral=ephemeral)
            results.append(ForkResult(vm_name, clone(home, request, progress)))
        except MvmError as err:
            results.append(ForkResult(vm_name, error=str(err)))
    return snapshot, results


def build_template(home: MvmHome, image: BootImage, tag: str, *, hypervisor: str | None = None,
                   progress: Callable[[str], None] | None = None) -> Snapshot:
    """Boot ``image`` until its agent answers, save it as template ``tag`` and stop it. An
    older template of that tag is replaced (unless a clone still runs from it) once the new
    one's VM is up: a boot that fails leaves the old one."""
    check_tag(tag)
    if image.data_disk_bytes:
        raise UsageError(f"image {image.name} has a data disk (/data), which a template's clones would have to share",
                         "make templates of images without one (mvm.toml's data_disk, `build --data-disk`)")
    store = SnapshotStore(home)
    replaces = store.dir(tag).exists()
    if replaces:
        try:
            old = store.load(tag, check_files=False)
        except SnapshotError:
            old = None
        if old is None or old.manifest.purpose != "template":
            raise UsageError(f"snapshot {tag} exists and is not a template", "pick another --tag")
    name = f"template-{secrets.token_hex(4)}"
    lifecycle.up(home, image, name=name, hypervisor=hypervisor, progress=progress, ephemeral=True)
    try:
        if replaces:
            remove_snapshot(home, tag)
        return snapshot_vm(home, name, tag, stop=True, purpose="template")
    finally:
        try:
            lifecycle.down(home, name, force=True)
        except MvmError:
            pass  # ephemeral: already gone once stopped


def find_template(home: MvmHome, image: BootImage, backend: str, accel: str) -> Snapshot | None:
    """The newest template of exactly this image on this backend, if its files still check out."""
    store = SnapshotStore(home)
    candidates = [s for s in store.list()
                  if isinstance(s, Snapshot) and s.manifest.purpose == "template"
                  and s.manifest.artifact_key == image.key and s.manifest.backend == backend
                  and s.manifest.accel == accel]
    for candidate in sorted(candidates, key=lambda s: s.manifest.created_at, reverse=True):
        try:
            store.check_files(candidate)
        except SnapshotError:
            continue
        return candidate
    return None


def template_to_clone(home: MvmHome, image: BootImage, *, hypervisor: str | None, vcpus: int | None,
                      memory_mib: int | None, make_as: str | None = None,
                      announce: Callable[[], None] | None = None) -> str | None:
    """The tag of a template of exactly ``image`` to start from instead of booting, on the
    backend `up` would choose, when its sizes are the ones asked for (None: boot). With
    ``make_as`` one is made under that tag if there is none yet (the SDK's built-ins)."""
    if make_as is None and (not home.snapshots.is_dir()
                            or not any(p for p in home.snapshots.iterdir() if not p.name.startswith("."))):
        return None  # the common case, without touching backends or keys
    host = backends.Host(home)
    backend = lifecycle.choose_backend(home, image, hypervisor, host).backend
    if not backend.capabilities.snapshots:
        return None
    accel = backend.accel_for(image, host)
    found = (find_template(home, image, backend.name, accel) if make_as is None
             else template_for(home, image, make_as, backend.name, accel, announce))
    if found is None or vcpus not in (None, found.manifest.vcpus) or memory_mib not in (None, found.manifest.memory_mib):
        return None
    return found.tag


def template_for(home: MvmHome, image: BootImage, tag: str, backend: str, accel: str,
                 announce: Callable[[], None] | None = None) -> Snapshot:
    """A template of ``image``: the newest that exists, else made now as ``tag``. Many
    threads or processes asking at once make it once."""
    found = find_template(home, image, backend, accel)
    if found is not None:
        return found
    with SnapshotStore(home).locked(tag, what="building-"):
        found = find_template(home, image, backend, accel)  # another made it while we waited
        if found is None:
            if announce is not None:
                announce()
            found = build_template(home, image, tag, hypervisor=backend)
    return found
