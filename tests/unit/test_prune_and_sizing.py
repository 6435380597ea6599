"""prune reads $MVM_HOME as hostile input (links are removed, never followed; a manifest it
cannot read keeps every artifact), and the host check says the numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mvm.core.errors import HostTooSmall
from mvm.core.state import MvmHome
from mvm.runtime import prune as pruning
from mvm.runtime.sizing import HostCapacity, check_fits

KEY_A, KEY_B = "a" * 64, "b" * 64


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MvmHome:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "system-tmp"))  # (prune also looks at the system /tmp)
    monkeypatch.setenv("PATH", "/nonexistent")  # no docker CLI: its images are not looked at
    root = tmp_path / "home"
    (root / "store").mkdir(parents=True)
    return MvmHome(root)


def artifact(home: MvmHome, key: str, size: int = 4096) -> Path:
    path = home.store / key
    path.mkdir()
    (path / "rootfs.ext4").write_bytes(b"r" * size)
    (path / "artifact.json").write_text(json.dumps({"name": "w"}))
    (path / "debs.txt").write_text("")
    return path


def test_a_store_entry_that_is_a_link_is_unlinked_not_followed(home: MvmHome, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "file").write_text("mine")
    (home.store / KEY_A).symlink_to(precious)
    report = pruning.prune(home)
    assert [r.kind for r in report.removed] == ["artifact"]
    assert not (home.store / KEY_A).is_symlink() and (precious / "file").read_text() == "mine"


def test_an_unreadable_snapshot_manifest_keeps_every_artifact(home: MvmHome) -> None:
    artifact(home, KEY_A)
    (home.snapshots / "s").mkdir(parents=True, exist_ok=True)
    manifest = home.snapshots / "s" / "manifest.json"
    for bad in ('{"manifest": {"artifact_key": 12}}', "not json", json.dumps({"artifact_key": KEY_A}),
                json.dumps({"manifest": {"artifact_key": "../../etc"}}), None):
        manifest.unlink(missing_ok=True)
        if bad is None:
            os.mkfifo(manifest)  # (read without O_NONBLOCK, this would hang prune)
        else:
            manifest.write_text(bad)
        report = pruning.prune(home)
        assert not [r for r in report.removed if r.kind == "artifact"]
        assert any("snapshot 's'" in note for note in report.notes)
    manifest.unlink()
    shutil.rmtree(home.snapshots / "s")
    make_snapshot(home, "s", KEY_A)
    artifact(home, KEY_B)
    report = pruning.prune(home, dry_run=True)
    assert report.notes == [] or not any("snapshot" in note for note in report.notes), report.notes
    assert [r.path for r in report.removed if r.kind == "artifact"] == [str(home.store / KEY_B)]
    assert report.freed_bytes >= 4096 and (home.store / KEY_B).is_dir()  # (a dry run)


def make_snapshot(home: MvmHome, tag: str, key: str) -> None:
    """A real one: signed with the home's key, as `snapshot create` writes it."""
    from mvm.runtime.snapshot import SnapshotManifest, SnapshotStore

    store = SnapshotStore(home)
    staged = store.stage(tag)
    (staged / "state").write_bytes(b"device state")
    store.commit(staged, SnapshotManifest(
        tag=tag, kind="stream", purpose="snapshot", created_at=1.8e9, source_vm="w", artifact_key=key,
        artifact_name="w", backend="qemu", accel="tcg", hypervisor_version="7.2.22", vcpus=1, memory_mib=128,
        uids={"agent": 990, "entrypoint": 1000}, sealed=True, accessible=False, argv=None))


def test_refs_and_stamps_keep_what_they_name_and_stale_stamps_go(home: MvmHome) -> None:
    artifact(home, KEY_A)
    home.refs.mkdir()
    (home.refs / "w").write_text(KEY_A + "\n")
    home.stamps.mkdir()
    (home.stamps / "s1").write_text(KEY_B + "\n")  # names an artifact the store does not have
    report = pruning.prune(home)
    assert (home.store / KEY_A).is_dir()
    assert [(r.kind, r.name) for r in report.removed] == [("stamp", "s1")]


