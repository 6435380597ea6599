"""mvm's own kernel: the config fragment, what it asks of Kconfig, and how mvm.toml names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mvm.build import kernel_source, stamps
from mvm.core.errors import BuildError, ManifestError, UsageError
from mvm.core.manifest import ManifestOverrides, load_manifest, parse_manifest
from mvm.core.state import MvmHome

SHELL = '[entrypoint]\nshell = "/bin/sh"\n'


def test_a_setting_kconfig_dropped_is_named() -> None:
    fragment = "CONFIG_VIRTIO_FS=y\n# CONFIG_VT is not set\nCONFIG_NR_CPUS=64\n# a comment\n"
    config = "CONFIG_VIRTIO_FS=y\nCONFIG_VT=y\nCONFIG_NR_CPUS=8\n"
    assert kernel_source.unmet_settings(fragment, config) == ["CONFIG_VT off", "CONFIG_NR_CPUS=64"]
    assert kernel_source.unmet_settings(fragment, "CONFIG_VIRTIO_FS=y\nCONFIG_NR_CPUS=64\n") == []
    assert kernel_source.unmet_settings("CONFIG_SQUASHFS=y\n", "# CONFIG_SQUASHFS is not set\n") == ["CONFIG_SQUASHFS=y"]


def test_the_fragment_builds_in_what_the_guest_needs_and_no_modules() -> None:
    text = kernel_source.config_fragment("x86_64").read_text()
    for option in ("VIRTIO_MMIO", "VIRTIO_BLK", "VIRTIO_CONSOLE", "HW_RANDOM_VIRTIO", "VIRTIO_VSOCKETS", "EXT4_FS",
                   "VIRTIO_FS", "SQUASHFS", "OVERLAY_FS", "DM_VERITY", "SECCOMP_FILTER", "PID_NS", "CGROUPS",
                   "PVH", "DEVTMPFS_MOUNT", "SERIAL_8250_CONSOLE", "PRINTK_TIME"):
        assert f"CONFIG_{option}=y\n" in text, option
    assert "# CONFIG_MODULES is not set\n" in text
    assert "=m\n" not in text


def test_the_config_digest_names_the_fragment_and_unsupported_arches_are_refused() -> None:
    assert kernel_source.config_digest("x86_64") == kernel_source.config_digest("x86_64")
    assert len(kernel_source.config_digest("x86_64")) == 64
    with pytest.raises(BuildError, match="no aarch64 configuration yet"):
        kernel_source.config_digest("aarch64")
    with pytest.raises(BuildError, match="no kernel config for architecture 'riscv64'"):
        kernel_source.config_fragment("riscv64")


def test_the_cache_lists_only_complete_kernels(tmp_path: Path) -> None:
    home = MvmHome(tmp_path)
    good = home.kernels / "mvm-x86_64-aaaa"
    good.mkdir(parents=True)
    (good / "vmlinux").write_bytes(b"\x7fELF")
    (good / "build.json").write_text(json.dumps({"release": "6.1.1-mvm", "arch": "x86_64", "configDigest":
                                                 kernel_source.config_digest("x86_64"), "source": "s.deb",
                                                 "seconds": 1.0}))
    for broken, files in (("mvm-x86_64-nojson", {"vmlinux": b"x"}), ("mvm-x86_64-nolinux", {"build.json": b"{}"}),
                          ("mvm-x86_64-badjson", {"vmlinux": b"x", "build.json": b"{not json"})):
        (home.kernels / broken).mkdir()
        for name, data in files.items():
            (home.kernels / broken / name).write_bytes(data)
    assert [k.name for k in kernel_source.cached_kernels(home)] == ["mvm-x86_64-aaaa"]
    cached = kernel_source.cached_kernel(home)
    assert cached is not None and cached.release == "6.1.1-mvm"


def _cache_a_kernel(home: MvmHome, digest: str) -> Path:
    built = home.kernels / f"mvm-x86_64-{digest[:12]}"
    built.mkdir(parents=True)
    (built / "vmlinux").write_bytes(b"\x7fELF")
    (built / "build.json").write_text(json.dumps({"release": "6.1.1-mvm", "arch": "x86_64", "configDigest": digest,
                                                  "source": "s.deb", "seconds": 1.0}))
    return built


def test_auto_picks_ours_only_once_this_home_has_it_built_for_the_current_config(tmp_path: Path) -> None:
    home = MvmHome(tmp_path)
    assert kernel_source.default_kernel(home) == "debian"  # never a compile on the way to a first boot
    _cache_a_kernel(home, "0" * 64)  # a kernel of an older config is not ours any more
    assert kernel_source.default_kernel(home) == "debian"
    _cache_a_kernel(home, kernel_source.config_digest("x86_64"))
    assert kernel_source.default_kernel(home) == "mvm"
    assert kernel_source.default_kernel(home, "aarch64") == "debian"  # (no aarch64 config of ours)


def test_a_kernel_built_since_a_stamp_was_written_misses_it(tmp_path: Path) -> None:
    home = MvmHome(tmp_path / "home")
    here = tmp_path / "w"
    here.mkdir()
    (here / "mvm.toml").write_text('name = "k"\n' + SHELL)
    (here / "mvm.lock").write_text("{}")
    before = stamps.input_digest(here, home=home)
    assert before is not None and stamps.input_digest(here, home=home) == before
    _cache_a_kernel(home, kernel_source.config_digest("x86_64"))
    assert stamps.input_digest(here, home=home) not in (None, before)


def test_mvm_toml_and_build_name_the_kernel(tmp_path: Path) -> None:
    assert parse_manifest('name = "k"\n' + SHELL, base_dir=tmp_path).kernel == "auto"
    assert parse_manifest('name = "k"\nkernel = "debian"\n' + SHELL, base_dir=tmp_path).kernel == "debian"
    assert parse_manifest('name = "k"\nkernel = "mvm"\n' + SHELL, base_dir=tmp_path).kernel == "mvm"
    with pytest.raises(ManifestError) as info:
        parse_manifest('name = "k"\nkernel = "linux"\n' + SHELL, base_dir=tmp_path)
    assert info.value.field == "kernel" and "auto | debian | mvm" in str(info.value)
    (tmp_path / "mvm.toml").write_text('name = "k"\n' + SHELL)
    assert load_manifest(tmp_path, overrides=ManifestOverrides(kernel="mvm")).kernel == "mvm"
    with pytest.raises(UsageError, match="--kernel: 'nope'"):
        load_manifest(tmp_path, overrides=ManifestOverrides(kernel="nope"))


def test_the_source_edits_are_exact_and_part_of_the_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edits = kernel_source.source_edits("x86_64")
    assert [e.path for e in edits] == ["arch/x86/mm/init.c", "arch/x86/kernel/apic/apic.c"]
    assert "POISON_FREE_INITMEM" in edits[0].old and 'early_param("lapic_timer_period"' in edits[1].new
    edits = edits[:1]
    assert "POISON_FREE_INITMEM" not in edits[0].new and edits[0].why
    tree = tmp_path / "linux"
    (tree / "arch/x86/mm").mkdir(parents=True)
    source = f"void free_init_pages(void)\n{{\n\t\t{edits[0].old}\n}}\n"
    (tree / "arch/x86/mm/init.c").write_text(source)
    kernel_source.apply_edits(tree, edits)
    assert (tree / "arch/x86/mm/init.c").read_text() == source.replace(edits[0].old, edits[0].new)
    with pytest.raises(BuildError, match="there 0 times, not once"):  # (applied already: the text moved)
        kernel_source.apply_edits(tree, edits)
    (tree / "arch/x86/mm/init.c").write_text(source + source)
    with pytest.raises(BuildError, match="there 2 times"):
        kernel_source.apply_edits(tree, edits)
    before = kernel_source.config_digest("x86_64")
    fake = tmp_path / "configs"
    fake.mkdir()
    for name in ("x86_64.config", "x86_64.edits.toml"):
        (fake / name).write_bytes((kernel_source.CONFIG_DIR / name).read_bytes())
    monkeypatch.setattr(kernel_source, "CONFIG_DIR", fake)
    assert kernel_source.config_digest("x86_64") == before
    (fake / "x86_64.edits.toml").write_text("")  # no edits: another kernel
    assert kernel_source.config_digest("x86_64") != before
    (fake / "x86_64.edits.toml").write_text("[[edit]]\npath = 1\n")
    with pytest.raises(BuildError, match="malformed"):
        kernel_source.source_edits("x86_64")


def test_the_apic_timer_period_qemu_passes_matches_the_configs_tick() -> None:
    """QEMU's local APIC timer counts at 1 GHz, so the period per jiffy is 1e9 / CONFIG_HZ."""
    from mvm.runtime.backends.qemu import LAPIC_TIMER_PERIOD_ARG, QemuSpec

    fragment = kernel_source.config_fragment("x86_64").read_text()
    hz = [int(line.removeprefix("CONFIG_HZ_").removesuffix("=y")) for line in fragment.splitlines()
          if line.startswith("CONFIG_HZ_") and line.endswith("=y")]
    assert hz == [250] and LAPIC_TIMER_PERIOD_ARG == f"lapic_timer_period={10**9 // hz[0]}"
    ours = QemuSpec(kernel=Path("vmlinux"), initrd=None, root_disk=Path("root.ext4"))
    assert LAPIC_TIMER_PERIOD_ARG in ours.root_args()
    debian = QemuSpec(kernel=Path("vmlinux"), initrd=Path("initrd.cpio"), root_disk=Path("root.ext4"))
    assert debian.root_args() == ""  # (Debian's kernel knows no such parameter)
