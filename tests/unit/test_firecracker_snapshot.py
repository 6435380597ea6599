"""Firecracker snapshots and restores, against Firecracker's published API description.

As for the rest of this backend (see test_firecracker_api.py), no firecracker binary and no
usable KVM exist where these were written. What is checked: every request the snapshot and the
restore send is an operation of the Swagger document with a body that validates against it;
they come in the designed order; the files land where they must with mode 0600; a clone gets
its own copy of the disk and never writes the snapshot's; the API's refusals end the sequence
as one-line VmErrors. The API socket is served by a test double that checks each request
against the document, records it, answers ``GET /version``, and (for ``PUT /snapshot/create``)
writes the two files the document says Firecracker writes. It says nothing about what a real
Firecracker does with these requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import shutil
import socketserver
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from mvm.core.errors import UsageError, VmError
from mvm.core.state import VmPaths
from mvm.runtime.backends import firecracker as fc
from mvm.runtime.backends import firecracker_api as fc_api
from mvm.runtime.backends import firecracker_snapshot as fc_snap
from mvm.runtime.snapshot import SnapshotManifest
from tests.unit import test_firecracker_api as fc_tests
from tests.unit.test_firecracker_api import (
    assert_conforms,
    image,
    record,
    spec_errors,
    vm,
)

spec = fc_tests.spec  # the same fixture: Firecracker's document, read once per module

VERSION = "1.17.0"
BACKEND = fc.FirecrackerBackend()


# -- the test double on the API socket ----------------------------------------------------


class RecordingFirecracker(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Checks and records requests. ``chroot``: absolute paths in bodies are read inside it
    (a jailed Firecracker's view); ``watch``: files whose (exists, uid, mode) are noted at
    each request, to see what was in place when it came."""

    daemon_threads = True

    def __init__(self, path: Path, spec: dict[str, Any], *, chroot: Path | None = None,
                 watch: tuple[Path, ...] = ()) -> None:
        self.spec = spec
        self.chroot = chroot
        self.watch = watch
        self.seen: list[fc_api.Request] = []
        self.noted: list[dict[str, tuple[int, int] | None]] = []
        self.fail: dict[str, str] = {}  # "METHOD /path" -> fault_message
        self.version_body: Any = {"firecracker_version": VERSION}
        super().__init__(str(path), RecordingHandler)

    def host_path(self, told: str) -> Path:
        return self.chroot / told.lstrip("/") if self.chroot is not None else Path(told)


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingFirecracker

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self) -> None:
        server = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        request = fc_api.Request(self.command, self.path, body)
        server.seen.append(request)
        server.noted.append({p.name: ((st := p.stat()).st_uid, st.st_mode & 0o777) if p.exists() else None
                             for p in server.watch})
        problems = spec_errors(server.spec, request)
        if problems or request.describe() in server.fail:
            message = "; ".join(problems) or server.fail[request.describe()]
            return self._reply(400, {"fault_message": message})
        if request.describe() == "GET /version":
            return self._reply(200, server.version_body)
        if request.describe() == "PUT /snapshot/create":  # the document: these two files are written
            server.host_path(body["snapshot_path"]).write_bytes(b"device state")
            with server.host_path(body["mem_file_path"]).open("r+b") as f:
                f.truncate(16 << 20)
                f.seek(4096)
                f.write(b"guest memory")
        return self._reply(204)

    do_PUT = do_PATCH = do_GET = _handle


@pytest.fixture
def firecracker(spec):
    """Start a RecordingFirecracker at a path (and with the options) a test chooses."""
    servers: list[RecordingFirecracker] = []
    cleanup: list[Path] = []

    def start(path: Path, **options: Any) -> RecordingFirecracker:
        if len(str(path)) > 100:  # a jail's path is longer than AF_UNIX takes: listen nearby, link it there
            short = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp")) / "fc.sock"
            cleanup.append(short.parent)
            path.symlink_to(short)
            path = short
        server = RecordingFirecracker(path, spec, **options)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for directory in cleanup:
        shutil.rmtree(directory, ignore_errors=True)


def _disk(path: Path) -> bytes:
    """A sparse 16 MiB disk with a little data at both ends; returns what it holds."""
    with path.open("wb") as f:
        f.write(b"root filesystem")
        f.truncate(16 << 20)
        f.seek((16 << 20) - 4)
        f.write(b"tail")
    path.chmod(0o600)
    return path.read_bytes()


