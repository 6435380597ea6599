"""Host tool lookup and bootstrap, checked against this machine's real programs."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from mvm.core.errors import HostToolMissing
from mvm.runtime.hosttools import (
    SBIN_DIRS,
    TOOLS,
    PackageHost,
    bootstrap,
    elf_is_dynamic,
    find_tool,
    host_tools,
    is_debian_like,
    require_tool,
)

ALL_BUT_E2FSPROGS = (
    "qemu-system-x86", "qemu-utils", "qemu-system-arm", "busybox-static", "lz4", "cpio", "apt", "dpkg",
)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_HOME", str(tmp_path / "mvm-home"))


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holding only an empty directory: every tool outside the sbin fallback vanishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def _debian_host(**overrides: object) -> PackageHost:
    facts: dict[str, object] = {
        "debian_like": True, "apt_get": "/usr/bin/apt-get", "is_root": True,
        "sudo_ok": False, "lists_present": True, "os_name": "Debian GNU/Linux 12 (bookworm)",
    }
    facts.update(overrides)
    return PackageHost(**facts)  # type: ignore[arg-type]


def test_table_names_every_tool_once_with_its_package() -> None:
    names = [t.name for t in TOOLS]
    assert names == [
        "qemu-system-x86_64", "qemu-img", "qemu-system-aarch64", "busybox", "mkfs.ext4", "debugfs", "e2fsck",
        "lz4", "cpio", "apt-get", "dpkg-deb",
    ]
    packages = {t.name: t.package for t in TOOLS}
    assert packages["busybox"] == "busybox-static"
    assert packages["qemu-system-x86_64"] == "qemu-system-x86"
    assert packages["qemu-system-aarch64"] == "qemu-system-arm"
    assert {packages[n] for n in ("mkfs.ext4", "debugfs", "e2fsck")} == {"e2fsprogs"}
    assert all(t.needed_by for t in TOOLS)


@pytest.mark.parametrize("tool", [t.name for t in TOOLS])
def test_installed_tool_is_found_with_a_version(tool: str) -> None:
    status = find_tool(tool)
    assert status.ok, status.problem
    assert status.path is not None and os.path.isabs(status.path)
    assert os.access(status.path, os.X_OK)
    assert status.version is not None and re.match(r"^\d+\.\d+", status.version)
    assert status.problem is None


def test_qemu_version_matches_what_qemu_prints() -> None:
    import subprocess

    out = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout
    version = find_tool("qemu-system-x86_64").version
    assert version is not None and f"version {version} " in out.splitlines()[0]


def test_require_tool_returns_the_path_on_path() -> None:
    assert require_tool("qemu-img") == shutil.which("qemu-img")


def test_hidden_tool_is_missing_and_require_names_the_package(empty_path: Path) -> None:
    status = find_tool("qemu-img")
    assert not status.ok
    assert status.path is None and status.version is None
    assert "not found" in (status.problem or "")
    with pytest.raises(HostToolMissing) as caught:
        require_tool("qemu-img")
    assert caught.value.package == "qemu-utils"
    assert "qemu-utils" in (caught.value.fix or "")
    assert "mvmctl bootstrap" in str(caught.value)


def test_sbin_tools_are_found_even_without_sbin_on_path(empty_path: Path) -> None:
    status = find_tool("mkfs.ext4")
    assert status.ok, status.problem
    assert status.path is not None and os.path.dirname(status.path) in SBIN_DIRS


def test_unknown_tool_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown host tool"):
        find_tool("no-such-tool")


def test_dynamic_busybox_is_refused(empty_path: Path) -> None:
    dynamic = shutil.which("true", path="/usr/bin:/bin")
    assert dynamic is not None and elf_is_dynamic(dynamic) is True
    (empty_path / "busybox").symlink_to(dynamic)
    status = find_tool("busybox")
    assert status.path == str(empty_path / "busybox")
    assert not status.ok
    assert "dynamically linked" in (status.problem or "")
    with pytest.raises(HostToolMissing) as caught:
        require_tool("busybox")
    assert caught.value.package == "busybox-static"


def test_elf_linkage_is_read_from_program_headers(tmp_path: Path) -> None:
    busybox = find_tool("busybox").path
    assert busybox is not None
    assert elf_is_dynamic(busybox) is False
    assert elf_is_dynamic(sys.executable) in (True, False)
    assert elf_is_dynamic(str(shutil.which("qemu-img"))) is True
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert elf_is_dynamic(str(script)) is None
    assert elf_is_dynamic(str(tmp_path / "absent")) is None


def test_version_is_parsed_from_what_the_program_prints(empty_path: Path) -> None:
    fake = empty_path / "qemu-img"
    fake.write_text("#!/bin/sh\necho 'qemu-img version 9.8.7 (fake)'\n")
    fake.chmod(0o755)
    status = find_tool("qemu-img")
    assert status.ok and status.version == "9.8.7"


def test_a_tool_that_fails_to_run_is_not_ok(empty_path: Path) -> None:
    broken = empty_path / "qemu-img"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    status = find_tool("qemu-img")
    assert not status.ok
    assert status.path == str(broken)
    assert "exited 3" in (status.problem or "")


def test_debian_detection() -> None:
    assert is_debian_like({"ID": "debian"})
    assert is_debian_like({"ID": "ubuntu"})
    assert is_debian_like({"ID": "linuxmint", "ID_LIKE": "ubuntu debian"})
    assert not is_debian_like({"ID": "fedora", "ID_LIKE": "rhel"})
    assert not is_debian_like({})
    text = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    pattern = r"^ID(_LIKE)?=.*\b(debian|ubuntu)\b"
    assert is_debian_like() == bool(re.search(pattern, text, re.MULTILINE))


def test_package_host_detects_this_machine() -> None:
    host = PackageHost.detect()
    assert host.is_root == (os.geteuid() == 0)
    assert host.apt_get == shutil.which("apt-get")
    if host.is_root:
        assert host.sudo_ok is False


def test_bootstrap_with_everything_present_does_nothing() -> None:
    assert all(s.ok for s in host_tools()), "this machine is expected to have every host tool"
    lines: list[str] = []
    dry = bootstrap(dry_run=True, echo=lines.append)
    assert dry.status == "nothing-to-do"
    assert dry.packages == () and dry.missing == () and dry.commands == ()
    assert not dry.installed
    assert any("nothing to install" in line for line in lines)
    # Idempotent for real: nothing is missing, so no apt-get runs.
    real = bootstrap(dry_run=False, echo=lines.append)
    assert real.status == "nothing-to-do" and real.commands == ()


def test_bootstrap_with_path_hidden_lists_the_packages(empty_path: Path) -> None:
    lines: list[str] = []
    result = bootstrap(dry_run=True, echo=lines.append)
    # e2fsprogs is still found in the sbin fallback; everything else is gone.
    assert result.packages == ALL_BUT_E2FSPROGS
    assert set(result.missing) == {
        "qemu-system-x86_64", "qemu-img", "qemu-system-aarch64", "busybox", "lz4", "cpio", "apt-get", "dpkg-deb",
    }
    # apt-get itself is hidden, so mvm cannot install and says what to install instead.
    assert result.status == "manual" and not result.installed
    assert all(pkg in result.message for pkg in ALL_BUT_E2FSPROGS)
    assert result.message in lines


def test_bootstrap_dry_run_as_root_shows_the_apt_command(empty_path: Path) -> None:
    result = bootstrap(dry_run=True, echo=lambda _: None, host=_debian_host())
    assert result.status == "dry-run" and not result.installed
    assert result.commands == (
        ("/usr/bin/apt-get", "install", "-y", "--no-install-recommends", *ALL_BUT_E2FSPROGS),
    )


def test_bootstrap_updates_first_only_when_lists_are_empty(empty_path: Path) -> None:
    result = bootstrap(dry_run=True, echo=lambda _: None, host=_debian_host(lists_present=False))
    assert [c[1] for c in result.commands] == ["update", "install"]


def test_bootstrap_uses_sudo_n_when_allowed(empty_path: Path) -> None:
    host = _debian_host(is_root=False, sudo_ok=True)
    result = bootstrap(dry_run=True, echo=lambda _: None, host=host)
    assert result.status == "dry-run"
    (install,) = result.commands
    assert install[:4] == ("sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive")
    assert "--no-install-recommends" in install


def test_bootstrap_without_root_or_sudo_prints_commands_and_installs_nothing(
    empty_path: Path,
) -> None:
    lines: list[str] = []
    host = _debian_host(is_root=False, sudo_ok=False)
    result = bootstrap(dry_run=False, echo=lines.append, host=host)
    assert result.status == "manual" and not result.installed
    (install,) = result.commands
    assert install[:2] == ("sudo", "apt-get")
    assert install[-len(ALL_BUT_E2FSPROGS):] == ALL_BUT_E2FSPROGS
    assert "nothing was installed" in result.message
    assert any("sudo apt-get install -y --no-install-recommends" in line for line in lines)


def test_bootstrap_on_a_non_apt_host_names_the_packages(empty_path: Path) -> None:
    host = _debian_host(debian_like=False, apt_get=None, os_name="Fedora Linux 40")
    result = bootstrap(dry_run=False, echo=lambda _: None, host=host)
    assert result.status == "manual" and result.commands == ()
    assert "Fedora Linux 40" in result.message and "not Debian/Ubuntu" in result.message
    assert "busybox-static" in result.message
