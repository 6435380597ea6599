"""`mvmctl prune` and `manifest-prune` on a home of their own, with real builds and VMs: what a
running VM or a snapshot uses stays, a stopped VM's files and an unreferenced artifact go,
--dry-run removes nothing, and the bytes freed are reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

WORKLOAD = """
    name = "{name}"
    [entrypoint]
    command = ["/bin/sh", "-c", "echo {name}; sleep 600"]
"""


def write(directory: Path, name: str, text: str = WORKLOAD) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mvm.toml").write_text(text.format(name=name))
    return directory


def build_key(ctl: Mvmctl, directory: Path) -> str:
    return json.loads(ctl("build", str(directory), "--json", check=True).stdout)["key"]


def unreference(home: Path, key: str) -> None:
    """Take away the stamps and ref that name ``key``, as if its project had moved on."""
    for directory in (home / "store" / "stamps", home / "store" / "refs"):
        for file in directory.iterdir():
            if file.read_text().strip() == key:
                file.unlink()


def prune(ctl: Mvmctl, *args: str) -> dict:
    return json.loads(ctl("prune", "--json", *args, check=True).stdout)


@pytest.fixture(scope="module")
def home(mvmctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home of its own (prune must not take other modules' VMs and images), with the session's
    package and kernel caches hard-linked in so nothing is downloaded again."""
    warm = write(tmp_path_factory.mktemp("warm"), "warm")
    mvmctl("build", str(warm), check=True)
    root = tmp_path_factory.mktemp("prune-home")
    for part in ("cache/debs", "cache/kernels"):
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(mvmctl.home / part), str(root / part)], check=True)
    return root