def _fingerprint(directory: Path) -> dict[str, tuple[str, int, int, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino, p.stat().st_mtime_ns,
                     p.stat().st_ctime_ns) for p in sorted(directory.iterdir())}


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


def _clone_record(name: str, snapshot: Path):
    rec = record(name, 1, 256)
    rec.snapshot, rec.restore_from = snapshot.name, str(snapshot)
    return rec


# -- conformance ----------------------------------------------------------------------------


def test_snapshot_and_restore_requests_conform_to_the_spec(spec, tmp_path: Path) -> None:
    requests = [fc_api.version_request(), fc_api.drive_update_request("root", "root.ext4"),
                *fc_snap.plan_snapshot(str(tmp_path / "state"), str(tmp_path / "ram")),
                *fc_snap.plan_snapshot("/snapshot.state", "/snapshot.ram"),
                *fc_snap.plan_restore(str(tmp_path / "state"), str(tmp_path / "ram"), str(tmp_path / "agent.sock"),
                                      jailed=False),
                *fc_snap.plan_restore("/snapshot.state", "/snapshot.ram", "/agent.sock", jailed=True)]
    for request in requests:
        assert_conforms(spec, request)
    restore = fc_snap.plan_restore("s", "r", "a", jailed=False)
    assert [r.describe() for r in restore] == ["PUT /snapshot/load", "PATCH /drives/root", "PATCH /vm"]
    assert restore[0].body["resume_vm"] is False and restore[0].body["mem_backend"]["backend_type"] == "File"
    assert restore[-1].body == {"state": "Resumed"}


def test_the_checker_refuses_wrong_snapshot_requests(spec) -> None:
    wrong = [
        fc_api.Request("PATCH", "/drives/root", {"drive_id": "root", "path_on_host": "x", "is_root_device": True}),
        fc_api.Request("PUT", "/snapshot/load", {"mem_backend": {"backend_type": "File", "backend_path": "/m"}}),
        fc_api.Request("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk",
                                                                                          "backend_path": "/m"}}),
        fc_api.Request("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "All"}),
        fc_api.Request("GET", "/version", {"firecracker_version": "1"}),
        fc_api.Request("PUT", "/version"),
    ]
    for request in wrong:
        assert spec_errors(spec, request), f"{request.describe()} {request.body} should not conform"


def test_manifest_allows_the_firecracker_disk() -> None:
    entry = {"size": 1, "sha256": "0" * 64, "stat": [1, 2, 3]}
    body = {"format": 1, "tag": "t", "kind": "ram-file", "purpose": "snapshot", "created_at": 1.0, "source_vm": "v",
            "artifact_key": "a" * 64, "artifact_name": "w", "backend": "firecracker", "accel": "kvm",
            "hypervisor_version": VERSION, "vcpus": 1, "memory_mib": 256, "uids": {"agent": 990}, "sealed": False,
            "accessible": True, "argv": None, "files": {"state": entry, "ram": entry, "disk.raw": entry}}
    assert set(SnapshotManifest.from_dict(body).files) == {"state", "ram", "disk.raw"}
    with pytest.raises(ValueError, match="not one a snapshot has"):
        SnapshotManifest.from_dict({**body, "files": {"disk.vmdk": entry}})


# -- saving -----------------------------------------------------------------------------------


def _snapshot(tmp_path: Path, firecracker, name: str = "src") -> tuple[Path, RecordingFirecracker, bytes]:
    paths = vm(tmp_path, name)
    disk = _disk(paths.dir / "root.ext4")
    server = firecracker(paths.dir / "fc.sock")
    dest = tmp_path / "snapshots" / "tag1"
    dest.mkdir(parents=True, mode=0o700)
    saved = asyncio.run(BACKEND.snapshot(paths, record(name, 1, 256), dest))
    assert saved == {"kind": "ram-file", "hypervisor_version": VERSION}
    return dest, server, disk


