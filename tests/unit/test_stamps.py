"""The runtime's light view of an artifact (core/bootimage.py) and the stamps that let `up`
find an unchanged workload's image without parsing it (build/stamps.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mvm import guest
from mvm.build import stamps
from mvm.core.artifact import ArtifactMeta, ArtifactUids
from mvm.core.bootimage import ARTIFACT_FILE, BootImage, PortForward
from mvm.core.errors import UsageError
from mvm.core.manifest import parse_manifest
from mvm.core.state import MvmHome

TOML = """\
name = "web"
vcpus = 2
memory_mib = 384
data_disk = "16M"
hypervisor = "qemu"

[entrypoint]
command = ["/bin/sh", "-c", "sleep 1"]

[network]
forward = ["127.0.0.1:8080:80", "9090:90"]
"""
LOCK = b"# mvm.lock\n[kernel]\nname = 'linux-image-x'\n"


def write_artifact(store: Path, key: str, toml: str = TOML) -> ArtifactMeta:
    """An artifact.json as the builder writes it: the real pydantic model, serialised the real way."""
    workload = parse_manifest(toml, base_dir=store)
    meta = ArtifactMeta(key=key, name=workload.name, builder_version=stamps.BUILDER_VERSION,
                        accessible=workload.accessible, sealed=workload.sealed,
                        entrypoint_kind=workload.entrypoint.kind,
                        uids=ArtifactUids(agent=workload.uids.agent, entrypoint=workload.uids.entrypoint),
                        rootless_entrypoint=workload.uids.entrypoint != 0, expected_boot_ms=2500,
                        kernel_release="6.1.0-test-cloud-amd64", vcpus=workload.vcpus, memory_mib=workload.memory_mib,
                        data_disk_bytes=workload.data_disk_bytes, packages=[], workload=workload)
    (store / key).mkdir(parents=True)
    (store / key / ARTIFACT_FILE).write_text(meta.to_json())
    for name in ("vmlinux", "initrd.cpio", "rootfs.ext4"):  # (their contents are not read here)
        (store / key / name).write_bytes(b"")
    return meta


def test_boot_image_reads_what_the_builder_writes(tmp_path: Path) -> None:
    meta = write_artifact(tmp_path, "a" * 64)
    image = BootImage.open(tmp_path / meta.key)
    assert (image.key, image.name, image.vcpus, image.memory_mib) == (meta.key, "web", 2, 384)
    assert image.data_disk_bytes == meta.data_disk_bytes == 16 << 20
    assert (image.expected_boot_ms, image.kernel_release) == (2500, meta.kernel_release)
    assert (image.accessible, image.sealed) == (meta.accessible, meta.sealed)
    assert image.entrypoint_kind == "command"
    assert (image.agent_uid, image.entrypoint_uid) == (meta.uids.agent, meta.uids.entrypoint)
    assert image.hypervisor == "qemu"
    assert image.forwards == (PortForward("127.0.0.1", 8080, 80), PortForward("127.0.0.1", 9090, 90))
    assert image.rootfs == tmp_path / meta.key / "rootfs.ext4"


def test_boot_image_of_a_default_workload(tmp_path: Path) -> None:
    meta = write_artifact(tmp_path, "b" * 64, 'name = "plain"\n[entrypoint]\nshell = "/bin/sh"\n')
    image = BootImage.open(tmp_path / meta.key)
    assert (image.hypervisor, image.forwards, image.data_disk_bytes) == ("auto", (), None)
    assert image.entrypoint_kind == "shell"


def test_an_image_with_a_file_missing_is_one_clear_error(tmp_path: Path) -> None:
    meta = write_artifact(tmp_path, "c" * 64)
    (tmp_path / meta.key / "vmlinux").unlink()
    with pytest.raises(UsageError, match=r"the image in .* is damaged: vmlinux missing.*mvmctl build --no-cache"):
        BootImage.open(tmp_path / meta.key)


def test_an_unreadable_image_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    for name in ("vmlinux", "initrd.cpio", "rootfs.ext4"):
        (tmp_path / "k" / name).write_bytes(b"")
    (tmp_path / "k" / ARTIFACT_FILE).write_text('{"key": "k"}')
    with pytest.raises(UsageError, match=r"the image in .* is unreadable \(KeyError.*mvmctl build --no-cache"):
        BootImage.open(tmp_path / "k")


def workload(directory: Path, toml: str = TOML, lock: bytes | None = LOCK) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mvm.toml").write_text(toml)
    if lock is not None:
        (directory / "mvm.lock").write_bytes(lock)
    return directory


def test_the_digest_follows_every_input(tmp_path: Path) -> None:
    assert stamps.input_digest(workload(tmp_path / "unlocked", lock=None)) is None
    assert stamps.input_digest(tmp_path / "missing") is None
    here = workload(tmp_path / "w")
    first = stamps.input_digest(here)
    assert first is not None and stamps.input_digest(here) == first
    assert stamps.input_digest(here / "mvm.toml") == first  # the file or its directory: the same workload
    (here / "mvm.toml").write_text(TOML.replace("384", "512"))
    assert stamps.input_digest(here) not in (None, first)
    (here / "mvm.toml").write_text(TOML)
    assert stamps.input_digest(here) == first
    (here / "mvm.lock").write_bytes(LOCK + b"# changed\n")
    assert stamps.input_digest(here) not in (None, first)
    (here / "mvm.lock").write_bytes(LOCK)
    elsewhere = shutil.copytree(here, tmp_path / "copy")  # relative paths in mvm.toml would mean other files
    assert stamps.input_digest(elsewhere) not in (None, first)


def test_a_new_kernel_config_misses_the_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `kernel = "mvm"` image is built against build/kernel_configs/: changing them must not
    leave `up` on a stamp of the image built with the old config."""
    here = workload(tmp_path / "w")
    first = stamps.input_digest(here)
    configs = tmp_path / "build"
    (configs / "kernel_configs").mkdir(parents=True)
    (configs / "kernel_configs" / "x86_64.config").write_text("CONFIG_A=y\n")
    monkeypatch.setattr(stamps, "__file__", str(configs / "stamps.py"))
    with_a = stamps.input_digest(here)
    assert with_a not in (None, first)
    (configs / "kernel_configs" / "x86_64.config").write_text("CONFIG_A=y\n# CONFIG_B is not set\n")
    assert stamps.input_digest(here) not in (None, first, with_a)