def test_scratch_of_dead_processes_goes_and_links_are_not_followed(home: MvmHome, tmp_path: Path) -> None:
    home.tmp.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (home.tmp / "docker-import-999999999-x").symlink_to(outside)
    (home.tmp / f"apt-{os.getpid()}-y").mkdir()
    report = pruning.prune(home)
    assert [r.kind for r in report.removed] == ["scratch"] and outside.is_dir()
    assert (home.tmp / f"apt-{os.getpid()}-y").is_dir()


def test_a_live_build_keeps_every_deb(home: MvmHome) -> None:
    home.debs.mkdir(parents=True)
    (home.debs / "x_1_all.deb").write_bytes(b"d")
    home.tmp.mkdir()
    (home.tmp / f"apt-{os.getpid()}-y").mkdir()  # this process "resolves packages"
    report = pruning.prune(home)
    assert (home.debs / "x_1_all.deb").exists() and any("a build is running" in n for n in report.notes)


def test_the_host_check_says_the_numbers_and_overcommit_passes() -> None:
    small = HostCapacity(threads=2, available_mib=3000, headroom_mib=1024)
    with pytest.raises(HostTooSmall, match=r"3 vCPUs asked for, but this host has 2 CPU threads"):
        check_fits(3, 256, capacity=small)
    with pytest.raises(HostTooSmall, match=r"2000 MiB of memory asked for, but this host has 3000 MiB available, "
                                           r"less 1024 MiB kept for the host and builder: 1976 MiB for guests"):
        check_fits(1, 2000, capacity=small)
    assert check_fits(2, 1976, capacity=small) is small
    assert check_fits(64, 1 << 20, overcommit=True, capacity=small) is small


def audit_entries(home: MvmHome) -> list[dict]:
    from mvm.security import audit

    path = audit.audit_dir(home) / audit.CURRENT
    return [json.loads(line)["entry"] for line in path.read_text().splitlines()] if path.exists() else []


def verify_with_mvmctl(home: MvmHome) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MVM_HOME": str(home.root), "PATH": os.defpath}
    return subprocess.run([sys.executable, "-m", "mvm.cli.main", "audit", "verify"], capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL, check=False)


def test_prune_and_manifest_prune_each_write_one_record_of_what_they_removed(home: MvmHome) -> None:
    artifact(home, KEY_A, size=8192)
    stopped = home.vms / "old"
    stopped.mkdir(parents=True)  # a VM directory with no record and no supervisor
    pruning.prune(home, dry_run=True)
    assert audit_entries(home) == []  # a dry run removes nothing and records nothing
    report = pruning.prune(home)
    [entry] = audit_entries(home)
    assert entry["operation"] == "prune" and entry["result"] == "ok" and entry["actor"]["uid"] == os.getuid()
    assert entry["detail"]["command"] == "prune" and entry["detail"]["freed_bytes"] == report.freed_bytes > 0
    removed = {(r["kind"], r["path"]): r for r in entry["detail"]["removed"]}
    assert removed[("artifact", str(home.store / KEY_A))]["bytes"] >= 8192
    assert ("vm", str(stopped)) in removed and removed[("vm", str(stopped))]["name"] == "old (no record)"
    assert entry["detail"]["removed_count"] == len(report.removed)

    artifact(home, KEY_B)
    report = pruning.remove_artifacts(home, [KEY_B], project="/src/proj")
    entry = audit_entries(home)[-1]
    assert entry["operation"] == "prune" and entry["detail"]["command"] == "manifest-prune"
    assert entry["detail"]["project"] == "/src/proj" and not (home.store / KEY_B).exists()
    assert [(r["kind"], r["path"]) for r in entry["detail"]["removed"]] == [("artifact", str(home.store / KEY_B))]
    verified = verify_with_mvmctl(home)
    assert verified.returncode == 0 and "2 records" in verified.stdout, verified.stderr
