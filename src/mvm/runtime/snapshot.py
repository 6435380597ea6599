"""Saved VMs on disk: ``$MVM_HOME/snapshots/TAG/``, its manifest signed with the host key.

A snapshot is a directory of files the backend wrote while the VM was stopped (for QEMU: the
device state ``state``, the guest RAM ``ram`` when the VM kept it in a file, and the disk
overlay frozen as ``disk.qcow2``) plus ``manifest.json``: what the snapshot was taken of and
the SHA-256 of each file, signed with the host's Ed25519 key. Everything in the directory is
0600: guest memory holds the guest's secrets.

A snapshot is hostile input when it is used: every file must still hash to what the signed
manifest says. Hashing a RAM file on every clone would cost a large part of a clone's start,
so the manifest also records each file's inode, mtime and ctime as they were when it was
signed; a file whose stat still matches is taken as unchanged. Changing a file's bytes
changes its ctime, which only someone able to set the system clock could forge — and that
is root, who can read the key anyway. Any other file is hashed in full.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvm.core.bootimage import NETWORK_MODES
from mvm.core.digest import sha256_file
from mvm.core.errors import MvmError, UsageError
from mvm.core.state import MvmHome
from mvm.runtime.process import pid_alive
from mvm.security.host_key import HostKey, canonical_json, verify

MANIFEST = "manifest.json"
FORMAT = 1
TAG = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
KINDS = ("ram-file", "stream")  # RAM saved as a file of its own, or inside the state stream
PURPOSES = ("snapshot", "template", "fork", "suspend")
MANIFEST_MAX = 1 << 20


class SnapshotError(MvmError):
    """A snapshot that is missing, damaged, tampered with, or cannot be used here."""


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise UsageError(f"snapshot tag {str(tag)[:80]!r} is not allowed",
                         "use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
    return tag


@dataclass
class SnapshotFile:
    size: int
    sha256: str
    stat: list[int]  # [inode, mtime_ns, ctime_ns] when the manifest was signed


@dataclass
class SnapshotManifest:
    """What a snapshot was taken of: enough to refuse a restore that could not work."""

    tag: str
    kind: str  # ram-file | stream
    purpose: str  # snapshot | template | fork | suspend
    created_at: float
    source_vm: str
    artifact_key: str
    artifact_name: str
    backend: str
    accel: str
    hypervisor_version: str  # QEMU's, as it answered query-version
    vcpus: int
    memory_mib: int
    uids: dict[str, int]
    sealed: bool
    accessible: bool
    argv: list[str] | None
    files: dict[str, SnapshotFile] = field(default_factory=dict)
    format: int = FORMAT
    # How the VM's network ran when it was saved (`up --network`, `mvmctl network`): a clone
    # runs the same, and must (the NIC is part of the saved devices). None: an older manifest,
    # whose clones run as the image says.
    network: str | None = None
    allow: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SnapshotManifest:
        """Strictly: a manifest is read from a directory anyone with the uid could have edited."""
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format {str(data.get('format'))[:20]!r} is not {FORMAT}")
        types: dict[str, type | tuple[type, ...]] = {
            "tag": str, "kind": str, "purpose": str, "created_at": (int, float), "source_vm": str,
            "artifact_key": str, "artifact_name": str, "backend": str, "accel": str, "hypervisor_version": str,
            "vcpus": int, "memory_mib": int, "uids": dict, "sealed": bool, "accessible": bool,
            "argv": (list, type(None)), "files": dict}
        for key, kinds in types.items():
            value = data.get(key)
            if not isinstance(value, kinds) or (isinstance(value, bool) and kinds not in (bool,)):
                raise ValueError(f"field {key!r} is missing or not a {kinds}")
        if data["kind"] not in KINDS or data["purpose"] not in PURPOSES:
            raise ValueError(f"kind {data['kind'][:20]!r} or purpose {data['purpose'][:20]!r} is unknown")
        if not re.fullmatch(r"[0-9a-f]{64}", data["artifact_key"]):
            raise ValueError("artifact_key is not a store key")
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data["uids"].items()):
            raise ValueError("uids must map names to numbers")
        if data["argv"] is not None and not all(isinstance(a, str) for a in data["argv"]):
            raise ValueError("argv must be a list of strings")
        files: dict[str, SnapshotFile] = {}
        for name, entry in data["files"].items():
            if name not in ("state", "ram", "disk.qcow2", "disk.raw"):  # disk.raw: Firecracker's (no qcow2)
                raise ValueError(f"file {name[:40]!r} is not one a snapshot has")
            if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                    or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))
                    or not (isinstance(entry.get("stat"), list) and len(entry["stat"]) == 3
                            and all(isinstance(x, int) for x in entry["stat"]))):
                raise ValueError(f"the entry of file {name!r} is malformed")
            files[name] = SnapshotFile(entry["size"], entry["sha256"], entry["stat"])
        network, allow = data.get("network"), data.get("allow", [])
        if network is not None and network not in NETWORK_MODES:
            raise ValueError(f"network {str(network)[:20]!r} is not a network mode")
        if not (isinstance(allow, list) and all(isinstance(a, str) for a in allow)):
            raise ValueError("allow must be a list of strings")
        return cls(**{**{k: data[k] for k in types}, "files": files, "network": network, "allow": allow})


@dataclass
class Snapshot:
    dir: Path
    manifest: SnapshotManifest

    @property
    def tag(self) -> str:
        return self.manifest.tag

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def size(self) -> int:
        """Bytes on disk (files are sparse: untouched guest RAM takes no space)."""
        return sum(self.path(name).stat().st_blocks * 512 for name in self.manifest.files if self.path(name).exists())


@dataclass
class DamagedSnapshot:
    tag: str
    reason: str


def read_signed(path: Path) -> dict[str, Any]:
    """A manifest.json as JSON ({"manifest": ..., "signature": ...}), not yet checked. Whoever
    has the uid could have put anything there: a FIFO would block an open (O_NONBLOCK), a
    device or a huge file a read; a symlink could point anywhere (O_NOFOLLOW)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("the manifest is not a regular file")
        raw = f.read(MANIFEST_MAX + 1)
    if len(raw) > MANIFEST_MAX:
        raise ValueError("the manifest is over 1 MiB")
    try:
        signed = json.loads(raw)
    except RecursionError:  # ([[[[... nested thousands deep)
        raise ValueError("the manifest is nested too deep to be one") from None
    if not isinstance(signed, dict) or not isinstance(signed.get("manifest"), dict):
        raise ValueError("the file holds no signed manifest")
    return signed


