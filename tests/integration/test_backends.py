"""Backend selection and capability refusals, with backends really hidden from the host."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

SLEEPER = """
    name = "{name}"
    [entrypoint]
    command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
"""


def path_without_qemu(tmp_path: Path) -> str:
    """A PATH holding every program of the host's PATH except QEMU's."""
    shadow = tmp_path / "bin-without-qemu"
    shadow.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.listdir(directory):
            target = shadow / entry
            if entry.startswith("qemu-") or target.exists():
                continue
            target.symlink_to(os.path.join(directory, entry))
    return str(shadow)


def run_with(ctl: Mvmctl, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(ctl.argv(*args), env={**ctl.env, **env}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def test_a_named_backend_that_cannot_run_here_is_refused(mvmctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir(SLEEPER.format(name="named"))
    for backend, why in (("apple-container", "needs macOS 26+ on Apple Silicon"),
                         ("firecracker", "not exercised on this host"),
                         ("libkrun", "libkrun")):
        proc = mvmctl("up", str(directory), "--hypervisor", backend)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1 and backend in proc.stderr and why in proc.stderr
    assert not (mvmctl.home / "vms" / "named").exists()


def test_without_qemu_auto_falls_back_to_docker(docker_mvmctl: Mvmctl, workload_dir, tmp_path: Path) -> None:
    directory = workload_dir(SLEEPER.format(name="fallback"))
    docker_mvmctl("build", str(directory), check=True)
    proc = run_with(docker_mvmctl, {"PATH": path_without_qemu(tmp_path)}, "up", str(directory),
                    "--cpus", "2", "--memory", "300M")
    assert proc.returncode == 0, proc.stderr
    assert "reduced isolation" in proc.stderr
    try:
        listing = json.loads(docker_mvmctl("ls", "--json", check=True).stdout)
        assert next(vm for vm in listing if vm["name"] == "fallback")["backend"] == "docker"
        assert docker_mvmctl("exec", "fallback", "--", "true").returncode == 0
        # --cpus and --memory became the container's limits, and it has no network
        container = json.loads((docker_mvmctl.home / "vms" / "fallback" / "record.json").read_text())["backend_id"]
        inspect = subprocess.run(["docker", "inspect", container], env=docker_mvmctl.env, capture_output=True,
                                 text=True, check=True)
        host_config = json.loads(inspect.stdout)[0]["HostConfig"]
        assert host_config["NanoCpus"] == 2_000_000_000 and host_config["Memory"] == 300 * 1024 * 1024
        assert host_config["NetworkMode"] == "none"
    finally:
        docker_mvmctl("down", "fallback")


def test_without_qemu_or_dockerd_the_error_says_why(mvmctl: Mvmctl, workload_dir, tmp_path: Path) -> None:
    directory = workload_dir(SLEEPER.format(name="nowhere"))
    mvmctl("build", str(directory), check=True)
    proc = run_with(mvmctl, {"PATH": path_without_qemu(tmp_path), "DOCKER_HOST": "unix:///nonexistent/docker.sock"},
                    "up", str(directory))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    for part in ("no backend can run a VM here", "qemu-system-x86_64", "dockerd is not running", "firecracker"):
        assert part in proc.stderr
    assert not (mvmctl.home / "vms" / "nowhere").exists()


def test_docker_backend_errors_are_one_line(docker_mvmctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir(SLEEPER.format(name="dockerless"))
    proc = run_with(docker_mvmctl, {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, "up", str(directory),
                    "--hypervisor", "docker")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "dockerd is not running" in proc.stderr


def test_a_docker_import_failure_is_one_clear_error(docker_mvmctl: Mvmctl, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.core.errors import VmError
    from mvm.core.state import MvmHome
    from mvm.runtime.backends import docker

    monkeypatch.setenv("DOCKER_HOST", docker_mvmctl.docker_host or "")
    broken = tmp_path / "rootfs.ext4"
    broken.write_bytes(b"not an ext4 file system" * 100)
    with pytest.raises(VmError) as caught:
        docker.ensure_image(broken, "mvm/broken:test", MvmHome(tmp_path / "home"))
    assert "cannot unpack" in str(caught.value) and str(broken) in str(caught.value)
    assert "\n" not in str(caught.value)