def test_snapshot_sequence_and_files(tmp_path: Path, firecracker) -> None:
    dest, server, disk = _snapshot(tmp_path, firecracker)
    assert [r.describe() for r in server.seen] == ["GET /version", "PATCH /vm", "PUT /snapshot/create"]
    assert server.seen[1].body == {"state": "Paused"}
    assert server.seen[2].body == {"snapshot_type": "Full", "snapshot_path": str(dest / "state"),
                                   "mem_file_path": str(dest / "ram")}
    assert sorted(p.name for p in dest.iterdir()) == ["disk.raw", "ram", "state"]
    for path in dest.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (dest / "disk.raw").read_bytes() == disk
    assert (dest / "disk.raw").stat().st_blocks * 512 < 1 << 20  # holes kept: 16 MiB, a few blocks used
    # The supervisor then resumes the paused VM: PATCH /vm Resumed (the document: from Paused).
    asyncio.run(BACKEND.resume(VmPaths(tmp_path / "vms" / "src"), record("src", 1, 256)))
    assert server.seen[-1] == fc_api.vm_state_request("Resumed")


def test_snapshot_refuses_a_data_disk_before_any_request(tmp_path: Path, firecracker) -> None:
    paths = vm(tmp_path)
    _disk(paths.dir / "root.ext4")
    paths.data_disk.write_bytes(b"data")
    server = firecracker(paths.dir / "fc.sock")
    with pytest.raises(UsageError, match="data disk"):
        asyncio.run(BACKEND.snapshot(paths, record("t1", 1, 256), tmp_path))
    assert server.seen == []


def test_snapshot_refused_by_the_api_is_one_line(tmp_path: Path, firecracker) -> None:
    paths = vm(tmp_path)
    _disk(paths.dir / "root.ext4")
    server = firecracker(paths.dir / "fc.sock")
    server.fail["PUT /snapshot/create"] = "Cannot create snapshot:\n  no space left\n"
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(VmError) as caught:
        asyncio.run(BACKEND.snapshot(paths, record("t1", 1, 256), dest))
    assert "refused PUT /snapshot/create (400): Cannot create snapshot: no space left" in _one_line(caught.value)
    assert not (dest / "disk.raw").exists()  # nothing copied after a failed create


def test_a_version_reply_without_a_version_is_refused(tmp_path: Path, firecracker) -> None:
    paths = vm(tmp_path)
    _disk(paths.dir / "root.ext4")
    server = firecracker(paths.dir / "fc.sock")
    server.version_body = {"firecracker_version": "1.0\nx"}
    with pytest.raises(VmError, match="no usable version") as caught:
        asyncio.run(BACKEND.snapshot(paths, record("t1", 1, 256), tmp_path))
    _one_line(caught.value)
    assert [r.describe() for r in server.seen] == ["GET /version"]  # not even paused


# -- restoring --------------------------------------------------------------------------------


def test_restore_sequence_and_the_clones_own_disk(tmp_path: Path, firecracker) -> None:
    snapshot, _, disk = _snapshot(tmp_path, firecracker)
    before = _fingerprint(snapshot)
    clone = vm(tmp_path, "clone1")
    server = firecracker(clone.dir / "fc.sock", watch=(clone.dir / "root.ext4",))
    asyncio.run(BACKEND.restore(clone, _clone_record("clone1", snapshot), snapshot, VERSION))
    assert [r.describe() for r in server.seen] == ["GET /version", "PUT /snapshot/load", "PATCH /drives/root",
                                                   "PATCH /vm"]
    assert server.seen[1].body == {"snapshot_path": str(snapshot / "state"),
                                   "mem_backend": {"backend_type": "File", "backend_path": str(snapshot / "ram")},
                                   "resume_vm": False, "vsock_override": {"uds_path": str(clone.agent_socket)}}
    # The root drive is relative to the clone's Firecracker's working directory: its own copy.
    assert server.seen[2].body == {"drive_id": "root", "path_on_host": "root.ext4"}
    assert server.seen[3].body == {"state": "Resumed"}
    assert server.noted[0]["root.ext4"] is None  # the version is checked before anything is copied
    assert server.noted[1]["root.ext4"] == (os.getuid(), 0o600)  # the copy is in place when the load opens it
    copy = clone.dir / "root.ext4"
    assert copy.read_bytes() == disk
    with copy.open("r+b") as f:  # the clone writes its disk ...
        f.write(b"CLONE WROTE")
    assert _fingerprint(snapshot) == before  # ... and the snapshot is as it was, not even re-stamped


