"""The snapshot store without a VM: a real signed manifest over real files, then every way
the directory can be damaged, each refused with one line that names what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm.core.state import MvmHome
from mvm.runtime.snapshot import SnapshotError, SnapshotManifest, SnapshotStore, check_tag


def manifest(tag: str) -> SnapshotManifest:
    return SnapshotManifest(tag=tag, kind="ram-file", purpose="snapshot", created_at=1.8e9, source_vm="web",
                            artifact_key="a" * 64, artifact_name="web", backend="qemu", accel="tcg",
                            hypervisor_version="7.2.22", vcpus=1, memory_mib=128,
                            uids={"agent": 990, "entrypoint": 1000}, sealed=True, accessible=False, argv=None)


def make(home: MvmHome, tag: str = "snap") -> Path:
    store = SnapshotStore(home)
    staged = store.stage(tag)
    (staged / "state").write_bytes(b"device state" * 100)
    with (staged / "ram").open("wb") as f:  # sparse, as guest RAM is
        f.seek(1 << 20)
        f.write(b"page")
    (staged / "disk.qcow2").write_bytes(b"QFI\xfb" + bytes(5000))
    return store.commit(staged, manifest(tag)).dir


def test_commit_signs_and_load_verifies(tmp_path: Path) -> None:
    home = MvmHome(tmp_path)
    directory = make(home)
    assert sorted(p.name for p in directory.iterdir()) == ["disk.qcow2", "manifest.json", "ram", "state"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in directory.iterdir())
    loaded = SnapshotStore(home).load("snap")
    assert loaded.manifest.files["ram"].size == (1 << 20) + 4
    assert loaded.size < 1 << 20  # the hole is not copied into blocks
    assert not list(home.snapshots.glob(".snap.staging-*"))


def test_a_taken_tag_is_not_overwritten(tmp_path: Path) -> None:
    home = MvmHome(tmp_path)
    make(home)
    with pytest.raises(SnapshotError, match="snapshot snap already exists"):
        make(home)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "state").write_bytes(b"device statf" * 100), "its file state does not match"),
    (lambda d: os.truncate(d / "ram", 10), "its file ram is not the one it was made with (size differs)"),
    (lambda d: (d / "disk.qcow2").unlink(), "its directory missing disk.qcow2"),
    (lambda d: (d / "extra").write_text("x"), "its directory has extra extra"),
    (lambda d: ((d / "state").unlink(), (d / "state").symlink_to("/etc/passwd")), "not a regular file"),
    (lambda d: (d / "manifest.json").write_text("{"), "its manifest is damaged"),
    (lambda d: (d / "manifest.json").write_text("[]"), "holds no signed manifest"),
    (lambda d: (d / "manifest.json").write_bytes(b" " * (2 << 20)), "over 1 MiB"),
    (lambda d: (d / "manifest.json").unlink(), "cannot read its manifest"),
    (lambda d: ((d / "manifest.json").unlink(), os.mkfifo(d / "manifest.json")), "is not a regular file"),
    (lambda d: (d / "manifest.json").write_text("[" * 200_000), "nested too deep"),
    (lambda d: _edit(d, lambda m: m.update(vcpus=64)), "signature does not match (it was edited)"),
    (lambda d: _edit(d, lambda m: m.update(tag="other"), resign=True), "its manifest is that of snapshot 'other'"),
    (lambda d: _edit(d, lambda m: m.update(kind="mystery"), resign=True), "kind 'mystery'"),
    (lambda d: _edit(d, lambda m: m.update(argv=[1, 2]), resign=True), "argv must be a list of strings"),
    (lambda d: _edit(d, lambda m: m["files"].update(passwd=m["files"]["ram"]), resign=True),
     "file 'passwd' is not one a snapshot has"),
    (lambda d: _edit(d, lambda m: m.update(format=2), resign=True), "format '2' is not 1"),
    (lambda d: _edit(d, lambda m: m.update(network="everywhere"), resign=True), "network 'everywhere'"),
])
def test_damage_is_refused_with_what_is_wrong(tmp_path: Path, damage, message: str) -> None:
    home = MvmHome(tmp_path)
    directory = make(home)
    damage(directory)
    with pytest.raises(SnapshotError) as err:
        SnapshotStore(home).load("snap")
    assert message in str(err.value) and "\n" not in str(err.value)
    listed = SnapshotStore(home).list()
    if "manifest" in message or "signature" in message or "format" in message or "kind" in message \
            or "argv" in message or "is not one" in message or "that of snapshot" in message:
        assert listed[0].__class__.__name__ == "DamagedSnapshot"


def _edit(directory: Path, change, resign: bool = False) -> None:
    from mvm.security.host_key import HostKey, canonical_json

    path = directory / "manifest.json"
    signed = json.loads(path.read_text())
    change(signed["manifest"])
    if resign:
        key = HostKey.load_or_create(directory.parent.parent / "keys")
        signed["signature"] = key.sign(canonical_json(signed["manifest"]))
    path.write_text(json.dumps(signed))


def test_rewriting_a_file_with_the_same_bytes_is_still_accepted(tmp_path: Path) -> None:
    home = MvmHome(tmp_path)
    directory = make(home)
    data = (directory / "state").read_bytes()
    (directory / "state").write_bytes(data)  # a new ctime: checked by hash instead
    SnapshotStore(home).load("snap")


def test_remove_leaves_nothing(tmp_path: Path) -> None:
    home = MvmHome(tmp_path)
    make(home)
    SnapshotStore(home).remove("snap")
    assert [p.name for p in home.snapshots.iterdir() if not p.name.endswith(".lock")] == []


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
                    max_leaves=20))
def test_hostile_manifest_bodies_raise_value_error_only(body) -> None:
    try:
        SnapshotManifest.from_dict(body)
    except ValueError:
        pass


@pytest.mark.parametrize("tag", ["", "UPPER", "a/b", "../x", ".hidden", "x" * 65, "a b"])
def test_bad_tags(tag: str) -> None:
    with pytest.raises(Exception, match="snapshot tag"):
        check_tag(tag)


def test_a_copy_leaves_holes_for_zeros_even_where_the_source_has_them_written(tmp_path: Path) -> None:
    """A RAM file an incoming migration filled is allocated throughout, though mostly zeros:
    its snapshot keeps only what is not zero (and reads back the same bytes)."""
    from mvm.runtime.backends.qemu_migration import copy_sparse

    src = tmp_path / "ram"
    data = bytearray(8 << 20)  # 8 MiB, written out in full (no holes in the source)
    data[3 << 20: (3 << 20) + 5] = b"guest"
    data[-1] = 7
    src.write_bytes(bytes(data))
    os.fsync(os.open(src, os.O_RDONLY))
    copy_sparse(src, tmp_path / "copy")
    copied = tmp_path / "copy"
    assert copied.read_bytes() == bytes(data)
    assert copied.stat().st_blocks * 512 <= 2 * (1 << 16) < src.stat().st_blocks * 512
