"""`mvmctl build` for real: apt resolution, the lock, the store, reproducibility, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, Mvmctl, default_signals

pytestmark = pytest.mark.vm


def build_json(mvmctl: Mvmctl, directory: Path, *extra: str) -> dict:
    proc = mvmctl("build", str(directory), "--json", *extra, check=True)
    return json.loads(proc.stdout)


def staging_left(home: Path) -> list[Path]:
    return list((home / "store").glob(".staging-*"))


def test_build_hello_writes_artifact_with_metadata(mvmctl: Mvmctl, mvm_home: Path, tmp_path: Path) -> None:
    """Debian's kernel, with its initramfs (ours: test_own_kernel.py)."""
    directory = tmp_path / "hello"
    directory.mkdir()
    (directory / "mvm.toml").write_text((EXAMPLES / "hello" / "mvm.toml").read_text())
    record = build_json(mvmctl, directory, "--kernel", "debian")
    assert record["kernel"]["name"] == "debian"
    path = Path(record["path"])
    for name in ("vmlinux", "initrd.cpio", "rootfs.ext4", "artifact.json"):
        assert (path / name).is_file(), name
    assert record["sealed"] is True and record["accessible"] is False
    assert record["entrypointKind"] == "command"
    assert record["uids"] == {"agent": 990, "entrypoint": 1000}
    assert record["rootlessEntrypoint"] is True
    assert record["agentBinary"] == "real"
    assert record["expectedBootMs"] > 0
    assert (path / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    from mvm.core.digest import sha256_file
    assert record["hashes"]["rootfs"] == sha256_file(path / "rootfs.ext4")
    assert record["hashes"]["vmlinux"] == sha256_file(path / "vmlinux")

    lock = tomllib.loads((directory / "mvm.lock").read_text())
    names = {p["name"] for p in lock["packages"]}
    assert {"busybox-static", "python3-minimal", "libpython3.11-stdlib", "python3.11-minimal", "libc6"} <= names
    for package in lock["packages"] + lock["setpriv"] + [lock["kernel"]]:
        assert len(package["sha256"]) == 64 and package["version"]
    assert lock["kernel"]["name"].startswith("linux-image-") and lock["kernel"]["name"].endswith("-cloud-amd64")


def test_second_build_is_a_cache_hit_and_no_cache_is_byte_identical(
        mvmctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir("""
        name = "repro"
        [entrypoint]
        command = ["/bin/true"]
        [extra_files."/etc/greeting"]
        content = "hi"
        mode = "0600"
    """)
    first = build_json(mvmctl, directory)
    assert first["cacheHit"] is False
    second = build_json(mvmctl, directory)
    assert second["cacheHit"] is True
    assert second["key"] == first["key"]
    forced = build_json(mvmctl, directory, "--no-cache")
    again = build_json(mvmctl, directory, "--no-cache")
    assert forced["cacheHit"] is False and again["cacheHit"] is False
    assert forced["hashes"]["rootfs"] == again["hashes"]["rootfs"] == first["hashes"]["rootfs"]
    assert forced["hashes"]["initrd"] == first["hashes"]["initrd"]


CHECK_PYC = """
import importlib.util, json, marshal, subprocess, sys
sys.path.insert(0, "/usr/lib/mvm")
import agent.session, mvm.core.protocol
for module in (json, subprocess, mvm.core.protocol, agent.session):
    cached = module.__spec__.cached
    with open(cached, "rb") as f:
        data = f.read()
    flags = int.from_bytes(data[4:8], "little")
    code = marshal.loads(data[16:])
    print("pyc", module.__name__, data[:4] == importlib.util.MAGIC_NUMBER, flags, code.co_filename == module.__file__,
          code.co_filename)
"""


def test_guest_python_loads_precompiled_bytecode(mvmctl: Mvmctl, workload_dir) -> None:
    """The stdlib and mvm's guest modules ship unchecked-hash pycs the guest's python3 loads as they are.

    Debian's .debs have no .pyc; without the build's compile step the entrypoint (uid 1000, a
    root-owned tree) could neither find nor write one, and `-v` would say `code object from
    .../json/__init__.py`.
    """
    directory = workload_dir(f"""
        name = "pyc"
        [entrypoint]
        command = ["/bin/sh", "-c", "python3 /opt/check_pyc.py; python3 -v -c 'import json' 2>&1 | grep 'code object from .*json/'"]
        [extra_files."/opt/check_pyc.py"]
        content = '''{CHECK_PYC}'''
    """)
    proc = mvmctl("run", "--attached", str(directory))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # Magic of the guest's own interpreter, flags 0b01 (hash-based, source not checked), guest paths.
    assert "pyc json True 1 True /usr/lib/python3.11/json/__init__.py" in out, out
    assert "pyc subprocess True 1 True /usr/lib/python3.11/subprocess.py" in out, out
    assert "pyc mvm.core.protocol True 1 True /usr/lib/mvm/mvm/core/protocol.py" in out, out
    assert "pyc agent.session True 1 True /usr/lib/mvm/agent/session.py" in out, out
    assert "code object from '/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc'" in out, out
    assert "code object from /usr/lib/python3.11/json/__init__.py" not in out, out


def test_build_with_lock_needs_no_apt(mvmctl: Mvmctl, workload_dir, tmp_path: Path) -> None:
    """With mvm.lock and a warm cache, the build never asks apt: hide apt and it still works."""
    directory = workload_dir("""
        name = "locked"
        [entrypoint]
        command = ["/bin/echo", "locked"]
    """)
    build_json(mvmctl, directory)
    lock_before = (directory / "mvm.lock").read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dpkg-deb", "mkfs.ext4", "debugfs", "dumpe2fs", "e2fsck", "cpio", "lz4", "tar", "qemu-img"):
        for prefix in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"):
            if os.path.exists(f"{prefix}/{tool}"):
                (bin_dir / tool).symlink_to(f"{prefix}/{tool}")
                break
    env = {**mvmctl.env, "PATH": str(bin_dir)}
    proc = subprocess.run(mvmctl.argv("build", str(directory), "--no-cache", "--json"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (directory / "mvm.lock").read_text() == lock_before


def test_unknown_package_fails_clearly_and_keeps_previous_artifact(mvmctl: Mvmctl, mvm_home: Path,
                                                                   workload_dir) -> None:
    directory = workload_dir("""
        name = "keeper"
        [entrypoint]
        command = ["/bin/true"]
    """)
    good = build_json(mvmctl, directory)
    ref = (mvm_home / "store" / "refs" / "keeper").read_text()
    lock = (directory / "mvm.lock").read_text()
    toml = (directory / "mvm.toml").read_text()
    (directory / "mvm.toml").write_text(toml.replace('name = "keeper"', 'name = "keeper"\npackages = ["no-such-package-mvm"]'))
    proc = mvmctl("build", str(directory))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "resolve" in lines[0] and "no-such-package-mvm" in lines[0]
    assert (mvm_home / "store" / "refs" / "keeper").read_text() == ref
    assert (Path(good["path"]) / "rootfs.ext4").is_file()
    assert (directory / "mvm.lock").read_text() == lock
    assert staging_left(mvm_home) == []


def test_interrupted_build_leaves_no_partial_files(mvmctl: Mvmctl, mvm_home: Path, workload_dir) -> None:
    directory = workload_dir("""
        name = "interrupted"
        [entrypoint]
        command = ["/bin/true"]
    """)
    build_json(mvmctl, directory)
    ref = (mvm_home / "store" / "refs" / "interrupted").read_text()
    keys_before = sorted(p.name for p in (mvm_home / "store").iterdir())
    proc = subprocess.Popen(mvmctl.argv("build", str(directory), "--no-cache"), env=mvmctl.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    deadline = time.monotonic() + 60
    while not staging_left(mvm_home) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    # Staging exists only while the build runs (it is removed or renamed at its end), and the
    # process has not exited: the signal lands in a build that is provably still going.
    assert staging_left(mvm_home) and proc.poll() is None, "the build never started staging"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert staging_left(mvm_home) == []
    assert sorted(p.name for p in (mvm_home / "store").iterdir()) == keys_before
    assert (mvm_home / "store" / "refs" / "interrupted").read_text() == ref


def test_disk_full_fails_at_a_named_step(mvmctl: Mvmctl, mvm_home: Path, workload_dir, tmp_path: Path) -> None:
    """A store on a tiny filesystem: the build fails with one line and leaves nothing behind."""
    home = tmp_path / "small-home"
    (home / "store").mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(home / "store")],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        (home / "cache").symlink_to(mvm_home / "cache")  # share the warm package cache
        directory = workload_dir("""
            name = "full"
            [entrypoint]
            command = ["/bin/true"]
        """)
        proc = subprocess.run(mvmctl.argv("build", str(directory)), env={**mvmctl.env, "MVM_HOME": str(home)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "build failed at" in lines[0] and "space" in lines[0]
        assert staging_left(home) == []
        assert not (home / "store" / "refs" / "full").exists()
        assert not (directory / "mvm.lock").exists()
    finally:
        subprocess.run(["umount", str(home / "store")], check=False)


def test_up_of_an_unchanged_workload_finds_its_image_by_stamp(mvmctl: Mvmctl, mvm_home: Path, workload_dir) -> None:
    """After a build, `up` needs neither the manifest parser nor pydantic (they are blocked here);
    a build with overrides does not move the stamp; an edit to mvm.toml is built, not missed."""
    directory = workload_dir("""
        name = "stamped"
        memory_mib = 256
        [entrypoint]
        command = ["/bin/sh", "-c", "while :; do sleep 3600; done"]
    """)
    default_key = build_json(mvmctl, directory)["key"]
    assert default_key in {p.read_text().strip() for p in (mvm_home / "store" / "stamps").iterdir()}
    assert build_json(mvmctl, directory, "--mem", "320M")["key"] != default_key
    blocked = ("import runpy, sys; sys.modules['pydantic'] = None; sys.argv[0] = 'mvmctl'; "
               "runpy.run_module('mvm.cli.main', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", blocked, "up", str(directory), "--name", "stamp1"],
                          env=mvmctl.env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    try:
        assert proc.returncode == 0, proc.stderr
        status = json.loads(mvmctl("status", "stamp1", "--json", check=True).stdout)
        assert (status["artifact_key"], status["memory_mib"]) == (default_key, 256)
    finally:
        mvmctl("down", "--force", "stamp1")
    (directory / "mvm.toml").write_text((directory / "mvm.toml").read_text().replace("256", "288"))
    mvmctl("up", str(directory), "--name", "stamp2", check=True)
    try:
        status = json.loads(mvmctl("status", "stamp2", "--json", check=True).stdout)
        assert status["artifact_key"] != default_key and status["memory_mib"] == 288
    finally:
        mvmctl("down", "--force", "stamp2")
