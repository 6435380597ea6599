"""Snapshots on real QEMU guests: clones that share a saved state and then diverge, each with
its own identity; forks; templates; pause that really freezes; pause to disk and back;
tampered snapshots refused; kill -9 of `up --snapshot` leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import Mvmctl, default_signals
from tests.integration.test_boot import qemu_of_vm

pytestmark = pytest.mark.vm

# The entrypoint is the counter: it runs as the workload's process, and must go on running
# in every clone and after a resume.
COUNTER = """
    name = "snapsrc"
    memory_mib = 128
    [entrypoint]
    command = ["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done"]
"""
WAIT_S = 60.0


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("snapsrc")
    (directory / "mvm.toml").write_text(COUNTER)
    return directory


@pytest.fixture(scope="module")
def source(mvmctl: Mvmctl, workload: Path):
    """A running VM with a file in memory and one on disk, saved as snapshot "base"."""
    mvmctl("up", str(workload), check=True)
    sh(mvmctl, "snapsrc", "echo in-memory > /tmp/mem-marker; echo on-disk > $HOME/disk-marker; sync")
    counter_advances(mvmctl, "snapsrc")
    mvmctl("snapshot", "create", "snapsrc", "--tag", "base", check=True)
    yield "snapsrc"
    mvmctl("down", "snapsrc", "--force")


def sh(ctl: Mvmctl, vm: str, script: str, check: bool = True) -> str:
    proc = ctl("exec", vm, "--", "sh", "-c", script)
    if check:
        assert proc.returncode == 0, f"{vm}: {script}: {proc.stderr}"
    return proc.stdout


def counter(ctl: Mvmctl, vm: str) -> int:
    return int(sh(ctl, vm, "cat /tmp/counter").strip())


def counter_advances(ctl: Mvmctl, vm: str) -> None:
    """The counter process runs: its value changes (polled, not slept on)."""
    first = counter(ctl, vm)
    deadline = time.monotonic() + WAIT_S
    while counter(ctl, vm) == first:
        assert time.monotonic() < deadline, f"the counter in {vm} stopped at {first}"


def snapshot_dir(ctl: Mvmctl, tag: str) -> Path:
    return ctl.home / "snapshots" / tag


def listed(ctl: Mvmctl) -> dict[str, dict]:
    return {vm["name"]: vm for vm in json.loads(ctl("ls", "--json", check=True).stdout)}


def nothing_left_of(ctl: Mvmctl, name: str) -> bool:
    vm = listed(ctl).get(name)
    return (vm is None or vm["state"] == "stopped") and not qemu_of_vm(ctl.home, name)


# -- the snapshot itself ---------------------------------------------------------------------------


def test_snapshot_files_are_private_signed_and_listed(mvmctl: Mvmctl, source: str) -> None:
    from mvm.security.host_key import canonical_json, verify

    directory = snapshot_dir(mvmctl, "base")
    assert directory.stat().st_mode & 0o777 == 0o700
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["disk.qcow2", "manifest.json", "ram", "state"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in directory.iterdir())
    signed = json.loads((directory / "manifest.json").read_text())
    public = (mvmctl.home / "keys" / "host.ed25519.pub").read_text().strip()
    assert signed["public_key"] == public
    assert verify(public, signed["signature"], canonical_json(signed["manifest"]))
    manifest = signed["manifest"]
    assert manifest["kind"] == "ram-file" and manifest["memory_mib"] == 128 and manifest["source_vm"] == source
    assert set(manifest["files"]) == {"disk.qcow2", "ram", "state"}
    # the device state is small: the RAM is its own (sparse) file
    assert manifest["files"]["state"]["size"] < 1 << 20
    inspected = json.loads(mvmctl("snapshot", "inspect", "base", check=True).stdout)
    assert inspected["verified"].startswith("signature and sha256")
    rows = json.loads(mvmctl("snapshot", "ls", "--json", check=True).stdout)
    assert [r["tag"] for r in rows if r["tag"] == "base"] == ["base"]
    assert listed(mvmctl)[source]["state"] == "running"  # it runs on after the snapshot
    counter_advances(mvmctl, source)


def test_clones_share_the_saved_state_then_diverge_and_are_unique(mvmctl: Mvmctl, source: str) -> None:
    for name in ("clone1", "clone2"):
        proc = mvmctl("up", "--snapshot", "base", "--name", name, check=True)
        assert f"VM {name} is up" in proc.stdout and "a clone of snapshot base" in proc.stdout
    try:
        for name in ("clone1", "clone2"):
            assert sh(mvmctl, name, "cat /tmp/mem-marker $HOME/disk-marker").split() == ["in-memory", "on-disk"]
            counter_advances(mvmctl, name)  # the counter process was saved running, and runs on
        sh(mvmctl, "clone1", "echo mine > /tmp/only-clone1; echo mine > $HOME/only-clone1")
        assert sh(mvmctl, "clone2", "ls /tmp/only-clone1 $HOME/only-clone1 2>&1", check=False).count("No such") == 2
        assert sh(mvmctl, source, "ls /tmp/only-clone1 2>&1", check=False).count("No such") == 1

        seen = {}
        for name in ("clone1", "clone2"):
            before = time.time()
            out = sh(mvmctl, name, "cat /proc/sys/kernel/random/uuid /etc/machine-id; hostname; "
                                   "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s")
            after = time.time()
            uuid, machine_id, hostname, random_bytes, clock = out.split()
            assert hostname == name
            assert int(before) - 1 <= int(clock) <= after + 1, f"{name}'s clock is {int(clock) - after:.0f} s off"
            seen[name] = (uuid, machine_id, random_bytes)
        for a, b in zip(seen["clone1"], seen["clone2"], strict=True):
            assert a != b
        # The workload cannot give itself (or another clone) an identity, nor learn the entropy.
        forged = sh(mvmctl, "clone1", "(echo identity 1800000000.000000 evil 0123456789abcdef0123456789abcdef "
                                      f"{'ab' * 64} > /run/mvm/identity-request) 2>&1; "
                                      "(echo freeze 00 > /run/mvm/control) 2>&1; echo done", check=False)
        assert forged.count("Permission denied") == 2, forged
        assert sh(mvmctl, "clone1", "hostname").strip() == "clone1"
        status = sh(mvmctl, "clone1", "cat /run/mvm/identity").split()
        assert status[1:] == ["ok"] and len(status[0]) == 32  # a digest of the entropy, none of it
        source_id = sh(mvmctl, source, "cat /etc/machine-id 2>/dev/null || true").strip()
        assert source_id not in (seen["clone1"][1], seen["clone2"][1])

        refused = mvmctl("snapshot", "rm", "base")
        assert refused.returncode == 2 and "in use by running clones clone1, clone2" in refused.stderr
        assert snapshot_dir(mvmctl, "base").is_dir()
        ram = snapshot_dir(mvmctl, "base") / "ram"
        assert json.loads(mvmctl("snapshot", "inspect", "base", check=True).stdout)["clones"] == ["clone1", "clone2"]
        assert ram.stat().st_mtime_ns <= ram.stat().st_ctime_ns  # restoring never wrote it
    finally:
        for name in ("clone1", "clone2"):
            mvmctl("down", name, "--force")


def test_a_clone_keeps_its_own_disk_after_the_source_writes(mvmctl: Mvmctl, source: str) -> None:
    sh(mvmctl, source, "echo later > $HOME/later-marker; sync")
    mvmctl("up", "--snapshot", "base", "--name", "clone3", check=True)
    try:
        assert "No such" in sh(mvmctl, "clone3", "cat $HOME/later-marker 2>&1", check=False)
    finally:
        mvmctl("down", "clone3", "--force")


def test_fork_makes_live_copies(mvmctl: Mvmctl, source: str) -> None:
    proc = mvmctl("fork", source, "--count", "3", "--name-prefix", "kid", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    try:
        assert [c["name"] for c in result["copies"]] == ["kid-1", "kid-2", "kid-3"]
        assert all(c["ok"] for c in result["copies"])
        ids = set()
        for name in ("kid-1", "kid-2", "kid-3"):
            assert sh(mvmctl, name, "hostname").strip() == name
            assert sh(mvmctl, name, "cat /tmp/mem-marker").strip() == "in-memory"
            ids.add(sh(mvmctl, name, "cat /proc/sys/kernel/random/uuid").strip())
        assert len(ids) == 3
        counter_advances(mvmctl, "kid-2")
        refused = mvmctl("snapshot", "rm", result["snapshot"])
        assert refused.returncode == 2 and "in use" in refused.stderr
        again = mvmctl("fork", source, "--count", "1", "--name-prefix", "kid", "--json", timeout=600)
        assert again.returncode == 0, again.stderr  # the next number, not a clash with kid-1
        assert [c["name"] for c in json.loads(again.stdout)["copies"]] == ["kid-4"]
    finally:
        for name in ("kid-1", "kid-2", "kid-3", "kid-4"):
            mvmctl("down", name, "--force")
    # prune removes the snapshots the forks made, once no copy runs from them (and only those).
    pruned = json.loads(mvmctl("prune", "--json", check=True).stdout)
    removed = {(r["kind"], r["name"]) for r in pruned["removed"]}
    assert ("snapshot", result["snapshot"]) in removed and ("snapshot", "base") not in removed
    assert not snapshot_dir(mvmctl, result["snapshot"]).exists() and snapshot_dir(mvmctl, "base").is_dir()


# -- tampering ---------------------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _resign_with_another_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from mvm.security.host_key import canonical_json

    signed = json.loads(path.read_text())
    other = Ed25519PrivateKey.generate()
    import base64

    signed["public_key"] = other.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    signed["signature"] = base64.b64encode(other.sign(canonical_json(signed["manifest"]))).decode()
    path.write_text(json.dumps(signed))


def _edit_manifest(path: Path) -> None:
    signed = json.loads(path.read_text())
    signed["manifest"]["memory_mib"] = 4096
    path.write_text(json.dumps(signed))


def _claim_another_qemu(snapshot: Path) -> None:
    """A manifest, signed with the host's own key, of a snapshot made by another QEMU."""
    from mvm.security.host_key import HostKey, canonical_json

    manifest = snapshot / "manifest.json"
    signed = json.loads(manifest.read_text())
    signed["manifest"]["hypervisor_version"] = "6.0.0"
    signed["signature"] = HostKey.load_or_create(snapshot.parent.parent / "keys").sign(canonical_json(signed["manifest"]))
    manifest.write_text(json.dumps(signed))


