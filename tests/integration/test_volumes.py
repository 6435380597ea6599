"""Declared volumes, on QEMU (virtiofs) and Docker (bind mounts): a read-only one is readable
and not writable from the guest, an rw one's writes show on the host, broad host paths are
refused with one line and leave no VM, a VM with a volume cannot be snapshotted, and no
virtiofsd outlives its VM (after `down`, and after its supervisor is SIGKILLed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

WORKLOAD = """
    name = "vols"
    [entrypoint]
    command = ["/bin/sleep", "600"]
"""
DECLARED = WORKLOAD + """
    [[volumes]]
    host = "./input"
    guest = "/input"
"""
WORKLOAD_UID = 1000  # a sealed image's entrypoint uid (core/workload.py)


@pytest.fixture(scope="module", params=["qemu", "docker"])
def ctl(request: pytest.FixtureRequest) -> Mvmctl:
    base = request.getfixturevalue("mvmctl" if request.param == "qemu" else "docker_mvmctl")
    return base.with_backend(request.param)


def project(workload_dir, toml: str = WORKLOAD) -> Path:
    """A workload with input/ (root's, one file) and out/ (the workload uid's, for rw)."""
    directory = workload_dir(toml, name="vols")
    (directory / "input").mkdir()
    (directory / "input" / "hello.txt").write_text("hello\n")
    (directory / "out").mkdir()
    os.chown(directory / "out", WORKLOAD_UID, WORKLOAD_UID)
    return directory


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("mvmctl: docker:")]


def virtiofsd_pids(ctl: Mvmctl, name: str = "vols") -> list[int]:
    """The virtiofsd processes VM ``name`` runs (from the pid file its launcher writes)."""
    return [int(p) for p in (ctl.home / "vms" / name / "virtiofsd.pids").read_text().split()]


def live_virtiofsd(pids: list[int]) -> list[int]:
    """Those of ``pids`` that are still a running virtiofsd (not a zombie)."""
    alive = []
    for pid in pids:
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if exe.endswith("virtiofsd") and state != "Z":
            alive.append(pid)
    return alive


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


def test_ro_volume_is_readable_not_writable_and_rw_writes_reach_the_host(ctl: Mvmctl, workload_dir) -> None:
    directory = project(workload_dir, DECLARED)  # /input from mvm.toml (ro by default), /out from -v rw
    ctl("up", str(directory), "-v", f"{directory / 'out'}:/out:rw", check=True)
    pids = virtiofsd_pids(ctl) if ctl.hypervisor == "qemu" else []
    try:
        assert ctl("exec", "vols", "--", "cat", "/input/hello.txt", check=True).stdout == "hello\n"
        for attempt in ("echo changed > /input/hello.txt", "echo new > /input/new.txt", "rm /input/hello.txt",
                        "mkdir /input/d", "chmod 777 /input/hello.txt"):
            proc = ctl("exec", "vols", "--", "/bin/sh", "-c", attempt)
            assert proc.returncode != 0, f"{attempt!r} succeeded in a read-only volume"
        assert (directory / "input" / "hello.txt").read_text() == "hello\n"
        assert sorted(p.name for p in (directory / "input").iterdir()) == ["hello.txt"]

        ctl("exec", "vols", "--", "/bin/sh", "-c", "echo from-guest > /out/result.txt", check=True)
        result = directory / "out" / "result.txt"
        assert result.read_text() == "from-guest\n"
        assert result.stat().st_uid == WORKLOAD_UID  # the workload's files are the directory owner's

        status = ctl("status", "vols", check=True).stdout
        assert f"volume      {directory / 'input'} -> /input (ro" in status
        assert f"volume      {directory / 'out'} -> /out (rw" in status
    finally:
        ctl("down", "vols", check=True)
    if ctl.hypervisor == "qemu":
        assert len(pids) == 2
        wait_until(lambda: not live_virtiofsd(pids), "no virtiofsd is left after down")


def test_a_hostile_guest_stays_inside_its_volume(ctl: Mvmctl, workload_dir, tmp_path: Path) -> None:
    """A host symlink in the volume leads into the guest's own tree, not the host's; what the
    guest makes setuid is its uid's (the directory owner's), never root's; a symlink it plants
    is left alone by the host side."""
    directory = project(workload_dir)
    secret = tmp_path / "host-secret.txt"
    secret.write_text("the host's secret\n")
    (directory / "out" / "to-secret").symlink_to(secret)
    ctl("up", str(directory), "-v", f"{directory / 'out'}:/out:rw", check=True)
    try:
        through = ctl("exec", "vols", "--", "/bin/sh", "-c", "cat /out/to-secret; cat /out/../out/to-secret")
        assert "the host's secret" not in through.stdout
        ctl("exec", "vols", "--", "/bin/sh", "-c",
            "cp /bin/sh /out/suid && chmod 4755 /out/suid && ln -s / /out/root-link", check=True)
        made = (directory / "out" / "suid").stat()
        assert made.st_mode & 0o4000 and made.st_uid == WORKLOAD_UID  # setuid to the workload's own uid only
        assert os.readlink(directory / "out" / "root-link") == "/"
        status = ctl("status", "vols", check=True)  # the host side never follows it
        assert status.returncode == 0
    finally:
        ctl("down", "vols", check=True)


def test_guest_root_cannot_write_a_ro_volume_by_remounting_it_nor_make_root_files(mvmctl: Mvmctl,
                                                                                  workload_dir) -> None:
    """On QEMU the read-only mount that counts is the one virtiofsd serves from, in its own
    namespace: root in the guest (a dev image's workload) remounting its side rw gains nothing;
    and what guest root makes in an rw volume is the directory owner's on the host, not root's."""
    ctl = mvmctl.with_backend("qemu")
    directory = project(workload_dir, WORKLOAD.replace('name = "vols"', 'name = "vols"\n    dev = true'))
    ctl("up", str(directory), "-v", f"{directory / 'input'}:/input", "-v", f"{directory / 'out'}:/out:rw",
        check=True)
    try:
        assert ctl("exec", "vols", "--", "id", "-u", check=True).stdout.strip() == "0"
        ctl("exec", "vols", "--", "mount", "-o", "remount,rw", "/input", check=True)
        for attempt in ("echo changed > /input/hello.txt", "echo new > /input/new.txt", "rm /input/hello.txt"):
            proc = ctl("exec", "vols", "--", "/bin/sh", "-c", attempt)
            assert proc.returncode != 0 and "Read-only file system" in proc.stderr, (attempt, proc.stderr)
        assert sorted(p.name for p in (directory / "input").iterdir()) == ["hello.txt"]
        assert (directory / "input" / "hello.txt").read_text() == "hello\n"
        ctl("exec", "vols", "--", "/bin/sh", "-c", "cp /bin/sh /out/suid && chown 0:0 /out/suid && "
            "chmod 4755 /out/suid", check=True)
        made = (directory / "out" / "suid").stat()
        assert made.st_mode & 0o4000 and (made.st_uid, made.st_gid) == (WORKLOAD_UID, WORKLOAD_UID)
        assert ctl("exec", "vols", "--", "mknod", "/out/null", "c", "1", "3").returncode != 0
        assert not (directory / "out" / "null").exists()
    finally:
        ctl("down", "vols", check=True)


def test_broad_or_missing_host_paths_are_refused_with_one_line_and_no_vm(ctl: Mvmctl, workload_dir,
                                                                          tmp_path: Path) -> None:
    directory = project(workload_dir)
    outside = tmp_path / "outside"
    outside.mkdir()
    (directory / "escape").symlink_to(outside)
    cases = [("/", "the host's root directory"),
             (os.path.expanduser("~"), "your home directory"),
             (str(outside), "outside the workload's directory"),
             (str(directory / "escape"), f"resolves to {outside}"),
             (str(directory / "missing"), "does not exist")]
    if ctl.hypervisor == "qemu":
        cases.append((f"{directory / 'input'}:/x:rw", "owned by root"))
    for spec, words in cases:
        spec = spec if spec.endswith(":rw") else f"{spec}:/x"
        for verb in (("up",), ("run", "--attached"), ("run", "--dry-run")):
            proc = ctl(*verb, str(directory), "-v", spec)
            assert proc.returncode == 2, (spec, verb, proc.stdout, proc.stderr)
            [line] = errors(proc.stderr)
            assert words in line, line
        assert not (ctl.home / "vms" / "vols").exists()
    # --allow-broad-mount lets an outside directory through (not a dry run's business to boot it)
    plan = ctl("run", "--dry-run", "--json", str(directory), "-v", f"{outside}:/x", "--allow-broad-mount",
               check=True)
    assert json.loads(plan.stdout)["mounts"] == [
        {"host": str(outside), "guest": "/x", "readonly": True, "tag": "mvm0",
         "via": "virtiofs" if ctl.hypervisor == "qemu" else "bind mount"}]


def test_a_vm_with_a_volume_cannot_be_snapshotted_forked_or_saved_to_disk(mvmctl: Mvmctl, workload_dir) -> None:
    ctl = mvmctl.with_backend("qemu")  # (docker has no snapshots at all)
    directory = project(workload_dir)
    ctl("up", str(directory), "-v", f"{directory / 'input'}:/input", check=True)
    try:
        for verb in (("snapshot", "create", "vols", "--tag", "vols-snap"), ("fork", "vols"),
                     ("pause", "vols", "--to-disk")):
            proc = ctl(*verb)
            assert proc.returncode == 2, (verb, proc.stdout, proc.stderr)
            [line] = proc.stderr.splitlines()
            assert "has a live volume" in line and str(directory / "input") in line, line
        [vm] = [v for v in json.loads(ctl("ls", "--json", check=True).stdout) if v["name"] == "vols"]
        assert vm["state"] == "running"
        assert "vols-snap" not in ctl("snapshot", "ls", "--json", check=True).stdout
    finally:
        ctl("down", "vols", check=True)


def test_no_virtiofsd_outlives_a_killed_supervisor(mvmctl: Mvmctl, workload_dir) -> None:
    ctl = mvmctl.with_backend("qemu")
    directory = project(workload_dir)
    ctl("up", str(directory), "-v", f"{directory / 'input'}:/input", "-v", f"{directory / 'out'}:/out:rw",
        check=True)
    try:
        pids = virtiofsd_pids(ctl)
        assert len(pids) == 2 and live_virtiofsd(pids) == pids
        record = json.loads((ctl.home / "vms" / "vols" / "record.json").read_text())
        os.kill(record["supervisor_pid"], signal.SIGKILL)
        wait_until(lambda: not live_virtiofsd(pids), "the virtiofsd processes are gone")
        [vm] = [v for v in json.loads(ctl("ls", "--json", check=True).stdout) if v["name"] == "vols"]
        assert vm["state"] == "stopped"
    finally:
        ctl("down", "vols", "--force")


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/lib/qemu/virtiofsd", os.X_OK),
                    reason="QEMU volumes need root and virtiofsd")
def test_virtiofsd_dies_with_its_parent_even_before_qemu_connects(tmp_path: Path) -> None:
    """Its uid change clears the parent-death signal, so it is set after it: a launcher that
    dies before QEMU connects leaves no virtiofsd waiting on its socket for ever."""
    shared = tmp_path / "shared"
    shared.mkdir()
    script = ("import sys; from pathlib import Path; from mvm.runtime import virtiofs; "
              "print(virtiofs.spawn_daemon(Path(sys.argv[1]), Path(sys.argv[2]), readonly=True, workload_uid=1000, "
              "log=Path(sys.argv[3])))")
    proc = subprocess.run([sys.executable, "-c", script, str(shared), str(tmp_path / "s.sock"),
                           str(tmp_path / "vfs.log")], capture_output=True, text=True, timeout=60, check=True)
    pid = int(proc.stdout)
    try:
        wait_until(lambda: not live_virtiofsd([pid]), f"virtiofsd {pid} died with the process that started it")
    finally:
        for left in live_virtiofsd([pid]):  # (only when the test failed: it is this test's daemon)
            os.kill(left, signal.SIGKILL)
