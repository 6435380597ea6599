"""The checks a volume passes before anything starts: -v parsing, guest paths, and host paths
that are too broad (/, $HOME, outside the workload, through a symlink), or $MVM_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mvm.core.errors import UsageError
from mvm.runtime import volumes
from mvm.runtime.volumes import VolumeRequest


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "mvmhome").mkdir()
    return {"work": work, "data": work / "data", "elsewhere": tmp_path / "elsewhere", "home": tmp_path / "mvmhome"}


def check(path: Path | str, tree: dict[str, Path], allow_broad: bool = False) -> str:
    return volumes.check_host_path(str(path), workload_dir=tree["work"], mvm_home=tree["home"],
                                   allow_broad=allow_broad)


def test_parse_option_defaults_to_read_only_and_is_relative_to_the_current_directory(tmp_path: Path) -> None:
    assert volumes.parse_option("./d:/data", tmp_path) == VolumeRequest(str(tmp_path / "d"), "/data", True)
    assert volumes.parse_option("/abs:/x:rw", tmp_path) == VolumeRequest("/abs", "/x", False)
    assert volumes.parse_option("d:/x:ro", tmp_path).readonly
    for bad in ("d", "d:/x:rwx", ":/x", "d:", "a:b:c:d"):
        with pytest.raises(UsageError, match="HOST:GUEST"):
            volumes.parse_option(bad, tmp_path)


def test_guest_paths_must_be_plain_absolute_and_leave_the_system_alone() -> None:
    assert volumes.check_guest_path("/data/") == "/data"
    assert volumes.check_guest_path("/srv/in-put_1.x") == "/srv/in-put_1.x"
    for bad in ("data", "/", "/a/../b", "/a b", "/a,b", "/etc", "/usr/lib/x", "/proc", "/dev/x", "/tmp"):
        with pytest.raises(UsageError, match="volume guest path"):
            volumes.check_guest_path(bad)


def test_a_directory_inside_the_workload_is_shared_as_its_resolved_path(tree: dict[str, Path]) -> None:
    assert check(tree["data"], tree) == os.path.realpath(tree["data"])
    assert check(tree["work"], tree) == os.path.realpath(tree["work"])
    (tree["work"] / "link").symlink_to(tree["data"])
    assert check(tree["work"] / "link", tree) == os.path.realpath(tree["data"])


@pytest.mark.parametrize("target, words", [
    ("/", "the host's root directory"),
    ("~", "your home directory"),
    ("elsewhere", "outside the workload's directory"),
])
def test_broad_paths_are_refused_unless_allowed(tree: dict[str, Path], target: str, words: str) -> None:
    path = tree["elsewhere"] if target == "elsewhere" else os.path.expanduser(target)
    with pytest.raises(UsageError, match=words) as err:
        check(path, tree)
    assert "--allow-broad-mount" in str(err.value)
    if target == "/":  # it holds $MVM_HOME, which is never shared
        with pytest.raises(UsageError, match=r"\$MVM_HOME"):
            check(path, tree, allow_broad=True)
    else:
        assert check(path, tree, allow_broad=True) == os.path.realpath(path)


def test_a_symlink_is_resolved_before_the_check(tree: dict[str, Path]) -> None:
    (tree["work"] / "escape").symlink_to(tree["elsewhere"])
    with pytest.raises(UsageError, match=r"resolves to .*elsewhere.* outside the workload's directory"):
        check(tree["work"] / "escape", tree)
    (tree["work"] / "root").symlink_to("/")
    with pytest.raises(UsageError, match="root directory"):
        check(tree["work"] / "root", tree)


def test_mvm_home_is_never_shared_not_even_with_allow_broad(tree: dict[str, Path]) -> None:
    (tree["home"] / "keys").mkdir()
    for path in (tree["home"], tree["home"] / "keys", tree["home"].parent):
        with pytest.raises(UsageError, match=r"\$MVM_HOME"):
            check(path, tree, allow_broad=True)


def test_missing_and_non_directory_hosts_are_clear_errors(tree: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        check(tree["work"] / "nope", tree)
    (tree["work"] / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a directory"):
        check(tree["work"] / "file", tree)


def test_resolve_tags_in_order_and_refuses_overlapping_guest_paths(tree: dict[str, Path]) -> None:
    (tree["work"] / "b").mkdir()
    mounts = volumes.resolve((VolumeRequest(str(tree["data"]), "/a"), VolumeRequest(str(tree["work"] / "b"), "/b",
                                                                                     False)),
                             workload_dir=tree["work"], mvm_home=tree["home"])
    assert [(m.tag, m.guest, m.readonly) for m in mounts] == [("mvm0", "/a", True), ("mvm1", "/b", False)]
    assert volumes.boot_words(mounts) == "mvm.vol=mvm0,ro,/a mvm.vol=mvm1,rw,/b"
    with pytest.raises(UsageError, match="overlaps"):
        volumes.resolve((VolumeRequest(str(tree["data"]), "/a"), VolumeRequest(str(tree["data"]), "/a/b")),
                        workload_dir=tree["work"], mvm_home=tree["home"])
    with pytest.raises(UsageError, match="no workload directory"):
        volumes.resolve((VolumeRequest(str(tree["data"]), "/a"),), workload_dir=None, mvm_home=tree["home"])


def test_an_rw_volume_owned_by_root_is_refused_for_virtiofs(tree: dict[str, Path]) -> None:
    [mount] = volumes.resolve((VolumeRequest(str(tree["data"]), "/a", False),), workload_dir=tree["work"],
                              mvm_home=tree["home"])
    if os.stat(tree["data"]).st_uid == 0:
        with pytest.raises(UsageError, match="owned by root"):
            volumes.check_rw_owner((mount,))
    volumes.check_rw_owner((volumes.Mount(mount.host, mount.guest, True, mount.tag),))  # ro: fine


def test_the_uid_map_never_makes_guest_root_host_root() -> None:
    from mvm.runtime.virtiofs import NOBODY, id_map

    assert id_map(1000, 1000) == f"0 {NOBODY} 1\n1000 1000 1\n"
    assert id_map(0, 1000) == "0 1000 1\n"


def test_the_docker_bind_mount_is_read_only_unless_rw_and_quotes_commas() -> None:
    from mvm.runtime.backends.docker import bind_mount

    assert bind_mount("/w/d", "/d", True) == "type=bind,source=/w/d,target=/d,readonly"
    assert bind_mount("/w/d", "/d", False) == "type=bind,source=/w/d,target=/d"
    assert bind_mount("/w/a,b", "/d", True) == 'type=bind,"source=/w/a,b",target=/d,readonly'


def test_mvm_toml_mode_is_read(tmp_path: Path) -> None:
    from mvm.core.errors import ManifestError
    from mvm.core.manifest import load_manifest

    base = 'name = "t"\n[entrypoint]\ncommand = ["/bin/true"]\n'
    (tmp_path / "mvm.toml").write_text(base + '[[volumes]]\nhost = "d"\nguest = "/d"\nmode = "rw"\n'
                                       '[[volumes]]\nhost = "e"\nguest = "/e"\n')
    workload = load_manifest(str(tmp_path))
    assert [(v.guest, v.readonly) for v in workload.volumes] == [("/d", False), ("/e", True)]
    (tmp_path / "mvm.toml").write_text(base + '[[volumes]]\nhost = "d"\nguest = "/d"\nmode = "wr"\n')
    with pytest.raises(ManifestError, match="ro | rw"):
        load_manifest(str(tmp_path))
