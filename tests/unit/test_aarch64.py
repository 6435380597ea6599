"""aarch64 guests without booting one: the manifest's arch, the builder's apt state, kernel and
bytecode for another architecture, QEMU's command line, and who refuses such a guest and why."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from mvm.build import apt_arch, kernel, rootfs
from mvm.build.packages import PackageLock
from mvm.core.arch import GUEST_ARCHES, guest_arch, host_arch, is_native
from mvm.core.bootimage import BOOT_BUDGET_MS, BootImage
from mvm.core.errors import BuildError, ManifestError, MvmError, UsageError
from mvm.core.manifest import ManifestOverrides, parse_manifest
from mvm.core.state import MvmHome, VmPaths, VmRecord
from mvm.runtime import backends
from mvm.runtime.backends.qemu import QemuSpec

SHELL = '[entrypoint]\nshell = "/bin/sh"\n'
needs_arm_qemu = pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                                    reason="qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")


def parse(text: str, **kwargs: object):
    return parse_manifest(text, base_dir=Path("/srv/proj"), **kwargs)  # type: ignore[arg-type]


def image(tmp_path: Path, arch: str) -> BootImage:
    return BootImage(path=tmp_path, key="k" * 64, name="w", vcpus=1, memory_mib=128, data_disk_bytes=None,
                     expected_boot_ms=2000, kernel_release="6.1", accessible=False, sealed=True,
                     entrypoint_kind="command", agent_uid=990, entrypoint_uid=1000, hypervisor="auto", forwards=(),
                     arch=arch)


def test_arch_defaults_to_x86_64_and_mvm_toml_or_build_flag_pick_aarch64() -> None:
    assert parse(SHELL).arch == "x86_64"
    assert parse('arch = "aarch64"\n' + SHELL).arch == "aarch64"
    assert parse(SHELL, overrides=ManifestOverrides(arch="aarch64")).arch == "aarch64"
    assert parse('arch = "aarch64"\n' + SHELL, overrides=ManifestOverrides(arch="x86_64")).arch == "x86_64"
    # The arch is part of the IR, so it is part of the store key: no x86 image is reused for arm.
    assert '"arch":"aarch64"' in parse('arch = "aarch64"\n' + SHELL).canonical_json()


def test_an_unknown_arch_is_refused_naming_the_ones_mvm_builds() -> None:
    with pytest.raises(ManifestError, match="arch") as caught:
        parse('arch = "riscv64"\n' + SHELL)
    assert "aarch64" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="--arch: 'mips'.*aarch64"):
        parse(SHELL, overrides=ManifestOverrides(arch="mips"))
    with pytest.raises(UsageError, match="'sparc' is not one mvm builds"):
        guest_arch("sparc")


def test_the_arch_table_has_what_the_builder_and_runtime_need() -> None:
    arm = GUEST_ARCHES["aarch64"]
    assert (arm.debian, arm.triplet, arm.loader) == ("arm64", "aarch64-linux-gnu", "/lib/ld-linux-aarch64.so.1")
    assert arm.kernel_metapackage == "linux-image-cloud-arm64"
    assert dict(arm.boot_budget_ms).keys() == {"tcg"}  # never KVM or a container here
    assert BOOT_BUDGET_MS == dict(GUEST_ARCHES["x86_64"].boot_budget_ms)
    assert host_arch() == "x86_64" and is_native("x86_64") and not is_native("aarch64")


def test_a_foreign_arch_gets_a_private_apt_state_and_the_hosts_own_gets_none(tmp_path: Path) -> None:
    home = MvmHome(tmp_path)
    assert apt_arch.state_options(guest_arch("x86_64"), home) == []
    apt_arch.ensure_lists(guest_arch("x86_64"), home)  # nothing to do for the host's own
    options = apt_arch.state_options(guest_arch("aarch64"), home)
    joined = " ".join(options)
    assert "APT::Architecture=arm64" in joined and "APT::Architectures=arm64" in joined
    state = tmp_path / "cache" / "apt-arm64"
    assert f"Dir::State::Lists={state / 'lists'}" in joined and f"Dir::Cache={state / 'cache'}" in joined
    assert "/var/lib/apt" not in joined and "/etc/apt" not in joined  # the host's apt is left alone


def test_an_old_lock_without_an_arch_is_an_x86_64_lock(tmp_path: Path) -> None:
    deb = {"name": "k", "version": "1", "arch": "amd64", "filename": "k_1_amd64.deb", "sha256": "0" * 64, "size": 1}
    lock = tmp_path / "mvm.lock"
    import tomli_w

    lock.write_text(tomli_w.dumps({"version": 1, "requested": ["k"], "packages": [deb], "setpriv": [deb],
                                   "kernel": deb}))
    assert PackageLock.load(lock).arch == "x86_64"
    arm = PackageLock.load(lock).model_copy(update={"arch": "aarch64"})
    assert 'arch = "aarch64"' in arm.dump()


def test_the_arm64_kernel_image_is_kept_as_it_is_and_a_gzipped_one_unpacked(tmp_path: Path) -> None:
    arm_image = bytes(0x38) + b"ARM\x64" + bytes(range(200))
    kernel._write_vmlinux(arm_image, tmp_path / "plain")
    assert (tmp_path / "plain").read_bytes() == arm_image
    kernel._write_vmlinux(gzip.compress(arm_image), tmp_path / "unzipped")
    assert (tmp_path / "unzipped").read_bytes() == arm_image
    with pytest.raises(BuildError, match="damaged gzip"):
        kernel._write_vmlinux(b"\x1f\x8b" + b"junk" * 20, tmp_path / "bad")
    with pytest.raises(BuildError, match="no LZ4 payload"):
        kernel._write_vmlinux(b"neither an x86 bzImage nor an arm64 Image" * 4, tmp_path / "other")


def test_setpriv_is_taken_from_the_guest_architectures_library_directory() -> None:
    files = rootfs.setpriv_files("aarch64-linux-gnu")
    assert "./usr/lib/aarch64-linux-gnu/libcap-ng.so.0" in files and not any("x86_64" in f for f in files)
    assert rootfs.SETPRIV_FILES == rootfs.setpriv_files("x86_64-linux-gnu")


def _tree_with_magic(tmp_path: Path, magic: bytes) -> Path:
    number = int.from_bytes(magic[:2], "little")
    source = tmp_path / "usr/lib/python3.11/importlib/_bootstrap_external.py"
    source.parent.mkdir(parents=True)
    source.write_text(f"MAGIC_NUMBER = ({number}).to_bytes(2, 'little') + b'\\r\\n'\n")
    return tmp_path


def test_a_foreign_guests_bytecode_is_compiled_by_a_host_python_with_the_same_magic(tmp_path: Path) -> None:
    tree = _tree_with_magic(tmp_path / "good", importlib.util.MAGIC_NUMBER)
    argv = rootfs._host_compiler(tree, "python3.11")
    assert argv[1:] == ["-I", "-S", "-B"]
    other = bytes([(importlib.util.MAGIC_NUMBER[0] + 1) % 256, importlib.util.MAGIC_NUMBER[1]]) + b"\r\n"
    with pytest.raises(BuildError, match="no python3.11 on this host"):
        rootfs._host_compiler(_tree_with_magic(tmp_path / "bad", other), "python3.11")


def test_a_foreign_guests_bytecode_compiles_for_real(tmp_path: Path) -> None:
    """The host's interpreter writes unchecked-hash pycs of the guest's sources at guest paths."""
    tree = _tree_with_magic(tmp_path, importlib.util.MAGIC_NUMBER)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/python3").symlink_to("python3.11")
    (tree / "usr/bin/python3.11").write_bytes(b"\x7fELF not runnable here")
    (tree / "usr/lib/python3.11/hello.py").write_text("X = 1\n")
    assert rootfs.compile_python(tree, "aarch64") == 2
    pyc = tree / "usr/lib/python3.11/__pycache__" / f"hello.{__import__('sys').implementation.cache_tag}.pyc"
    data = pyc.read_bytes()
    assert data[:4] == importlib.util.MAGIC_NUMBER and data[4] == 1  # hash-based, unchecked


@needs_arm_qemu
def test_qemu_runs_aarch64_on_virt_with_the_pl011_console_and_no_x86_arguments(tmp_path: Path) -> None:
    spec = QemuSpec(kernel=Path("vmlinux"), initrd=Path("initrd"), root_disk=Path("root.qcow2"), arch="aarch64",
                    agent_socket=tmp_path / "a.sock", boot_socket=tmp_path / "b.sock", ram_file=tmp_path / "ram")
    argv = spec.argv()
    assert argv[0].endswith("qemu-system-aarch64")
    assert argv[argv.index("-M") + 1] == "virt,memory-backend=ram0"
    assert argv[argv.index("-cpu") + 1] == "cortex-a57" and argv.count("-cpu") == 1
    append = argv[argv.index("-append") + 1]
    assert "console=ttyAMA0" in append and "tsc" not in append and "8250" not in append
    assert argv[argv.index("-sandbox") + 1].startswith("on")
    assert "virtio-blk-device,drive=root" in argv and "virtio-rng-device" in argv
    assert "virtserialport,chardev=agent0,name=org.mvm.agent" in argv
    assert "virtserialport,chardev=boot0,name=org.mvm.boot" in argv
    x86 = QemuSpec(kernel=Path("vmlinux"), initrd=Path("initrd"), root_disk=None).argv()
    assert x86[0].endswith("qemu-system-x86_64") and x86[x86.index("-M") + 1] == "microvm,isa-serial=on"
    assert "-cpu" not in x86 and "console=ttyS0" in x86[x86.index("-append") + 1]


def test_backends_say_whether_and_why_they_run_an_aarch64_guest(tmp_path: Path) -> None:
    home = MvmHome(tmp_path)
    host = backends.Host(home, may_probe=False)
    arm, x86 = image(tmp_path, "aarch64"), image(tmp_path, "x86_64")
    docker, firecracker, qemu = backends.get("docker"), backends.get("firecracker"), backends.get("qemu")
    assert "binfmt_misc" in (docker.arch_refusal("aarch64") or "")
    assert docker.availability_for(arm, host)[0] is False
    assert "KVM only" in (firecracker.arch_refusal("aarch64") or "")
    assert firecracker.availability_for(arm, host)[0] is False
    assert backends.get("lima").arch_refusal("aarch64") is not None
    assert qemu.arch_refusal("aarch64") is None and qemu.arch_refusal("riscv64") is not None
    assert qemu.accel_for(arm, host) == "tcg"  # another architecture: never the KVM probe
    assert docker.arch_refusal("x86_64") is None and qemu.accel_for(x86, host) in ("kvm", "tcg")


@needs_arm_qemu
def test_up_picks_qemu_for_an_aarch64_image_and_refuses_docker_before_taking_the_name(tmp_path: Path) -> None:
    from mvm.runtime import lifecycle

    root = tmp_path / "home"
    home = MvmHome(root)
    arm = image(tmp_path, "aarch64")
    assert lifecycle.choose_backend(home, arm, None, backends.Host(home, may_probe=False)).name == "qemu"
    with pytest.raises(MvmError, match="binfmt_misc") as caught:
        lifecycle.start_vm(home, arm, name="w", hypervisor="docker")
    assert "\n" not in str(caught.value)
    assert not (root / "vms" / "w").exists()


def test_mvms_own_kernel_for_aarch64_is_refused_before_resolving(tmp_path: Path) -> None:
    from mvm.build.builder import Builder

    workload = parse('arch = "aarch64"\nkernel = "mvm"\n' + SHELL)
    with pytest.raises(BuildError, match="no aarch64 configuration") as caught:
        Builder(MvmHome(tmp_path)).build(workload, tmp_path)
    assert "kernel = \"debian\"" in str(caught.value)
    assert not (tmp_path / "mvm.lock").exists()


def test_records_and_images_carry_the_arch(tmp_path: Path) -> None:
    record = VmRecord(name="w", artifact_key="k" * 64, artifact_name="w", backend="qemu", accel="tcg",
                      mode="detached", vcpus=1, memory_mib=128, accessible=False, sealed=True, uids={"agent": 990})
    assert record.arch == "x86_64"
    paths = VmPaths(tmp_path / "vm")
    paths.dir.mkdir()
    replace(record, arch="aarch64").save(paths)
    assert VmRecord.load(paths).arch == "aarch64"
    data = json.loads(paths.record.read_text())
    paths.record.write_text(json.dumps({**data, "arch": 64}))
    with pytest.raises(ValueError, match="arch"):
        VmRecord.load(paths)


def test_private_lists_are_fetched_when_missing_or_a_day_old_and_kept_otherwise(tmp_path: Path) -> None:
    """Fetching runs apt-get update for real; here the lists are fresh or absent on purpose."""
    import os
    import time

    home = MvmHome(tmp_path)
    lists = apt_arch.apt_state_dir(guest_arch("aarch64"), home) / "lists"
    lists.mkdir(parents=True)
    fake = lists / "example_dists_bookworm_main_binary-arm64_Packages"
    fake.write_text("Package: not-fetched\n")
    apt_arch.ensure_lists(guest_arch("aarch64"), home)  # fresh: nothing fetched
    assert fake.read_text() == "Package: not-fetched\n"
    stale = time.time() - apt_arch.MAX_LIST_AGE_S - 60
    os.utime(fake, (stale, stale))
    try:
        apt_arch.ensure_lists(guest_arch("aarch64"), home)
    except BuildError as err:  # no network here: the one-line refusal names the architecture
        assert "arm64" in str(err) and "\n" not in str(err)
    else:  # fetched: real lists from the host's sources are there now
        assert any(p.name.endswith(("Packages", "Packages.lz4", "Packages.xz")) and p != fake for p in lists.iterdir())


def test_the_runtime_reads_the_arch_the_builder_writes_and_a_dry_run_plans_with_it(tmp_path: Path) -> None:
    from mvm.core.artifact import ArtifactMeta, ArtifactUids
    from mvm.core.bootimage import ARTIFACT_FILE
    from mvm.runtime import plan

    workload = parse('arch = "aarch64"\n' + SHELL)
    meta = ArtifactMeta(key="a" * 64, name=workload.name, builder_version="test", accessible=True, sealed=False,
                        entrypoint_kind=workload.entrypoint.kind, uids=ArtifactUids(agent=990, entrypoint=0),
                        rootless_entrypoint=False, expected_boot_ms=5000, kernel_release="6.1.0-57-cloud-arm64",
                        vcpus=1, memory_mib=256, packages=[], workload=workload)
    artifact = tmp_path / meta.key
    artifact.mkdir()
    (artifact / ARTIFACT_FILE).write_text(meta.to_json())
    for name in ("vmlinux", "initrd.cpio", "rootfs.ext4"):
        (artifact / name).write_bytes(b"")
    assert BootImage.open(artifact).arch == "aarch64"
    unbuilt = plan.unbuilt_image(tmp_path, json.loads(workload.canonical_json()))
    assert unbuilt.arch == "aarch64"