def test_two_clones_of_one_snapshot_do_not_share_a_disk(tmp_path: Path, firecracker) -> None:
    snapshot, _, _ = _snapshot(tmp_path, firecracker)
    clones = [vm(tmp_path, f"c{i}") for i in (1, 2)]
    for clone in clones:
        firecracker(clone.dir / "fc.sock")
        asyncio.run(BACKEND.restore(clone, _clone_record(clone.name, snapshot), snapshot, VERSION))
    (clones[0].dir / "root.ext4").write_bytes(b"only in c1")
    assert (clones[1].dir / "root.ext4").read_bytes().startswith(b"root filesystem")


def test_restore_refuses_another_firecracker_version(tmp_path: Path, firecracker) -> None:
    snapshot, _, _ = _snapshot(tmp_path, firecracker)
    clone = vm(tmp_path, "clone1")
    server = firecracker(clone.dir / "fc.sock")
    with pytest.raises(VmError) as caught:
        asyncio.run(BACKEND.restore(clone, _clone_record("clone1", snapshot), snapshot, "1.9.0"))
    assert "made by Firecracker 1.9.0; this host runs Firecracker 1.17.0" in _one_line(caught.value)
    assert [r.describe() for r in server.seen] == ["GET /version"]
    assert not (clone.dir / "root.ext4").exists()


def test_restore_refused_by_the_api_stops_there(tmp_path: Path, firecracker) -> None:
    snapshot, _, _ = _snapshot(tmp_path, firecracker)
    clone = vm(tmp_path, "clone1")
    server = firecracker(clone.dir / "fc.sock")
    server.fail["PUT /snapshot/load"] = "Load snapshot error: Cannot open the block device backing file"
    with pytest.raises(VmError) as caught:
        asyncio.run(BACKEND.restore(clone, _clone_record("clone1", snapshot), snapshot, VERSION))
    assert "refused PUT /snapshot/load (400): Load snapshot error" in _one_line(caught.value)
    assert [r.describe() for r in server.seen] == ["GET /version", "PUT /snapshot/load"]  # never resumed


def test_restore_of_a_snapshot_without_its_files(tmp_path: Path, firecracker) -> None:
    snapshot, _, _ = _snapshot(tmp_path, firecracker)
    (snapshot / "disk.raw").unlink()
    clone = vm(tmp_path, "clone1")
    firecracker(clone.dir / "fc.sock")
    with pytest.raises(VmError, match="has no disk.raw file") as caught:
        asyncio.run(BACKEND.restore(clone, _clone_record("clone1", snapshot), snapshot, VERSION))
    _one_line(caught.value)


# -- under the jailer: paths inside the chroot ------------------------------------------------


def _jail(paths: VmPaths) -> Path:
    """What spawn's _stage_jail leaves: the chroot, and fc.sock / agent.sock linked into it."""
    root = fc.launch_argv(paths, "/usr/bin/firecracker", "/usr/bin/jailer").jail_root
    assert root is not None
    root.mkdir(parents=True)
    for name in ("fc.sock", "agent.sock"):
        (paths.dir / name).symlink_to(root / name)
    return root


@pytest.mark.skipif(os.geteuid() != 0, reason="the jailer runs as root: the files are chowned to its uid")
def test_jailed_snapshot_and_restore(tmp_path: Path, firecracker) -> None:
    source = vm(tmp_path, "src")
    source_jail = _jail(source)
    disk = _disk(source_jail / "root.ext4")
    server = firecracker(source_jail / "fc.sock", chroot=source_jail)
    dest = tmp_path / "snapshots" / "tag1"
    dest.mkdir(parents=True, mode=0o700)
    asyncio.run(BACKEND.snapshot(source, record("src", 1, 256), dest))
    assert server.seen[2].body == {"snapshot_type": "Full", "snapshot_path": "/snapshot.state",
                                   "mem_file_path": "/snapshot.ram"}
    for path in dest.iterdir():
        info = path.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (os.getuid(), 0o600), path
    assert (dest / "disk.raw").read_bytes() == disk
    assert not (source_jail / "snapshot.state").exists() and not (source_jail / "snapshot.ram").exists()

    clone = vm(tmp_path, "clone1")
    clone_jail = _jail(clone)
    jail_uid = fc.jail_ids()[0]
    watch = tuple(clone_jail / name for name in ("root.ext4", "snapshot.state", "snapshot.ram"))
    server = firecracker(clone_jail / "fc.sock", chroot=clone_jail, watch=watch)
    asyncio.run(BACKEND.restore(clone, _clone_record("clone1", dest), dest, VERSION))
    assert server.seen[1].body == {"snapshot_path": "/snapshot.state",
                                   "mem_backend": {"backend_type": "File", "backend_path": "/snapshot.ram"},
                                   "resume_vm": False, "vsock_override": {"uds_path": "/agent.sock"}}
    assert server.seen[2].body == {"drive_id": "root", "path_on_host": "/root.ext4"}
    assert server.noted[1] == {name: (jail_uid, 0o600) for name in ("root.ext4", "snapshot.state", "snapshot.ram")}
    assert not (clone_jail / "snapshot.state").exists() and not (clone_jail / "snapshot.ram").exists()
    assert (clone_jail / "root.ext4").read_bytes() == disk


