"""An aarch64 guest on this x86_64 host: built from Debian's arm64 packages and cloud kernel,
booted under qemu-system-aarch64 -M virt with TCG, driven by the same /init and agent;
snapshotted and cloned like an x86 one; refused, with the reason, where it cannot run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import Mvmctl
from tests.integration.test_boot import qemu_of_vm

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                       reason="qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)"),
]

ARM = """
name = "armguest"
arch = "aarch64"
[entrypoint]
shell = "/bin/sh"
"""


@pytest.fixture(scope="module")
def arm_image(mvmctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("armguest")
    (directory / "mvm.toml").write_text(ARM)
    proc = mvmctl("build", str(directory), "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr
    return directory, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def arm_vm(mvmctl: Mvmctl, arm_image: tuple[Path, dict]):
    directory, _ = arm_image
    proc = mvmctl("up", str(directory), check=True)
    assert "aarch64" in proc.stdout
    yield "armguest"
    mvmctl("down", "armguest", "--force")


def test_the_image_is_made_of_arm64_packages_and_kernel(arm_image: tuple[Path, dict]) -> None:
    directory, record = arm_image
    artifact = Path(record["path"])
    assert record["workload"]["arch"] == "aarch64"
    assert record["kernelRelease"].endswith("-cloud-arm64")
    assert record["bootBudgetMs"].keys() == {"tcg"}  # never KVM: another architecture
    assert record["expectedBootMs"] == record["bootBudgetMs"]["tcg"]
    assert all(p["arch"] in ("arm64", "all") for p in record["packages"])
    # The kernel is a plain arm64 Image (QEMU's -kernel boots it as it is).
    assert (artifact / "vmlinux").read_bytes()[0x38:0x3C] == b"ARM\x64"
    lock = (directory / "mvm.lock").read_text()
    assert 'arch = "aarch64"' in lock and "_arm64.deb" in lock and "_amd64.deb" not in lock


def test_boot_exec_and_cp_on_an_aarch64_guest(mvmctl: Mvmctl, arm_vm: str, tmp_path: Path) -> None:
    out = mvmctl("exec", arm_vm, "--", "sh", "-c",
                 "uname -m; python3 -c 'import platform; print(platform.machine())'; cat /proc/cmdline",
                 check=True).stdout.splitlines()
    assert out[:2] == ["aarch64", "aarch64"]
    assert "console=ttyAMA0" in out[2] and "tsc_early_khz" not in out[2]
    data = bytes(range(256)) * 700 + b"tail"
    (tmp_path / "in.bin").write_bytes(data)
    mvmctl("cp", str(tmp_path / "in.bin"), f"{arm_vm}:/tmp/in.bin", check=True)
    assert mvmctl("exec", arm_vm, "--", "sha256sum", "/tmp/in.bin", check=True).stdout.split()[0] == \
        __import__("hashlib").sha256(data).hexdigest()
    mvmctl("cp", f"{arm_vm}:/tmp/in.bin", str(tmp_path / "back.bin"), check=True)
    assert (tmp_path / "back.bin").read_bytes() == data
    # The process is the aarch64 emulator on the virt machine with the PL011 console.
    [qemu] = qemu_of_vm(mvmctl.home, arm_vm)
    argv = qemu.info["cmdline"]
    assert argv[0].endswith("qemu-system-aarch64") and argv[argv.index("-M") + 1].startswith("virt")
    assert argv[argv.index("-accel") + 1] == "tcg" and "-sandbox" in argv


def test_status_and_ls_show_the_guest_architecture(mvmctl: Mvmctl, arm_vm: str) -> None:
    [row] = [vm for vm in json.loads(mvmctl("ls", "--json", check=True).stdout) if vm["name"] == arm_vm]
    assert row["arch"] == "aarch64" and row["accel"] == "tcg"
    assert "aarch64" in mvmctl("ls", check=True).stdout
    assert "aarch64" in mvmctl("status", arm_vm, check=True).stdout
    assert json.loads(mvmctl("status", arm_vm, "--json", check=True).stdout)["arch"] == "aarch64"


def test_an_aarch64_guest_snapshots_and_its_clones_get_their_own_identity(mvmctl: Mvmctl, arm_vm: str) -> None:
    mvmctl("exec", arm_vm, "--", "sh", "-c", "echo from-the-template > /tmp/mark", check=True)
    mvmctl("snapshot", "create", arm_vm, "--tag", "armsnap", check=True)
    try:
        for clone in ("armclone1", "armclone2"):
            up = mvmctl("up", "--snapshot", "armsnap", "--name", clone, check=True)
            assert "a clone of snapshot armsnap" in up.stdout and "aarch64" in up.stdout
        seen = []
        for clone in ("armclone1", "armclone2"):
            out = mvmctl("exec", clone, "--", "sh", "-c",
                         "cat /tmp/mark; uname -m; head -c 16 /dev/urandom | od -An -tx1", check=True).stdout.splitlines()
            assert out[:2] == ["from-the-template", "aarch64"]
            seen.append(out[2])
        assert seen[0] != seen[1]  # the CRNG was reseeded in each clone
    finally:
        for clone in ("armclone1", "armclone2"):
            mvmctl("down", clone, "--force")
        mvmctl("snapshot", "rm", "armsnap")


def test_what_cannot_run_an_aarch64_guest_says_why(mvmctl: Mvmctl, arm_vm: str, arm_image) -> None:
    directory, _ = arm_image
    docker = mvmctl("up", str(directory), "--name", "armdocker", "--hypervisor", "docker")
    assert docker.returncode != 0 and "binfmt_misc" in docker.stderr and "Traceback" not in docker.stderr
    assert not (mvmctl.home / "vms" / "armdocker").exists()
    own = mvmctl("build", str(directory), "--kernel", "mvm")
    assert own.returncode != 0 and "no aarch64 configuration" in own.stderr and "Traceback" not in own.stderr
    # The VM is untouched by all that.
    assert mvmctl("exec", arm_vm, "--", "echo", "still-here", check=True).stdout.strip() == "still-here"
