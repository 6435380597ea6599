"""`mvmctl prune`: remove what nothing uses any more, and say how many bytes that freed.

What goes: stopped VMs' directories; store artifacts that no running VM, snapshot, ref or
stamp names; images a backend made from artifacts that are gone (docker: ones this
MVM_HOME imported, found by their label); cached .debs that no kept artifact's lock names;
scratch directories (``tmp/<purpose>-<pid>-*``, build staging, downloads) of processes that
are gone; snapshots that a fork or `pause --to-disk` made and no VM needs any more; and, only
when asked (``disks``), data disks kept for VM names that are not running.

What never goes: anything a running VM or a snapshot uses, a VM suspended to disk, or a
snapshot someone made by name (`snapshot create`, `template build`). Everything under $MVM_HOME is read
as hostile input, and doubt keeps things: a snapshot manifest that cannot be read, or a running
VM whose record cannot be, means no artifact is removed (and the report says why).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvm.core.bootimage import DEBS_FILE
from mvm.core.errors import MvmError
from mvm.core.state import DamagedRecord, MvmHome, VmPaths
from mvm.runtime import backends
from mvm.runtime.process import pid_alive
from mvm.runtime.snapshot import read_signed

KEY = re.compile(r"[0-9a-f]{64}")
SCRATCH = re.compile(r"^[a-z-]+-(\d+)-")  # home.scratch(): <purpose>-<pid>-*
APT_SCRATCH = re.compile(r"^apt-(\d+)-")  # a build resolving packages (build/packages.py)
STAGING = re.compile(r"^\.staging-(\d+)-")  # store staging of a build (build/store.py)
DOWNLOAD = re.compile(r"^\.download-(\d+)-")  # .debs being downloaded (build/packages.py)
# Scratch trees older versions left in the system /tmp, without a pid. Each was bounded in time
# by the timeouts of what filled it (debugfs 300 s + docker import 600 s; apt 2 x 600 s), so one
# older than this cannot belong to a live process.
LEGACY_TMP = ("mvm-docker-import-", "mvm-apt-")
LEGACY_AGE_S = 3600


@dataclass(frozen=True)
class Removed:
    kind: str  # vm, artifact, image, deb, scratch, stamp, disk, snapshot (a fork's or a resumed suspend's)
    name: str
    bytes: int
    path: str | None = None


@dataclass
class PruneReport:
    dry_run: bool
    removed: list[Removed] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)  # {kind, name, why}: what was left, and why
    notes: list[str] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "freed_bytes": self.freed_bytes,
                "removed": [asdict(r) for r in self.removed], "kept": self.kept, "notes": self.notes}


def tree_size(path: Path) -> int:
    """Bytes on disk (allocated blocks: a sparse disk counts what it holds), links not followed."""
    try:
        top = path.lstat()
    except OSError:
        return 0
    if path.is_symlink() or not path.is_dir():
        return top.st_blocks * 512
    total = top.st_blocks * 512
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def remove_path(path: Path) -> None:
    """A file, a link (never what it points at) or a whole directory."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class Pruner:
    def __init__(self, home: MvmHome, dry_run: bool) -> None:
        self.home = home
        self.report = PruneReport(dry_run)

    def drop(self, kind: str, name: str, path: Path | None, size: int | None = None) -> None:
        """Remove ``path`` (unless this is a dry run) and count it."""
        size = tree_size(path) if size is None and path is not None else (size or 0)
        if not self.report.dry_run and path is not None:
            remove_path(path)
        self.report.removed.append(Removed(kind, name, size, str(path) if path is not None else None))

    def keep(self, kind: str, name: str, why: str) -> None:
        self.report.kept.append({"kind": kind, "name": name, "why": why})

    # -- snapshots -------------------------------------------------------------------------------

    def leftover_snapshots(self) -> None:
        """Snapshots made by forks and `pause --to-disk` that no VM needs any more (those made
        by `snapshot create` and `template build` are the user's: only `snapshot rm` removes them)."""
        from mvm.core.errors import MvmError
        from mvm.runtime import cloning
        from mvm.security.audit import AuditError

        for saved in cloning.unneeded_snapshots(self.home):
            size = tree_size(saved.dir)
            if not self.report.dry_run:
                try:
                    cloning.remove_snapshot(self.home, saved.tag)
                except AuditError as err:  # removed, but its own record could not be written
                    self.report.notes.append(f"snapshot {saved.tag}: {err.message}")
                except MvmError as err:
                    self.keep("snapshot", saved.tag, err.message)
                    continue
            self.report.removed.append(Removed("snapshot", saved.tag, size, str(saved.dir)))

    # -- VMs -------------------------------------------------------------------------------------

    def vms(self) -> tuple[set[str], set[str], str | None]:
        """Remove stopped VMs' directories. Returns the artifact keys running VMs use, their
        names, and why artifacts cannot be pruned at all (a running VM's record is damaged)."""
        from mvm.runtime.lifecycle import settle

        used: set[str] = set()
        running: set[str] = set()
        unknown: str | None = None
        for entry in _entries(self.home.vms):
            if entry.is_symlink() or not entry.is_dir():
                continue
            name = entry.name
            if name.startswith("."):  # a registration whose `up` died (vms/.<name>.starting-*)
                owner = name[1:].split(".starting-", 1)[0]
                if ".starting-" in name and not VmPaths(entry).supervisor_alive():
                    self._drop_vm(owner, f"{owner} (an abandoned start)", entry)
                continue
            paths = VmPaths(entry)
            try:
                record = settle(paths)
            except DamagedRecord as err:
                if paths.supervisor_alive():
                    running.add(name)
                    unknown = f"VM {name} runs but its record is damaged ({err.damaged.why}): its artifact is unknown"
                    self.keep("vm", name, "it runs (its record is damaged)")
                else:
                    self._drop_vm(name, f"{name} (damaged record)", entry)
                continue
            if record is None:  # a directory with no record, and no supervisor
                if not paths.supervisor_alive():
                    self._drop_vm(name, f"{name} (no record)", entry)
                continue
            if record.running:
                used.add(record.artifact_key)
                running.add(name)
                self.keep("vm", name, f"it is {record.state}")
            elif record.suspended:  # stopped, but `mvmctl resume` brings it back: the user's to drop
                self.keep("vm", name, f"it is suspended to disk (`mvmctl down {name}` removes it)")
            else:
                self._drop_vm(name, f"{name} (stopped)", entry)
        return used, running, unknown

    def vms_in_use(self) -> tuple[set[str], str | None]:
        """Artifact keys of running VMs, touching nothing (and why they cannot be known, if so)."""
        used: set[str] = set()
        for entry in _entries(self.home.vms):
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            paths = VmPaths(entry)
            if not paths.supervisor_alive():
                continue
            try:
                key = json.loads(paths.record.read_text())["artifact_key"]
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
                return used, f"VM {entry.name} runs but its record cannot be read: its artifact is unknown"
            used.add(str(key))
        return used, None

    def _drop_vm(self, name: str, label: str, entry: Path) -> bool:
        """Remove a VM's directory while holding its name's lock, so an `up` starting that name
        now cannot lose its files to us (False, and nothing removed, if one holds it)."""
        if self.report.dry_run:  # (removes nothing, so takes no lock and creates no lock file)
            self.drop("vm", label, entry)
            return True
        fd = os.open(self.home.name_lock(name), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.keep("vm", name, "an `up` of that name is starting it")
            return False
        try:
            self.drop("vm", label, entry)
        finally:
            os.close(fd)
        return True

    # -- artifacts -------------------------------------------------------------------------------

    def referenced(self) -> tuple[set[str], str | None]:
        """Keys a ref, a stamp or a snapshot names; and why nothing may go, if a snapshot's
        manifest cannot be read (it might name any artifact)."""
        keys = {k for directory in (self.home.refs, self.home.stamps) for f in _files(directory) if (k := _read_key(f))}
        snapshots, damaged = self.snapshot_keys()
        return keys | snapshots, damaged

    def snapshot_keys(self) -> tuple[set[str], str | None]:
        """Keys snapshots were taken from (snapshots/<tag>/manifest.json's artifact_key)."""
        keys: set[str] = set()
        if self.home.snapshots.is_dir():
            for snapshot in sorted(self.home.snapshots.iterdir()):
                if snapshot.name.startswith(".") or not snapshot.is_dir():
                    continue  # (one being written: taken from a running VM, whose artifact is kept anyway)
                try:
                    key = read_signed(snapshot / "manifest.json")["manifest"].get("artifact_key")
                    if not isinstance(key, str) or not KEY.fullmatch(key):
                        raise ValueError(f"artifact_key is {str(key)[:40]!r}")
                except (OSError, ValueError) as err:
                    why = f"snapshot {snapshot.name[:60]!r} has no readable manifest ({type(err).__name__}: {str(err)[:80]})"
                    return keys, why
                keys.add(key)
        return keys, None

    def artifacts(self, used: set[str], unknown: str | None) -> set[str]:
        """Remove unused artifacts; returns the keys kept."""
        present = {p.name for p in _entries(self.home.store) if KEY.fullmatch(p.name) and p.is_dir()}
        referenced, damaged = self.referenced()
        why_all = unknown or damaged
        if why_all:
            self.report.notes.append(f"no artifact was removed: {why_all}")
            return present
        kept = set()
        for key in sorted(present):
            if key in used:
                self.keep("artifact", key, "a running VM uses it")
                kept.add(key)
            elif key in referenced:
                kept.add(key)  # (a ref, a stamp or a snapshot names it: the ordinary case, not listed)
            else:
                self.drop("artifact", f"{_artifact_name(self.home.store / key)} {key[:16]}", self.home.store / key)
        return kept

    def stale_stamps(self, kept: set[str]) -> None:
        """Stamps naming an artifact the store no longer has (they are ignored anyway)."""
        for file in _files(self.home.stamps):
            key = _read_key(file)
            if key is None or key not in kept:
                self.drop("stamp", file.name[:16], file)

    # -- what artifacts were made into -----------------------------------------------------------

    def images(self, kept: set[str]) -> None:
        for backend in backends.all_backends():
            try:
                images = backend.cached_images(self.home)
            except MvmError as err:
                self.report.notes.append(f"{backend.name} images were not looked at: {err}")
                continue
            for image in images:
                if any(key.startswith(image.artifact_key_prefix) for key in kept):
                    continue
                if not self.report.dry_run:
                    try:
                        backend.remove_cached_image(image)
                    except MvmError as err:
                        self.keep("image", image.name, str(err))
                        continue
                self.drop("image", f"{backend.name} {image.name}", None, image.size)

    def debs(self, kept: set[str]) -> None:
        names: set[str] = set()
        for key in kept:
            try:
                names.update((self.home.store / key / DEBS_FILE).read_text().split())
            except (OSError, UnicodeDecodeError):
                self.report.notes.append(f"no .deb was removed: artifact {key[:16]} was built before mvm kept "
                                         f"the list of its packages (rebuild it with --no-cache, or prune it)")
                return
        if self.build_running():
            self.report.notes.append("no .deb was removed: a build is running and may need what it downloaded")
            return
        for file in _files(self.home.debs):
            if file.name.endswith(".deb") and file.name not in names:
                self.drop("deb", file.name, file)

    def build_running(self) -> bool:
        """A live build's resolve (tmp/apt-*), download or staging: it may need .debs no artifact names yet."""
        dirs = [(self.home.store, STAGING), (self.home.debs, DOWNLOAD), (self.home.tmp, APT_SCRATCH)]
        return any(pid_alive(int(m.group(1))) for directory, pattern in dirs for entry in _entries(directory)
                   if (m := pattern.match(entry.name)))

    # -- scratch ---------------------------------------------------------------------------------

    def scratch(self) -> None:
        for directory, pattern in ((self.home.tmp, SCRATCH), (self.home.store, STAGING), (self.home.debs, DOWNLOAD)):
            for entry in _entries(directory):
                match = pattern.match(entry.name)
                if match and not pid_alive(int(match.group(1))):
                    self.drop("scratch", f"{entry.name} (pid {match.group(1)} is gone)", entry)
        system_tmp = Path(os.environ.get("TMPDIR") or "/tmp")
        for entry in _entries(system_tmp):
            if entry.name.startswith(LEGACY_TMP) and not entry.is_symlink() and entry.is_dir():
                try:
                    info = entry.lstat()
                except OSError:
                    continue
                if info.st_uid == os.getuid() and time.time() - info.st_mtime > LEGACY_AGE_S:
                    self.drop("scratch", f"{entry} (left by an older mvm)", entry)

    # -- data disks ------------------------------------------------------------------------------

    def disks(self, remove: bool, running: set[str]) -> None:
        for entry in _entries(self.home.disks):
            name = entry.name.rsplit(".", 1)[0]
            if name in running:
                continue
            if remove:
                self.drop("disk", entry.name, entry)
            else:
                self.keep("disk", entry.name, f"a kept data disk of VM name {name} ({tree_size(entry)} bytes): "
                                              "`prune --disks` or `down --purge` removes it")


def prune(home: MvmHome, *, dry_run: bool = False, disks: bool = False) -> PruneReport:
    pruner = Pruner(home, dry_run)
    pruner.leftover_snapshots()
    used, running, unknown = pruner.vms()
    kept = pruner.artifacts(used, unknown)
    pruner.stale_stamps(kept)
    pruner.images(kept)
    pruner.debs(kept)
    pruner.scratch()
    pruner.disks(disks, running)
    record_prune(home, pruner.report, "prune", disks=disks)
    return pruner.report


def remove_artifacts(home: MvmHome, keys: list[str], *, dry_run: bool = False,
                     also_used: dict[str, str] | None = None, project: str | None = None) -> PruneReport:
    """`manifest-prune`: remove these artifacts unless a running VM, a snapshot, a ref or
    ``also_used`` (key -> why) uses them; and the images a backend made from them. ``project``
    (the directory whose builds these are) goes into the audit record."""
    pruner = Pruner(home, dry_run)
    used, unknown = pruner.vms_in_use()
    refs = {k for f in _files(home.refs) if (k := _read_key(f))}
    _, damaged = pruner.referenced()
    if unknown or damaged:
        pruner.report.notes.append(f"no artifact was removed: {unknown or damaged}")
        record_prune(home, pruner.report, "manifest-prune", project=project)
        return pruner.report
    snapshots, _ = pruner.snapshot_keys()
    for key in keys:
        path = home.store / key
        if not path.is_dir():
            continue
        why = ("a running VM uses it" if key in used else "a snapshot was taken from it" if key in snapshots
               else "its workload name's ref names it" if key in refs else (also_used or {}).get(key))
        if why:
            pruner.keep("artifact", key, why)
        else:
            pruner.drop("artifact", f"{_artifact_name(path)} {key[:16]}", path)
    present = {p.name for p in _entries(home.store) if KEY.fullmatch(p.name) and p.is_dir()}
    gone = {r.path for r in pruner.report.removed}
    kept = {k for k in present if str(home.store / k) not in gone}
    pruner.stale_stamps(kept)
    pruner.images(kept)
    record_prune(home, pruner.report, "manifest-prune", project=project)
    return pruner.report


AUDIT_LISTED = 500  # removed items named in one record; the rest are counted (a record is one line)


def record_prune(home: MvmHome, report: PruneReport, command: str, **detail: Any) -> str | None:
    """One ``prune`` audit record per run (``command``: prune or manifest-prune): what went
    (kind, name, bytes, path), so the chain says where a VM's files, an artifact or a snapshot
    went. A dry run removes nothing and writes nothing; a failed append is warned about (the
    removal is done by then, and no sealed VM's action depends on it)."""
    if report.dry_run:
        return None
    from mvm.runtime.lifecycle import audit_action

    removed = [asdict(r) for r in report.removed]
    return audit_action(home, "prune", name=None, detail={
        "command": command, **{k: v for k, v in detail.items() if v is not None},
        "freed_bytes": report.freed_bytes, "removed_count": len(removed), "removed": removed[:AUDIT_LISTED],
        "kept_count": len(report.kept), "notes": [n[:300] for n in report.notes[:20]]})


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _files(directory: Path) -> list[Path]:
    return [p for p in _entries(directory) if p.is_file() and not p.is_symlink()]


def _read_key(file: Path) -> str | None:
    try:
        key = file.read_text(errors="replace").strip()
    except OSError:
        return None
    return key if KEY.fullmatch(key) else None


def _artifact_name(path: Path) -> str:
    try:
        name = json.loads((path / "artifact.json").read_text())["name"]
        return str(name)[:60]
    except (OSError, ValueError, KeyError, TypeError):
        return "(unnamed)"