def _stat_key(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_ino, info.st_mtime_ns, info.st_ctime_ns]


class SnapshotStore:
    def __init__(self, home: MvmHome) -> None:
        self.home = home
        self.root = home.snapshots

    @functools.cached_property
    def key(self) -> HostKey:
        """Read once per store: listing or checking many snapshots parses the key once."""
        return HostKey.load_or_create(self.home.keys)

    def dir(self, tag: str) -> Path:
        return self.root / check_tag(tag)

    @contextmanager
    def locked(self, tag: str, what: str = "") -> Iterator[None]:
        """One create, remove or use-check of ``tag`` at a time (``what``: another lock for
        the same tag, e.g. building it as a template, which itself creates and removes)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / f".{what}{check_tag(tag)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def stage(self, tag: str) -> Path:
        """A private directory the backend writes a new snapshot's files into."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sweep_staging()
        staged = Path(tempfile.mkdtemp(prefix=f".{check_tag(tag)}.staging-{os.getpid()}-", dir=self.root))
        staged.chmod(0o700)
        return staged

    def sweep_staging(self) -> None:
        """Staging directories of processes that are gone (a killed `snapshot create`)."""
        for entry in self.root.glob(".*-*-*"):
            match = re.search(r"\.(?:staging|removing)-(\d+)-", entry.name)
            if match and not pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)

    def commit(self, staged: Path, manifest: SnapshotManifest) -> Snapshot:
        """Hash the staged files, sign the manifest, and move the directory into place."""
        for name in sorted(os.listdir(staged)):
            path = staged / name
            os.chmod(path, 0o600)  # before the stat is taken: chmod changes the ctime
            manifest.files[name] = SnapshotFile(path.stat().st_size, sha256_file(path), [])
        for name, entry in manifest.files.items():
            entry.stat = _stat_key(staged / name)
        key = self.key
        body = manifest.to_dict()
        signed = {"manifest": body, "public_key": key.public_hex, "signature": key.sign(canonical_json(body))}
        fd = os.open(staged / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(signed, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        target = self.dir(manifest.tag)
        try:
            os.rename(staged, target)  # fails if the tag was taken meanwhile: nothing is overwritten
        except OSError:
            raise SnapshotError(f"snapshot {manifest.tag} already exists",
                                f"`mvmctl snapshot rm {manifest.tag}` first, or pick another tag") from None
        return Snapshot(target, manifest)

    def load(self, tag: str, *, check_files: bool = True) -> Snapshot:
        """The snapshot, its signature checked and (``check_files``) every file matching it."""
        directory = self.dir(tag)
        if not directory.is_dir() or directory.is_symlink():
            raise SnapshotError(f"there is no snapshot {tag}", "`mvmctl snapshot ls` lists them")
        manifest = self._read_manifest(directory, tag)
        snapshot = Snapshot(directory, manifest)
        if check_files:
            self.check_files(snapshot)
        return snapshot

    def _read_manifest(self, directory: Path, tag: str) -> SnapshotManifest:
        try:
            signed = read_signed(directory / MANIFEST)
        except OSError as err:
            raise SnapshotError(f"snapshot {tag}: cannot read its manifest ({err.strerror})",
                                f"remove it: `mvmctl snapshot rm {tag}`") from None
        except ValueError as err:
            raise SnapshotError(f"snapshot {tag}: its manifest is damaged ({str(err)[:120]})",
                                f"remove it: `mvmctl snapshot rm {tag}`") from None
        key = self.key
        if signed.get("public_key") != key.public_hex:
            raise SnapshotError(f"snapshot {tag}: its manifest is signed by another key, not this host's",
                                "only snapshots made under this MVM_HOME can be restored; take a new one")
        signature = signed.get("signature")
        if not isinstance(signature, str) or not verify(key.public_hex, signature, canonical_json(signed["manifest"])):
            raise SnapshotError(f"snapshot {tag}: its manifest's signature does not match (it was edited)",
                                f"remove it: `mvmctl snapshot rm {tag}`, and take a new one")
        try:
            manifest = SnapshotManifest.from_dict(signed["manifest"])
        except ValueError as err:
            raise SnapshotError(f"snapshot {tag}: its manifest is malformed ({str(err)[:120]})",
                                f"remove it: `mvmctl snapshot rm {tag}`") from None
        if manifest.tag != tag:
            raise SnapshotError(f"snapshot {tag}: its manifest is that of snapshot {manifest.tag[:64]!r} (renamed)",
                                f"remove it: `mvmctl snapshot rm {tag}`")
        return manifest

    def check_files(self, snapshot: Snapshot) -> None:
        tag = snapshot.tag
        present = {name for name in os.listdir(snapshot.dir) if name != MANIFEST}
        if present != set(snapshot.manifest.files):
            extra, missing = present - set(snapshot.manifest.files), set(snapshot.manifest.files) - present
            what = f"missing {', '.join(sorted(missing))}" if missing else f"has extra {', '.join(sorted(extra))}"
            raise SnapshotError(f"snapshot {tag}: its directory {what}",
                                f"remove it: `mvmctl snapshot rm {tag}`, and take a new one")
        for name, entry in snapshot.manifest.files.items():
            path = snapshot.path(name)
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode) or info.st_size != entry.size:
                raise SnapshotError(f"snapshot {tag}: its file {name} is not the one it was made with "
                                    f"({'not a regular file' if not stat.S_ISREG(info.st_mode) else 'size differs'})",
                                    f"remove it: `mvmctl snapshot rm {tag}`, and take a new one")
            if _stat_key(path) == entry.stat:
                continue
            if sha256_file(path) != entry.sha256:
                raise SnapshotError(f"snapshot {tag}: its file {name} does not match its signed manifest "
                                    "(sha256 differs: it was changed after the snapshot was made)",
                                    f"remove it: `mvmctl snapshot rm {tag}`, and take a new one")

    def list(self) -> list[Snapshot | DamagedSnapshot]:
        if not self.root.is_dir():
            return []
        self.sweep_staging()  # (what a killed `snapshot create` left holds guest memory: not kept for long)
        found: list[Snapshot | DamagedSnapshot] = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir() or not TAG.fullmatch(entry.name):
                continue
            try:
                found.append(self.load(entry.name, check_files=False))
            except MvmError as err:
                found.append(DamagedSnapshot(entry.name, err.message))
        return found

    def remove(self, tag: str) -> None:
        directory = self.dir(tag)
        if not directory.exists() and not directory.is_symlink():
            raise SnapshotError(f"there is no snapshot {tag}", "`mvmctl snapshot ls` lists them")
        if directory.is_symlink():
            directory.unlink()
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{tag}.removing-{os.getpid()}-", dir=self.root))
        os.rename(directory, trash / "snapshot")  # atomic: no half-removed snapshot is ever seen
        shutil.rmtree(trash, ignore_errors=True)


