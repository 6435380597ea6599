"""A named VM's data disk survives `down` and `up` of the same name (QEMU: an ext4 image;
Docker: a directory), goes with `down --purge`, and a failed `up` leaves none behind."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

WITH_DISK = """
    name = "{name}"
    data_disk = "16M"
    [entrypoint]
    command = ["/bin/sleep", "600"]
"""


@pytest.fixture(scope="module", params=["qemu", "docker"])
def ctl(request: pytest.FixtureRequest) -> Mvmctl:
    base = request.getfixturevalue("mvmctl" if request.param == "qemu" else "docker_mvmctl")
    return base.with_backend(request.param)


def kept(ctl: Mvmctl, name: str) -> Path:
    return ctl.home / "disks" / (f"{name}.d" if ctl.hypervisor == "docker" else f"{name}.ext4")


def test_data_survives_down_and_up_and_goes_with_purge(ctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir(WITH_DISK.format(name="keeper"), name="keeper")
    ctl("up", str(directory), check=True)
    try:
        ctl("exec", "keeper", "--", "/bin/sh", "-c", "echo precious > /data/keep.txt && sync", check=True)
        assert f"data disk   {kept(ctl, 'keeper')}" in ctl("status", "keeper", check=True).stdout
    finally:
        ctl("down", "keeper", check=True)
    assert not (ctl.home / "vms" / "keeper").exists()
    assert kept(ctl, "keeper").exists()

    up = ctl("up", str(directory), check=True)
    assert "reattached VM keeper's data disk" in up.stderr
    try:
        assert ctl("exec", "keeper", "--", "cat", "/data/keep.txt", check=True).stdout == "precious\n"
    finally:
        proc = ctl("down", "keeper", "--purge", check=True)
    assert "data disk is removed" in proc.stdout
    assert not kept(ctl, "keeper").exists()

    ctl("up", str(directory), check=True)  # a fresh, empty disk now
    try:
        assert ctl("exec", "keeper", "--", "ls", "-A", "/data", check=True).stdout.split() in ([], ["lost+found"])
    finally:
        ctl("down", "keeper", "--purge", check=True)
    gone = ctl("down", "keeper", "--purge")
    assert gone.returncode == 2 and "no VM named keeper" in gone.stderr


def test_a_failed_up_leaves_no_new_disk(ctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir(WITH_DISK.format(name="nodisk"), name="nodisk")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proc = ctl("up", str(directory), "-p", f"{taken.getsockname()[1]}:80")
    assert proc.returncode == 1 and "another program listens there" in proc.stderr
    deadline = time.monotonic() + 60
    while (ctl.home / "vms" / "nodisk").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not kept(ctl, "nodisk").exists() and not (ctl.home / "vms" / "nodisk").exists()