TAMPERING = {
    "qemu-version": (_claim_another_qemu, "the snapshot was made by QEMU 6.0.0; this host runs QEMU"),
    "state": (lambda d: _flip_byte(d / "state"), "its file state does not match its signed manifest"),
    "ram": (lambda d: _flip_byte(d / "ram"), "its file ram does not match its signed manifest"),
    "disk": (lambda d: _flip_byte(d / "disk.qcow2"), "its file disk.qcow2 does not match its signed manifest"),
    "truncated": (lambda d: os.truncate(d / "state", 100), "its file state is not the one it was made with"),
    "extra": (lambda d: (d / "evil").write_bytes(b"x"), "its directory has extra evil"),
    "missing": (lambda d: (d / "ram").unlink(), "its directory missing ram"),
    "manifest": (lambda d: _edit_manifest(d / "manifest.json"), "signature does not match"),
    "other-key": (lambda d: _resign_with_another_key(d / "manifest.json"), "signed by another key"),
}


@pytest.fixture(scope="module")
def pristine(mvmctl: Mvmctl, source: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One snapshot, copied for each tampering (cp keeps it byte-identical; its stat changes,
    so the copies are checked by hashing, as a tampered file would be)."""
    mvmctl("snapshot", "create", source, "--tag", "pristine", check=True)
    return snapshot_dir(mvmctl, "pristine")


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_tampered_snapshot_is_refused_and_nothing_starts(mvmctl: Mvmctl, pristine: Path, case: str) -> None:
    tag = f"tampered-{case}"
    shutil.copytree(pristine, snapshot_dir(mvmctl, tag), copy_function=shutil.copy2)
    manifest = snapshot_dir(mvmctl, tag) / "manifest.json"
    signed = json.loads(manifest.read_text())
    signed["manifest"]["tag"] = tag  # (a copy under another tag: re-signed with the host's own key)
    from mvm.core.state import MvmHome
    from mvm.security.host_key import HostKey, canonical_json

    key = HostKey.load_or_create(MvmHome(mvmctl.home).keys)
    signed["signature"] = key.sign(canonical_json(signed["manifest"]))
    manifest.write_text(json.dumps(signed))
    assert mvmctl("snapshot", "inspect", tag).returncode == 0  # the copy itself is good
    damage, message = TAMPERING[case]
    damage(snapshot_dir(mvmctl, tag))
    proc = mvmctl("up", "--snapshot", tag, "--name", f"t-{case}")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"t-{case}" not in listed(mvmctl) and not qemu_of_vm(mvmctl.home, f"t-{case}")
    shutil.rmtree(snapshot_dir(mvmctl, tag))


def test_a_clean_copy_with_a_new_stat_is_hashed_and_accepted(mvmctl: Mvmctl, pristine: Path) -> None:
    os.utime(pristine / "ram")  # a new mtime/ctime: the fast path no longer vouches for it
    proc = mvmctl("up", "--snapshot", "pristine", "--name", "rehashed")
    try:
        assert proc.returncode == 0, proc.stderr
    finally:
        mvmctl("down", "rehashed", "--force")


# -- templates -----------------------------------------------------------------------------------


def test_template_build_then_up_clones_it_unless_cold(mvmctl: Mvmctl, workload: Path, source: str) -> None:
    proc = mvmctl("template", "build", str(workload), "--tag", "snapsrc-template", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "template snapsrc-template" in proc.stdout
    assert not [n for n in listed(mvmctl) if n.startswith("template-")]  # the build VM is gone
    try:
        warm = mvmctl("up", str(workload), "--name", "warm", check=True)
        assert "a clone of snapshot snapsrc-template" in warm.stdout
        counter_advances(mvmctl, "warm")
        cold = mvmctl("up", str(workload), "--name", "cold", "--cold", check=True)
        assert "a clone" not in cold.stdout
        sized = mvmctl("up", str(workload), "--name", "sized", "--memory", "192M", check=True)
        assert "a clone" not in sized.stdout  # a template of another size is not used
    finally:
        for name in ("warm", "cold", "sized"):
            mvmctl("down", name, "--force")
        mvmctl("snapshot", "rm", "snapsrc-template")


# -- pause -------------------------------------------------------------------------------------------


def test_pause_freezes_the_guest(mvmctl: Mvmctl, source: str) -> None:
    """The guest's own clock and its counter stand still while it is paused."""
    def uptime_and_counter() -> tuple[float, int]:
        out = sh(mvmctl, source, "cut -d' ' -f1 /proc/uptime; cat /tmp/counter").split()
        return float(out[0]), int(out[1])

    uptime0, count0 = uptime_and_counter()
    mvmctl("pause", source, check=True)
    paused_at = time.monotonic()
    refused = mvmctl("exec", source, "--", "true")
    assert refused.returncode != 0 and "paused" in refused.stderr
    while time.monotonic() - paused_at < 3.0:  # the interval measured, not a wait for a start
        time.sleep(0.1)
    mvmctl("resume", source, check=True)
    host_elapsed = time.monotonic() - paused_at
    uptime1, count1 = uptime_and_counter()
    assert uptime1 - uptime0 < host_elapsed - 2.0, (uptime0, uptime1, host_elapsed)
    assert count1 - count0 < 15, (count0, count1)  # ~3 s running would be ~30 ticks
    counter_advances(mvmctl, source)


def test_pause_to_disk_frees_the_vm_and_resume_brings_its_processes_back(mvmctl: Mvmctl, workload: Path) -> None:
    mvmctl("up", str(workload), "--name", "sleeper", "--cold", check=True)
    try:
        sh(mvmctl, "sleeper", "echo kept > /tmp/suspend-marker")
        machine_id = sh(mvmctl, "sleeper", "cat /etc/machine-id 2>/dev/null; true").strip()
        proc = mvmctl("pause", "sleeper", "--to-disk", check=True)
        assert "suspended to disk" in proc.stdout
        vm = listed(mvmctl)["sleeper"]
        assert vm["state"] == "stopped" and vm["state_detail"] == "suspended (on disk)" and vm["suspended"]
        assert not qemu_of_vm(mvmctl.home, "sleeper")  # its QEMU and its memory are gone...
        record = json.loads((mvmctl.home / "vms" / "sleeper" / "record.json").read_text())
        assert record["supervisor_pid"] and _gone(record["supervisor_pid"])  # ...and its supervisor
        assert not [p for p in Path("/dev/shm").glob("mvm-ram-*") if _ram_file_of(p, mvmctl, "sleeper")]
        refused = mvmctl("up", "--snapshot", vm["suspended"], "--name", "sleeper")
        assert refused.returncode == 2 and "is suspended to disk" in refused.stderr
        pruned = json.loads(mvmctl("prune", "--json", check=True).stdout)  # a suspended VM is not litter
        assert not [r for r in pruned["removed"] if r["name"].startswith(("sleeper", vm["suspended"]))]
        assert snapshot_dir(mvmctl, vm["suspended"]).is_dir()
        mvmctl("resume", "sleeper", check=True)
        assert sh(mvmctl, "sleeper", "cat /tmp/suspend-marker").strip() == "kept"
        assert sh(mvmctl, "sleeper", "hostname").strip() == "sleeper"
        assert sh(mvmctl, "sleeper", "cat /etc/machine-id 2>/dev/null; true").strip() == machine_id
        counter_advances(mvmctl, "sleeper")
    finally:
        mvmctl("down", "sleeper", "--force")
    assert not [r for r in json.loads(mvmctl("snapshot", "ls", "--json").stdout)
                if r.get("source_vm") == "sleeper" and r.get("purpose") == "suspend" and r["clones"]]


def test_a_suspended_clone_outlives_a_failed_resume_and_comes_back_with_its_forward(
        mvmctl: Mvmctl, source: str, workload: Path) -> None:
    """`pause --to-disk` of a clone marks it suspended (its supervisor's last save of the record
    once raced that mark); neither `up` of its name nor `snapshot rm` of its save may take it;
    a resume that fails (its forward's port is taken) leaves it suspended; the next one brings
    it back, forward and all."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mvmctl("up", "--snapshot", "base", "--name", "susp", "-p", f"127.0.0.1:{port}:8000", check=True)
    try:
        sh(mvmctl, "susp", "echo kept > /tmp/suspend-marker")
        mvmctl("pause", "susp", "--to-disk", check=True)
        save = listed(mvmctl)["susp"]["suspended"]
        assert listed(mvmctl)["susp"]["state_detail"] == "suspended (on disk)" and save
        taken = mvmctl("up", str(workload), "--name", "susp", "--cold")
        assert taken.returncode == 2 and "is suspended to disk" in taken.stderr, taken.stderr
        kept = mvmctl("snapshot", "rm", save)
        assert kept.returncode == 2 and "suspended to disk" in kept.stderr, kept.stderr
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            failed = mvmctl("resume", "susp")
            assert failed.returncode != 0, failed.stdout
        assert listed(mvmctl)["susp"]["suspended"] == save and snapshot_dir(mvmctl, save).is_dir()
        assert not qemu_of_vm(mvmctl.home, "susp")
        mvmctl("resume", "susp", check=True)
        assert sh(mvmctl, "susp", "cat /tmp/suspend-marker").strip() == "kept"
        assert f"127.0.0.1:{port}" in mvmctl("forward", "ls", "susp", check=True).stdout
    finally:
        mvmctl("down", "susp", "--force")


def test_kill9_of_resume_leaves_the_vm_suspended(mvmctl: Mvmctl, source: str) -> None:
    """A resume killed once its QEMU runs: the suspended VM's directory was only set aside, and
    its supervisor, never told to keep the new start, puts it back."""
    mvmctl("up", "--snapshot", "base", "--name", "k9r", check=True)
    try:
        mvmctl("pause", "k9r", "--to-disk", check=True)
        save = listed(mvmctl)["k9r"]["suspended"]
        resume = subprocess.Popen(mvmctl.argv("resume", "k9r"), env=mvmctl.env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_signals)
        deadline = time.monotonic() + WAIT_S
        while not qemu_of_vm(mvmctl.home, "k9r"):
            assert resume.poll() is None and time.monotonic() < deadline, resume.communicate()
            time.sleep(0.002)
        resume.send_signal(signal.SIGKILL)
        resume.communicate()
        while qemu_of_vm(mvmctl.home, "k9r") or listed(mvmctl).get("k9r", {}).get("suspended") != save:
            assert time.monotonic() < deadline, listed(mvmctl).get("k9r")
            time.sleep(0.05)
        assert not [p for p in (mvmctl.home / "vms").glob(".k9r.*") if p.name != ".k9r.lock"]  # (the name's lock)
        mvmctl("resume", "k9r", check=True)
        counter_advances(mvmctl, "k9r")
    finally:
        mvmctl("down", "k9r", "--force")


def test_ctrl_c_during_pause_to_disk_waits_for_the_save(mvmctl: Mvmctl, source: str) -> None:
    """Once the VM is told to stop, its save is all there is of it: a Ctrl-C in the middle is
    held until the save is committed and the VM marked suspended, then ends the command."""
    mvmctl("up", "--snapshot", "base", "--name", "intr", check=True)
    try:
        pause = subprocess.Popen(mvmctl.argv("pause", "intr", "--to-disk"), env=mvmctl.env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_signals)
        deadline = time.monotonic() + WAIT_S
        while not list((mvmctl.home / "snapshots").glob(".suspend-intr-*.staging-*/state")):
            assert pause.poll() is None and time.monotonic() < deadline, pause.communicate()
            time.sleep(0.005)
        pause.send_signal(signal.SIGINT)
        _, err = pause.communicate(timeout=WAIT_S)
        assert pause.returncode == 130, err
        vm = listed(mvmctl)["intr"]
        assert vm["state_detail"] == "suspended (on disk)" and snapshot_dir(mvmctl, vm["suspended"]).is_dir()
        mvmctl("resume", "intr", check=True)
        counter_advances(mvmctl, "intr")
    finally:
        mvmctl("down", "intr", "--force")


def test_a_clone_runs_with_the_network_its_source_ran_with(mvmctl: Mvmctl, workload: Path) -> None:
    """The image says no network; its VM was started `--network open`, so its saved devices
    include a NIC: the clone runs open too (before, its restore failed on the missing NIC)."""
    mvmctl("up", str(workload), "--name", "opened", "--cold", "--network", "open", check=True)
    try:
        mvmctl("snapshot", "create", "opened", "--tag", "opened", check=True)
        mvmctl("up", "--snapshot", "opened", "--name", "opened-copy", check=True)
        record = json.loads((mvmctl.home / "vms" / "opened-copy" / "record.json").read_text())
        assert record["network"] == "open"
        assert "eth0" in sh(mvmctl, "opened-copy", "ls /sys/class/net")
    finally:
        for name in ("opened-copy", "opened"):
            mvmctl("down", name, "--force")
        mvmctl("snapshot", "rm", "opened")


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by whoever adopted it counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _ram_file_of(path: Path, ctl: Mvmctl, name: str) -> bool:
    from mvm.core.state import VmPaths
    from mvm.runtime.backends.qemu import ram_path

    return path == ram_path(VmPaths(ctl.home / "vms" / name))


# -- kill -9 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["at-once", "registered", "qemu-running"])
def test_kill9_of_up_snapshot_leaves_nothing_behind(mvmctl: Mvmctl, source: str, point: str) -> None:
    name = f"k9-{point}"
    up = subprocess.Popen(mvmctl.argv("up", "--snapshot", "base", "--name", name), env=mvmctl.env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=default_signals)
    vms = mvmctl.home / "vms"
    deadline = time.monotonic() + WAIT_S
    while point != "at-once" and up.poll() is None and time.monotonic() < deadline:
        if point == "registered" and (any(vms.glob(f".{name}.starting-*")) or (vms / name).exists()):
            break
        if point == "qemu-running" and qemu_of_vm(mvmctl.home, name):
            break
        time.sleep(0.002)
    up.send_signal(signal.SIGKILL)
    up.communicate()
    deadline = time.monotonic() + WAIT_S
    while not nothing_left_of(mvmctl, name):
        assert time.monotonic() < deadline, f"{name} left {listed(mvmctl).get(name)} {qemu_of_vm(mvmctl.home, name)}"
        time.sleep(0.05)
    mvmctl("down", name, "--force")
    assert not (vms / name).exists()
