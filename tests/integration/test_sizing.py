"""Sizing against the host: a VM asking for more than the host has is refused before boot,
with the numbers, unless --overcommit; and a guest really gets what it asked for (nproc and
memory seen inside it), on QEMU and on Docker."""

from __future__ import annotations

import os

import pytest

from mvm.runtime.sizing import HOST_HEADROOM_MIB, HostCapacity
from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

SIZED = """
    name = "{name}"
    [entrypoint]
    command = ["/bin/true"]
"""
# What the guest has: its CPUs, its MemTotal, and (in a container, where MemTotal is the host's)
# the cgroup's memory limit.
REPORT = ("nproc; grep MemTotal /proc/meminfo; "
          "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || true")


def host_threads() -> int:
    return len(os.sched_getaffinity(0))


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("mvmctl: docker:")]


@pytest.fixture(scope="module", params=["qemu", "docker"])
def ctl(request: pytest.FixtureRequest) -> Mvmctl:
    base = request.getfixturevalue("mvmctl" if request.param == "qemu" else "docker_mvmctl")
    return base.with_backend(request.param)


def test_too_many_vcpus_is_refused_before_boot_with_the_numbers(ctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir(SIZED.format(name="big-cpu"), name="big-cpu")
    want = host_threads() + 1
    for verb in (("up",), ("run", "--attached"), ("run", "--dry-run")):
        proc = ctl(*verb, str(directory), "--cpus", str(want))
        assert proc.returncode == 1, proc.stdout
        [line] = errors(proc.stderr)
        assert f"{want} vCPUs asked for" in line and f"{host_threads()} CPU threads" in line and "--overcommit" in line
    assert not (ctl.home / "vms" / "big-cpu").exists()


def test_too_much_memory_is_refused_before_boot_with_the_numbers(ctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir(SIZED.format(name="big-mem"), name="big-mem")
    capacity = HostCapacity.measure()
    want = capacity.available_mib + 1024  # more than is free, whatever the headroom
    proc = ctl("up", str(directory), "--memory", f"{want}M")
    assert proc.returncode == 1
    [line] = errors(proc.stderr)
    assert f"{want} MiB of memory asked for" in line and f"less {HOST_HEADROOM_MIB} MiB kept" in line, line
    assert not (ctl.home / "vms" / "big-mem").exists()


def test_the_guest_gets_what_it_asked_for(ctl: Mvmctl, workload_dir) -> None:
    """1 vCPU of the host's 2 (so a container must be pinned to one CPU for nproc to say 1) and
    320 MiB."""
    directory = workload_dir(SIZED.format(name="fits"), name="fits")
    proc = ctl("run", "--attached", str(directory), "--cpus", "1", "--memory", "320M", "--",
               "/bin/sh", "-c", REPORT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0].strip() == "1"
    mem_total_kib = int(lines[1].split()[1])
    if ctl.hypervisor == "docker":
        assert int(lines[2]) == 320 * 1024 * 1024  # the cgroup's limit (MemTotal in a container is the host's)
    else:
        assert 256 * 1024 < mem_total_kib <= 320 * 1024  # (the kernel keeps some for itself)


def test_overcommit_boots_more_vcpus_than_threads_on_qemu_and_docker_says_it_cannot(ctl: Mvmctl,
                                                                                   workload_dir) -> None:
    directory = workload_dir(SIZED.format(name="over"), name="over")
    want = host_threads() + 1
    proc = ctl("run", "--attached", str(directory), "--cpus", str(want), "--overcommit", "--", "nproc")
    if ctl.hypervisor == "docker":
        assert proc.returncode == 1
        [line] = errors(proc.stderr)
        assert "a container cannot have more CPUs" in line, line
        assert not (ctl.home / "vms" / "over").exists()
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(want)


def test_sdk_create_refuses_too_much_before_booting(mvmctl: Mvmctl, monkeypatch: pytest.MonkeyPatch) -> None:
    import mvm
    from mvm.errors import HostTooSmall

    monkeypatch.setenv("MVM_HOME", str(mvmctl.home))
    with pytest.raises(HostTooSmall, match="vCPUs asked for"):
        mvm.Sandbox.create("base", cpus=host_threads() + 1, backend="qemu")
    assert [s for s in mvm.Sandbox.list() if s.cpus == host_threads() + 1] == []
