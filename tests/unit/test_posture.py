"""Host posture and ``mvmctl doctor``, checked against this machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mvm.cli.host import bootstrap, doctor
from mvm.core.state import MvmHome
from mvm.runtime import backends
from mvm.runtime.backends.base import NOT_EXERCISED
from mvm.security.posture import DOCTOR_ORDER, Posture, host_posture

EXPECTED_BACKENDS = ("qemu", "firecracker", "docker", "apple-container", "libkrun", "lima")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MvmHome:
    root = tmp_path / "mvm-home"
    monkeypatch.setenv("MVM_HOME", str(root))
    return MvmHome(root)


@pytest.fixture
def posture(home: MvmHome) -> Posture:
    return host_posture(home, probe=False)


def _hide_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


def test_every_backend_is_reported_with_a_reason(posture: Posture) -> None:
    assert DOCTOR_ORDER == EXPECTED_BACKENDS
    assert set(backends.ALL_BACKENDS) == set(EXPECTED_BACKENDS)
    assert tuple(b.name for b in posture.backends) == EXPECTED_BACKENDS
    for b in posture.backends:
        assert b.reason.strip(), b.name
        assert "\n" not in b.reason
        if not b.tested_here:
            assert NOT_EXERCISED in b.reason, b.name


def test_only_supported_backends_can_be_available(posture: Posture) -> None:
    for b in posture.backends:
        assert b.supported == (b.name in backends.PRIORITY)
        if not b.supported:
            assert not b.available
            assert "not supported by this mvm version" in b.reason, b.name


def test_qemu_runs_here_and_names_its_accelerator(posture: Posture) -> None:
    qemu = posture.backend("qemu")
    assert qemu.available and qemu.tested_here
    assert qemu.accel == ("kvm" if posture.kvm.usable else "tcg")
    assert qemu.accel in qemu.reason
    assert "7." in qemu.reason or "qemu-system-x86_64" in qemu.reason
    assert posture.can_run_vm


def test_apple_container_is_unavailable_with_the_macos_reason(posture: Posture) -> None:
    apple = posture.backend("apple-container")
    assert not apple.available and not apple.tested_here
    assert "needs macOS 26+ on Apple Silicon" in apple.reason


def test_docker_is_reduced_isolation_and_says_whether_dockerd_answers(
    home: MvmHome, dockerd, monkeypatch: pytest.MonkeyPatch
) -> None:
    if dockerd is None:
        pytest.skip("no dockerd binary on this host")
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    up = host_posture(home, probe=False).backend("docker")
    assert up.available and up.tested_here
    assert "not a microVM" in up.reason and "answers" in up.reason
    assert up.capabilities["isolation"] == "container"
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    down = host_posture(home, probe=False).backend("docker")
    assert not down.available and "dockerd is not running" in down.reason and "not a microVM" in down.reason


def test_every_backend_declares_its_capabilities(posture: Posture) -> None:
    for backend in posture.backends:
        assert set(backend.capabilities) == {"snapshots", "pause_resume", "vsock", "tap_networking",
                                             "port_forwarding", "detach", "console", "isolation"}
    assert posture.backend("qemu").capabilities["isolation"] == "microvm"
    assert posture.backend("firecracker").capabilities["vsock"] is True


def test_firecracker_libkrun_lima_say_what_is_missing(posture: Posture) -> None:
    firecracker = posture.backend("firecracker")
    if platform.system() == "Linux" and not posture.kvm.usable:
        assert "KVM" in firecracker.reason
    libkrun, lima = posture.backend("libkrun"), posture.backend("lima")
    assert "libkrun" in libkrun.reason and "KVM" in libkrun.reason
    assert "limactl" in lima.reason


def test_missing_firecracker_binary_is_named(
    home: MvmHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_path(tmp_path, monkeypatch)
    firecracker = host_posture(home, probe=False).backend("firecracker")
    assert not firecracker.available
    assert "firecracker` binary on PATH" in firecracker.reason


def test_kvm_facts_match_the_device_and_module(posture: Posture) -> None:
    kvm = posture.kvm
    assert kvm.device_present == os.path.exists("/dev/kvm")
    assert kvm.pvm_hint == os.path.exists("/sys/module/kvm_pvm")
    assert kvm.accessible == (kvm.device_present and os.access("/dev/kvm", os.R_OK | os.W_OK))
    assert kvm.reason.strip()
    if not kvm.device_present or not kvm.accessible:
        assert kvm.usable is False


def test_host_facts(posture: Posture) -> None:
    host = posture.host
    assert host.arch == platform.machine()
    assert host.kernel == platform.release()
    assert host.cpus == os.cpu_count()
    assert host.memory_mib > 0
    release = Path("/etc/os-release")
    if release.exists():
        assert f'PRETTY_NAME="{host.os}"' in release.read_text()


def test_tools_are_listed_with_versions(posture: Posture) -> None:
    assert [t.name for t in posture.tools][:2] == ["qemu-system-x86_64", "qemu-img"]
    assert all(t.ok and t.version for t in posture.tools)
    assert posture.can_build


def test_without_qemu_no_vm_can_run(
    home: MvmHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_path(tmp_path, monkeypatch)
    posture = host_posture(home, probe=False)
    qemu = posture.backend("qemu")
    assert not qemu.available and not qemu.tested_here
    assert "qemu-system-x86_64" in qemu.reason and "not found" in qemu.reason
    assert not posture.can_run_vm
    assert not posture.can_build


def test_json_round_trips(posture: Posture) -> None:
    data = json.loads(posture.model_dump_json())
    assert data["can_run_vm"] is True
    assert {b["name"] for b in data["backends"]} == set(EXPECTED_BACKENDS)
    data.pop("can_run_vm"), data.pop("can_build")
    assert Posture.model_validate(data) == posture


def test_doctor_json_subprocess_exits_zero_here(home: MvmHome) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mvm.cli.main", "doctor", "--json", "--no-probe"],
        check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["can_run_vm"] is True
    backends = {b["name"]: b for b in data["backends"]}
    assert set(backends) == set(EXPECTED_BACKENDS)
    assert all(b["reason"] for b in backends.values())
    assert backends["qemu"]["available"] is True
    assert not backends["apple-container"]["available"]
    assert "needs macOS 26+ on Apple Silicon" in backends["apple-container"]["reason"]
    assert {t["name"] for t in data["tools"]} >= {"qemu-system-x86_64", "busybox", "mkfs.ext4"}


def test_doctor_json_exits_one_when_no_backend_can_run(
    home: MvmHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_path(tmp_path, monkeypatch)
    proc = subprocess.run(
        [sys.executable, "-m", "mvm.cli.main", "doctor", "--json", "--no-probe"],
        check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["can_run_vm"] is False


def test_doctor_prints_readable_sections(home: MvmHome) -> None:
    result = CliRunner().invoke(doctor, ["--no-probe"])
    assert result.exit_code == 0, result.output
    for heading in ("Host", "KVM", "Backends", "Host tools", "can run a VM: yes"):
        assert heading in result.output
    for name in EXPECTED_BACKENDS:
        assert name in result.output


def test_help_texts_explain_the_commands() -> None:
    doctor_help = CliRunner().invoke(doctor, ["--help"]).output
    assert "--json" in doctor_help and "--no-probe" in doctor_help and "Exits 0" in doctor_help
    bootstrap_help = CliRunner().invoke(bootstrap, ["--help"]).output
    assert "--dry-run" in bootstrap_help and "--no-install-recommends" in bootstrap_help


def test_bootstrap_command_dry_run_has_nothing_to_do_here(home: MvmHome) -> None:
    result = CliRunner().invoke(bootstrap, ["--dry-run"])
    assert result.exit_code == 0, result.output
    assert "nothing to install" in result.output