def test_the_guest_digest_covers_every_agent_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent is a package: each of its modules is shipped and hashed, and moving code from
    one module to the next (same bytes, other files) is a change too."""
    package = Path(guest.__file__).parent / "agent"
    assert guest.AGENT_FILES == tuple(sorted(f"agent/{p.name}" for p in package.glob("*.py")))
    assert {"agent/__main__.py", "agent/session.py"} <= set(guest.AGENT_FILES)
    assert set(guest.AGENT_FILES) <= set(guest.GUEST_FILES)
    first = stamps.guest_sources_digest()
    real = stamps.guest_file
    for name in guest.AGENT_FILES:
        monkeypatch.setattr(stamps, "guest_file", lambda n, name=name: real(n) + b"#" * (n == name))
        assert stamps.guest_sources_digest() != first, name
    a, b = guest.AGENT_FILES[:2]
    moved = {a: real(a) + real(b)[:1], b: real(b)[1:]}
    monkeypatch.setattr(stamps, "guest_file", lambda n: moved.get(n) or real(n))
    assert stamps.guest_sources_digest() != first


def test_lookup_finds_only_an_image_the_store_still_has(tmp_path: Path) -> None:
    home = MvmHome(tmp_path / "home")
    here = workload(tmp_path / "w")
    key = "c" * 64
    assert stamps.lookup(home, here) is None
    stamps.record(home, here, (here / "mvm.toml").read_bytes(), key)
    assert stamps.lookup(home, here) is None  # stamped, but the store has no such artifact
    write_artifact(home.store, key)
    image = stamps.lookup(home, here)
    assert image is not None and image.key == key and image.name == "web"
    (here / "mvm.toml").write_text(TOML + "\n# an edit\n")
    assert stamps.lookup(home, here) is None


def test_a_stamp_records_the_manifest_the_build_read(tmp_path: Path) -> None:
    """If mvm.toml changed while the build ran, the stamp maps the bytes that were built."""
    home = MvmHome(tmp_path / "home")
    here = workload(tmp_path / "w")
    built = (here / "mvm.toml").read_bytes()
    write_artifact(home.store, "d" * 64)
    (here / "mvm.toml").write_text(TOML.replace("web", "edited"))
    stamps.record(home, here, built, "d" * 64)
    assert stamps.lookup(home, here) is None
    (here / "mvm.toml").write_bytes(built)
    assert stamps.lookup(home, here) is not None
