"""mvm's own kernel (build/kernel_source.py), compiled once per run into the session's
MVM_HOME, and real guests booted with it: no initramfs, every driver built in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Mvmctl
from tests.integration.test_boot import qemu_of_vm

pytestmark = pytest.mark.vm

OWN = """
    name = "ownk"
    kernel = "mvm"
    [entrypoint]
    shell = "/bin/sh"
    [network]
    mode = "open"
"""
BUILD_TIMEOUT_S = 3600  # compiling the kernel: about 5 minutes on two idle cores


@pytest.fixture(scope="module")
def own_image(mvmctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("ownk")
    (directory / "mvm.toml").write_text("\n".join(line.strip() for line in OWN.splitlines()) + "\n")
    proc = mvmctl("build", str(directory), "--json", timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    return directory, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def own_vm(mvmctl: Mvmctl, own_image: tuple[Path, dict]):
    directory, _ = own_image
    mvmctl("up", str(directory), "--cpus", "2", "--memory", "384M", check=True)
    yield "ownk"
    mvmctl("down", "ownk", "--force")


def test_the_image_carries_our_kernel_and_its_config_and_no_initramfs(mvmctl: Mvmctl, own_image) -> None:
    _, record = own_image
    artifact = Path(record["path"])
    assert record["kernelRelease"].endswith("-mvm")
    assert record["kernel"]["name"] == "mvm" and len(record["kernel"]["configDigest"]) == 64
    assert record["hashes"]["initrd"] is None
    assert not (artifact / "initrd.cpio").exists()
    config = (artifact / "kernel.config").read_text()
    assert "CONFIG_VIRTIO_FS=y" in config and "# CONFIG_MODULES is not set" in config
    rows = json.loads(mvmctl("kernel", "ls", "--json", check=True).stdout)
    ours = [r for r in rows if r["kind"] == "mvm" and r["current"]]  # (a seeded cache may hold older ones)
    assert len(ours) == 1 and ours[0]["release"] == record["kernelRelease"]
    assert ours[0]["name"] == record["kernel"]["build"]
    built = json.loads((mvmctl.home / "cache" / "kernels" / ours[0]["name"] / "build.json").read_text())
    assert built["sourceEdits"] == ["arch/x86/mm/init.c", "arch/x86/kernel/apic/apic.c"]  # (x86_64.edits.toml)
    again = json.loads(mvmctl("kernel", "build", "--json", check=True).stdout)
    assert again["cacheHit"] is True and again["name"] == ours[0]["name"]


def test_once_built_ours_is_what_an_mvm_toml_without_kernel_boots(mvmctl: Mvmctl, own_image, workload_dir) -> None:
    _, ours = own_image
    directory = workload_dir("""
        name = "autok"
        [entrypoint]
        command = ["/bin/true"]
    """)
    record = json.loads(mvmctl("build", str(directory), "--json", check=True).stdout)
    assert record["kernel"] == ours["kernel"] and record["hashes"]["initrd"] is None
    assert record["workload"]["kernel"] == "mvm"  # the artifact names what it boots, never "auto"
    plan = json.loads(mvmctl("up", str(directory), "--dry-run", "--json", check=True).stdout)
    assert plan["artifact"]["kernel"] == "mvm"


def test_run_reports_the_guests_exit_status_and_only_its_output(mvmctl: Mvmctl, own_image) -> None:
    directory, _ = own_image
    proc = mvmctl("run", "--attached", str(directory), "--", "sh", "-c", "uname -r; exit 3")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip().endswith("-mvm")
    assert "Power down" not in proc.stdout and "mvm-boot:" not in proc.stdout


def test_exec_cp_sizes_network_and_boot_phases_with_our_kernel(mvmctl: Mvmctl, own_vm: str, tmp_path: Path) -> None:
    out = mvmctl("exec", own_vm, "--", "sh", "-c", "nproc; grep MemTotal /proc/meminfo; cat /proc/cmdline; "
                 "ip -4 addr show eth0; ls /sys/module | grep -c . || true", check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "2"
    mem_kib = int(lines[1].split()[1])
    assert 300 * 1024 < mem_kib <= 384 * 1024
    assert "root=/dev/vda" in out and "10.0.2.15/24" in out  # virtio_net is built in
    assert "lapic_timer_period=4000000" in out  # told its APIC timer's period: no calibration wait
    # no device the guest was not given (an IPv6 kernel's default sit0 tunnel was one)
    assert mvmctl("exec", own_vm, "--", "ls", "/sys/class/net", check=True).stdout.split() == ["eth0", "lo"]
    (tmp_path / "in.bin").write_bytes(bytes(range(256)) * 512)
    mvmctl("cp", str(tmp_path / "in.bin"), f"{own_vm}:/tmp/in.bin", check=True)
    mvmctl("cp", f"{own_vm}:/tmp/in.bin", str(tmp_path / "back.bin"), check=True)
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "in.bin").read_bytes()
    status = json.loads(mvmctl("status", own_vm, "--json", check=True).stdout)
    phases = [m["phase"] for m in status["markers"]]
    assert "initramfs" not in phases and "root-mounted" not in phases
    order = [p for p in ("init", "agent-started", "agent-ready", "entrypoint") if p in phases]
    assert order[:3] == ["init", "agent-started", "agent-ready"], phases
    ms = {m["phase"]: m["ms"] for m in status["markers"]}
    assert ms["init"] <= ms["agent-started"] <= ms["agent-ready"]
    assert qemu_of_vm(mvmctl.home, own_vm)
    assert "-initrd" not in " ".join(qemu_of_vm(mvmctl.home, own_vm)[0].info["cmdline"])


def test_clones_of_a_snapshot_with_our_kernel_get_their_own_identity(mvmctl: Mvmctl, own_vm: str) -> None:
    mvmctl("snapshot", "create", own_vm, "--tag", "ownk-snap", check=True)
    try:
        seen = []
        for clone in ("ownk-c1", "ownk-c2"):
            mvmctl("up", "--snapshot", "ownk-snap", "--name", clone, check=True)
            out = mvmctl("exec", clone, "--", "sh", "-c", "cat /etc/machine-id /proc/sys/kernel/random/uuid; "
                         "uname -r", check=True).stdout.split()
            assert out[2].endswith("-mvm")
            seen.append(tuple(out[:2]))
        assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]
    finally:
        mvmctl("down", "ownk-c1", "--force")
        mvmctl("down", "ownk-c2", "--force")
        mvmctl("snapshot", "rm", "ownk-snap")


def test_volumes_mount_with_our_kernels_built_in_virtiofs(mvmctl: Mvmctl, own_image) -> None:
    directory, _ = own_image
    (directory / "ro").mkdir(exist_ok=True)
    (directory / "ro" / "in.txt").write_text("from the host\n")
    (directory / "rw").mkdir(exist_ok=True)
    os.chown(directory / "rw", 1000, 1000)  # the workload's uid owns what it may write (docs/volumes.md)
    proc = mvmctl("run", "--attached", str(directory), "--name", "ownk-vol", "-v", f"{directory / 'ro'}:/ro", "-v",
                  f"{directory / 'rw'}:/rw:rw", "--", "sh", "-c",
                  "cat /ro/in.txt; echo from-guest > /rw/out.txt; echo x > /ro/no.txt || echo refused")
    assert proc.returncode == 0, proc.stderr
    assert "from the host" in proc.stdout and "refused" in proc.stdout
    assert (directory / "rw" / "out.txt").read_text() == "from-guest\n"
    assert not (directory / "ro" / "no.txt").exists()