@pytest.fixture(scope="module", autouse=True)
def own_system_tmp(tmp_path_factory: pytest.TempPathFactory):
    """prune also sweeps what older versions left in the system /tmp: point it at a directory of
    ours, so these tests never touch other users' (or sessions') files."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("system-tmp"))
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="module")
def ctl(home: Path) -> Mvmctl:
    return Mvmctl(home).with_backend("qemu")


def test_prune_keeps_what_a_running_vm_and_a_snapshot_use_and_removes_the_rest(
        ctl: Mvmctl, home: Path, tmp_path: Path) -> None:
    running_dir, snap_dir, gone_dir = (write(tmp_path / n, n) for n in ("p-run", "p-snap", "p-gone"))
    running_key, snap_key = build_key(ctl, running_dir), build_key(ctl, snap_dir)
    ctl("up", str(running_dir), check=True)
    try:
        # VM p-gone runs to its end and stays listed as stopped.
        assert ctl("run", "--attached", str(gone_dir), "--", "/bin/true").returncode == 0
        gone_key = json.loads((home / "vms" / "p-gone" / "record.json").read_text())["artifact_key"]
        for key in (running_key, snap_key, gone_key):
            unreference(home, key)  # only the VM, the snapshot, or nothing, keeps each now
        snapshot = home / "snapshots" / "s1"
        snapshot.mkdir(parents=True)
        (snapshot / "manifest.json").write_text(json.dumps({"manifest": {"artifact_key": snap_key, "tag": "s1"}}))
        # scratch of a process that is gone, and of one that lives (this one); a .deb no lock names
        dead = home / "tmp" / "docker-import-999999999-abc"
        dead.mkdir(parents=True)
        (dead / "blob").write_bytes(b"x" * 100_000)
        alive = home / "tmp" / f"docker-import-{os.getpid()}-abc"
        alive.mkdir()
        junk_deb = home / "cache" / "debs" / "junk_1.0_all.deb"
        junk_deb.write_bytes(b"y" * 50_000)

        dry = prune(ctl, "--dry-run")
        assert dry["dry_run"] is True
        removed = {(r["kind"], r["path"]) for r in dry["removed"]}
        assert ("vm", str(home / "vms" / "p-gone")) in removed
        assert ("artifact", str(home / "store" / gone_key)) in removed
        assert not any(r["path"] and r["path"].endswith((running_key, snap_key)) for r in dry["removed"])
        # --dry-run touched nothing
        assert (home / "vms" / "p-gone").is_dir() and (home / "store" / gone_key).is_dir()
        assert dead.is_dir() and junk_deb.is_file()

        # a damaged snapshot manifest might name anything: no artifact goes, and it says why
        damaged = home / "snapshots" / "s2"
        damaged.mkdir()
        (damaged / "manifest.json").write_text('{"artifact_key": ')
        careful = prune(ctl, "--dry-run")
        assert not [r for r in careful["removed"] if r["kind"] == "artifact"]
        assert any("snapshot 's2'" in note for note in careful["notes"])
        shutil.rmtree(damaged)

        text = ctl("prune", check=True).stdout
        assert "removed vm       p-gone (stopped)" in text and "freed " in text
        freed = int(text.rsplit("freed ", 1)[1].split()[0])
        assert freed >= sum(r["bytes"] for r in dry["removed"] if r["kind"] in ("vm", "artifact")) > 1_000_000
        assert not (home / "vms" / "p-gone").exists() and not (home / "store" / gone_key).exists()
        assert (home / "store" / running_key).is_dir() and (home / "store" / snap_key).is_dir()
        assert not dead.exists() and alive.is_dir() and not junk_deb.exists()
        kept_debs = (home / "store" / running_key / "debs.txt").read_text().split()
        assert kept_debs and all((home / "cache" / "debs" / deb).is_file() for deb in kept_debs)
        # the running VM still runs, on its artifact
        assert ctl("exec", "p-run", "--", "cat", "/etc/mvm/name", check=True).stdout.strip() == "p-run"
        assert prune(ctl)["freed_bytes"] == 0  # nothing left to free
    finally:
        ctl("down", "p-run", "--force")
        shutil.rmtree(home / "snapshots", ignore_errors=True)


def test_manifest_prune_keeps_the_newest_build_of_a_project(ctl: Mvmctl, home: Path, tmp_path: Path) -> None:
    project = write(tmp_path / "slots", "slots")
    first = build_key(ctl, project)
    (project / "mvm.toml").write_text(WORKLOAD.format(name="slots").replace("sleep 600", "sleep 601"))
    second = build_key(ctl, project)
    (project / "mvm.toml").write_text(WORKLOAD.format(name="slots").replace("sleep 600", "sleep 602"))
    newest = build_key(ctl, project)
    assert len({first, second, newest}) == 3

    dry = json.loads(ctl("manifest-prune", str(project), "--dry-run", "--json", check=True).stdout)
    assert {r["path"] for r in dry["removed"] if r["kind"] == "artifact"} == {
        str(home / "store" / first), str(home / "store" / second)}
    assert (home / "store" / first).is_dir()

    text = ctl("manifest-prune", str(project), check=True).stdout
    assert "freed " in text
    assert not (home / "store" / first).exists() and not (home / "store" / second).exists()
    assert (home / "store" / newest).is_dir()
    # the newest still starts from its stamp, without a build
    assert ctl("run", "--attached", str(project), "--", "/bin/true").returncode == 0
    again = json.loads(ctl("manifest-prune", str(project), "--json", check=True).stdout)
    assert again["freed_bytes"] == 0
    one_line = ctl("manifest-prune", str(tmp_path / "nowhere"))
    assert one_line.returncode == 2 and one_line.stderr.count("\n") == 1


def test_prune_removes_docker_images_of_artifacts_that_are_gone(home: Path, docker_mvmctl: Mvmctl,
                                                                tmp_path: Path) -> None:
    ctl = Mvmctl(home, docker_mvmctl.docker_host).with_backend("docker")
    kept_dir, gone_dir = write(tmp_path / "d-kept", "d-kept"), write(tmp_path / "d-gone", "d-gone")
    for directory in (kept_dir, gone_dir):
        assert ctl("run", "--attached", str(directory), "--", "/bin/true").returncode == 0
    gone_key = json.loads((home / "vms" / "d-gone" / "record.json").read_text())["artifact_key"]
    kept_key = json.loads((home / "vms" / "d-kept" / "record.json").read_text())["artifact_key"]
    unreference(home, gone_key)

    def image_exists(name: str, key: str) -> bool:
        return subprocess.run(["docker", "image", "inspect", f"mvm/{name}:{key[:20]}"], env=ctl.env, check=False,
                              capture_output=True).returncode == 0

    assert image_exists("d-gone", gone_key) and image_exists("d-kept", kept_key)
    report = prune(ctl)
    images = [r for r in report["removed"] if r["kind"] == "image"]
    assert [r["name"] for r in images] == [f"docker mvm/d-gone:{gone_key[:20]}"] and images[0]["bytes"] > 0
    assert not image_exists("d-gone", gone_key) and image_exists("d-kept", kept_key)


def test_kept_data_disks_go_only_with_disks(tmp_path: Path) -> None:
    ctl = Mvmctl(tmp_path / "home")
    disk = tmp_path / "home" / "disks" / "old.ext4"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"z" * 8192)
    report = prune(ctl)
    assert [k for k in report["kept"] if k["kind"] == "disk"][0]["name"] == "old.ext4" and disk.exists()
    report = prune(ctl, "--disks")
    assert [(r["kind"], r["name"]) for r in report["removed"]] == [("disk", "old.ext4")] and not disk.exists()
    assert report["freed_bytes"] >= 8192