def test_leftover_jail_copies_of_guest_memory_are_removed(tmp_path: Path) -> None:
    """A supervisor killed between copying a snapshot into the jail and the load: what it
    left (guest memory) goes when the VM's files are cleaned up or its backend released."""
    paths = vm(tmp_path)
    jail = _jail(paths)
    for name in ("snapshot.state", "snapshot.ram"):
        (jail / name).write_bytes(b"guest memory")
    assert set(BACKEND.runtime_files(paths)) >= {jail / "snapshot.state", jail / "snapshot.ram"}
    assert BACKEND.release(paths, record("t1", 1, 256)) is True
    assert not (jail / "snapshot.state").exists() and not (jail / "snapshot.ram").exists()
    assert fc.jail_snapshot_copies(vm(tmp_path, "unjailed")) == []


def test_a_jail_link_pointing_elsewhere_is_refused(tmp_path: Path) -> None:
    paths = vm(tmp_path)
    (paths.dir / "fc.sock").symlink_to(tmp_path / "elsewhere" / "fc.sock")
    with pytest.raises(VmError, match="outside the VM's jail"):
        fc.jail_root_of(paths)


# -- the bare process a clone starts from -----------------------------------------------------

FAKE_FIRECRACKER = """\
import json, os, socket, sys
sock = sys.argv[sys.argv.index("--api-sock") + 1]
with open(os.environ["FAKE_FC_LOG"], "w") as log:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd()}, log)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sock)
server.listen(8)
while True:
    conn, _ = server.accept()
    data = conn.recv(65536)
    if data:
        with open(os.environ["FAKE_FC_LOG"] + ".requests", "ab") as f:
            f.write(data.split(b"\\r\\n", 1)[0] + b"\\n")
    conn.close()
"""


def test_spawn_for_a_clone_starts_firecracker_bare(tmp_path: Path, monkeypatch) -> None:
    """A stand-in `firecracker` on PATH notes its argv and working directory, and every request
    line it gets: a clone's spawn sends none (a snapshot loads only into an unconfigured
    process) and runs it in the clone's directory, where the relative root drive resolves."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "firecracker"
    fake.write_text(f"#!{sys.executable}\n{FAKE_FIRECRACKER}")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("MVM_FIRECRACKER_JAILER", "0")
    monkeypatch.setenv("FAKE_FC_LOG", str(tmp_path / "fake.json"))
    paths = vm(tmp_path, "clone1")
    snapshot = tmp_path / "snapshots" / "tag1"
    proc = fc.spawn(paths, image(tmp_path), _clone_record("clone1", snapshot))
    try:
        assert proc.poll() is None
        started = json.loads((tmp_path / "fake.json").read_text())
        assert started["cwd"] == str(paths.dir)
        assert started["argv"][:2] == ["--api-sock", str(paths.dir / "fc.sock")]
        # spawn has returned: a request it had sent would have waited for an answer the stand-in never gives
        requests = tmp_path / "fake.json.requests"
        assert not requests.exists() or requests.read_text() == ""  # only the readiness probe, no request
        assert not (paths.dir / "root.ext4").exists()  # the restore copies the snapshot's disk in
    finally:
        proc.kill()
        proc.wait(5)
