"""Bad input on every verb, and damaged files under $MVM_HOME: one line on stderr that names
the thing and the fix, exit 2 for usage and 1 for what went wrong at run time, no traceback,
and nothing on disk changed. The real CLI runs in a subprocess against a private home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvm.core.state import VmPaths, VmRecord

BAD = [
    # (argv, exit status, a word the line must hold)
    (["nosuch"], 2, "No such command"),
    (["up", "--cpus", "x"], 2, "--cpus"),
    (["up", "/no/such/dir"], 2, "mvm.toml"),
    (["up", ".", "--memory", "lots"], 2, "--memory"),
    (["up", ".", "--cpus", "0"], 2, "--cpus"),
    (["up", ".", "-p", "99999:1"], 2, "port forward"),
    (["up", ".", "--hypervisor", "vmware"], 2, "--hypervisor"),
    (["run", ".", "--name", "Bad Name!"], 2, "mvm.toml"),
    (["run", "--attached", "--detach"], 2, "contradict"),
    (["run", "--json"], 2, "--dry-run"),
    (["run", "--"], 2, "nothing follows --"),
    (["run", "--", "echo", "x" * 3000], 2, "limit of the kernel command line"),
    (["build", "a", "--flake", "b"], 2, "two project directories"),
    (["up", "--flake", "/no/such/dir"], 2, "mvm.toml"),
    (["forward", "nosuchvm"], 2, "needs a port"),
    (["build", ".", "--mem", "-5G"], 2, "mvm.toml"),
    (["validate", "/no/such/dir"], 2, "mvm.toml"),
    (["status", "nosuchvm"], 2, "no VM named nosuchvm"),
    (["status", "../../etc"], 2, "not allowed"),
    (["status"], 2, "Missing argument"),
    (["down", "nosuchvm"], 2, "no VM named"),
    (["down", "x", "--timeout", "inf"], 2, "--timeout"),
    (["down", "x", "--timeout", "nan"], 2, "--timeout"),
    (["wait", "nosuchvm"], 2, "no VM named"),
    (["logs", "nosuchvm"], 2, "no VM named"),
    (["boot-report", "nosuchvm"], 2, "no VM named"),
    (["perf", "boot", "/no/such/dir", "--runs", "0"], 2, "--runs 0: must be 1 to 1000"),
    (["perf", "boot", "/no/such/dir", "--p50-ms", "0"], 2, "a budget is at least 1 ms"),
    (["perf", "boot", "/no/such/dir"], 2, "mvm.toml"),
    (["pause", "nosuchvm"], 2, "no VM named"),
    (["resume", "nosuchvm"], 2, "no VM named"),
    (["snapshot", "create", "nosuchvm"], 2, "no VM named"),
    (["snapshot", "create", "nosuchvm", "--tag", "Bad/Tag"], 2, "snapshot tag 'Bad/Tag' is not allowed"),
    (["snapshot", "rm", "nosuch"], 1, "there is no snapshot nosuch"),
    (["snapshot", "inspect", "nosuch"], 1, "there is no snapshot nosuch"),
    (["up", "--snapshot", "nosuch", "--name", "x"], 1, "there is no snapshot nosuch"),
    (["up", "--snapshot", "nosuch"], 2, "--snapshot needs --name"),
    (["fork", "nosuchvm"], 2, "no VM named"),
    (["fork", "nosuchvm", "--count", "0"], 2, "--count 0 is out of range"),
    (["detach", "nosuchvm"], 2, "no VM named"),
    (["forward", "nosuchvm", "8080"], 2, "port forward"),
    (["exec", "nosuchvm", "--", "true"], 2, "no VM named"),
    (["exec", "nosuchvm", "--timeout", "inf", "--", "true"], 2, "--timeout"),
    (["exec", "nosuchvm", "--env", "NOEQUALS", "--", "true"], 2, "--env"),
    (["exec", "BAD NAME", "--", "true"], 2, "not allowed"),
    (["console", "nosuchvm"], 2, "no VM named"),
    (["cp", "a", "b"], 2, "exactly one side"),
    (["cp", "vm:relative", "."], 2, "must be absolute"),
    (["cp", "nosuchvm:/etc/x", "/no/such/dir/x"], 2, "does not exist"),
    (["fs", "nosuchvm", "ls", "relative"], 2, "must be absolute"),
    (["fs", "nosuchvm", "chmod", "/x"], 2, "chmod"),
    (["stopped", "exec"], 2, "No such command"),
    (["exec", "stopped", "--", "true"], 1, "stopped"),
    (["status", "damaged"], 1, "damaged"),
    (["down", "damaged"], 1, "--force"),
    (["exec", "damaged", "--", "true"], 1, "damaged"),
]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: what 'nothing changed' compares."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def mvmctl(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mvm.cli.main", *args], env={**os.environ, "MVM_HOME": str(home)},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=cwd)


def stopped_record(home: Path, name: str) -> VmPaths:
    paths = VmPaths(home / "vms" / name)
    paths.dir.mkdir(parents=True)
    VmRecord(name=name, artifact_key="k" * 64, artifact_name="w", backend="qemu", accel="tcg", mode="detached",
             vcpus=1, memory_mib=128, accessible=False, sealed=True, uids={"agent": 990, "entrypoint": 1000},
             state="stopped", stop_reason="its entrypoint exited with status 0", exit_status=0,
             backend_released=True).save(paths)
    return paths


@pytest.fixture
def home(tmp_path: Path) -> Path:
    root = tmp_path / "home"
    stopped_record(root, "stopped")
    damaged = root / "vms" / "damaged"
    damaged.mkdir(parents=True)
    (damaged / "record.json").write_text("[]")
    return root


@pytest.mark.parametrize(("argv", "status", "word"), BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_is_one_line_and_changes_nothing(home: Path, tmp_path: Path, argv: list[str], status: int,
                                                   word: str) -> None:
    workdir = tmp_path / "work"  # an empty directory: no mvm.toml in it
    workdir.mkdir()
    before = tree(home)
    proc = mvmctl(home, *argv, cwd=workdir)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mvmctl: error: "), proc.stderr
    assert word in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert tree(home) == before
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("content", ["[]", "{", "", '{"name": "broken"}', '"text"', "\x00\xff",
                                     '{"name": 7, "state": "running"}'])
def test_a_damaged_record_is_one_line_in_ls_and_down_force_removes_it(tmp_path: Path, content: str) -> None:
    home = tmp_path / "home"
    stopped_record(home, "good")
    broken = home / "vms" / "broken"
    broken.mkdir(parents=True)
    (broken / "record.json").write_bytes(content.encode("latin-1"))
    listing = mvmctl(home, "ls", "--json")
    assert listing.returncode == 0, listing.stderr
    vms = {vm["name"]: vm for vm in json.loads(listing.stdout)}
    assert vms["good"]["state"] == "stopped" and vms["broken"]["state"] == "damaged" and vms["broken"]["why"]
    table = mvmctl(home, "ls")
    assert table.returncode == 0 and "broken" in table.stdout and "damaged" in table.stdout and "good" in table.stdout
    status = mvmctl(home, "status", "broken")
    assert status.returncode == 1 and status.stderr.count("\n") == 1 and "down --force broken" in status.stderr
    assert mvmctl(home, "down", "broken").returncode == 1 and broken.exists()
    removed = mvmctl(home, "down", "--force", "broken")
    assert removed.returncode == 0, removed.stderr
    assert not broken.exists() and (home / "vms" / "good").exists()


def test_a_record_of_an_unknown_backend_or_another_name_is_damaged(tmp_path: Path) -> None:
    home = tmp_path / "home"
    paths = stopped_record(home, "odd")
    data = json.loads(paths.record.read_text())
    paths.record.write_text(json.dumps({**data, "backend": "vmware"}))
    other = stopped_record(home, "renamed")
    other.record.write_text(json.dumps({**json.loads(other.record.read_text()), "name": "../../etc"}))
    vms = {vm["name"]: vm for vm in json.loads(mvmctl(home, "ls", "--json").stdout)}
    assert vms["odd"]["state"] == vms["renamed"]["state"] == "damaged"
    assert "vmware" in vms["odd"]["why"] and "../../etc" in vms["renamed"]["why"]
