"""Property-based fuzzing of what a hostile guest or a damaged file hands the host: the tar
stream `cp` unpacks, `cp`'s path arguments, and mvm.toml. (The wire decoder has its own in
test_protocol.py, and the agent's frame loop in test_agent.py.)"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvm.core.errors import MvmError, UsageError
from mvm.core.manifest import parse_manifest
from mvm.runtime.transfer import extract_safely, printable, split_vm_path

PARTS = st.sampled_from(["a", "b", "..", ".", "", "evil", "x" * 10, "sub", "\x1b[31m", "ü"])
NAMES = st.lists(PARTS, min_size=1, max_size=5).map("/".join).map(lambda n: st.sampled_from(["", "/", "./"]).map(
    lambda prefix: prefix + n))
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
                         tarfile.CHRTYPE])


@st.composite
def hostile_archives(draw: st.DrawFn) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for _ in range(draw(st.integers(1, 12))):
            info = tarfile.TarInfo(draw(draw(NAMES)))
            info.type = draw(KINDS)
            info.mode = draw(st.integers(0, 0o7777))
            info.uid = info.gid = draw(st.sampled_from([0, 1000, 65534]))
            data = b""
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = draw(draw(NAMES))
            elif info.type == tarfile.REGTYPE:
                data = draw(st.binary(max_size=64))
                info.size = len(data)
            elif info.type == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          print_blob=True)
@given(archive=hostile_archives())
def test_a_hostile_archive_stays_inside_its_destination(tmp_path_factory, archive: bytes) -> None:
    parent = tmp_path_factory.mktemp("cp")
    (parent / "outside.txt").write_text("keep")
    target = parent / "dest"
    target.mkdir()
    try:
        extract_safely(io.BytesIO(archive), target)
    except (tarfile.TarError, OSError):
        pass  # refusing the whole archive is fine; what it left must still obey the rules
    assert everything_under(parent) - {"outside.txt", "dest"} == {f"dest/{p}" for p in everything_under(target)}
    assert (parent / "outside.txt").read_text() == "keep"
    real_target = os.path.realpath(target)
    for path in target.rglob("*"):
        mode = path.lstat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), path
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode), path  # no devices, no FIFOs
        if stat.S_ISLNK(mode):
            try:
                resolved = str(path.resolve(strict=True))
            except RuntimeError:
                continue  # a loop: the system refuses to follow it (and realpath mis-resolves those)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    continue
                resolved = os.path.realpath(path)  # dangling: where it would lead
            assert resolved == real_target or resolved.startswith(real_target + os.sep), (path, os.readlink(path))


@given(st.text(max_size=80))
def test_cp_paths_split_or_fail_with_one_usage_error(spec: str) -> None:
    try:
        vm, path = split_vm_path(spec)
    except UsageError as err:
        assert "\n" not in str(err)
        return
    assert (vm is None and path == spec) or (vm is not None and path.startswith("/"))


@given(st.text(max_size=60))
def test_printable_names_hold_no_control_characters(name: str) -> None:
    shown = printable(name)
    assert all(ch.isprintable() for ch in shown)


SCALARS = st.one_of(st.text(max_size=12), st.integers(-2**40, 2**40), st.booleans(), st.floats(allow_nan=False))
KEYS = st.sampled_from(["name", "vcpus", "memory_mib", "mem", "data_disk", "packages", "entrypoint", "command",
                        "shell", "services", "uids", "agent", "extra_files", "/etc/motd", "//init", "content", "mode",
                        "network", "allow", "forward", "volumes", "host", "guest", "dev", "hypervisor", "flake",
                        "restart", "zzz"])
TOML = st.recursive(SCALARS | st.lists(SCALARS, max_size=3),
                    lambda inner: st.dictionaries(KEYS, inner, max_size=5) | st.lists(inner, max_size=3), max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, TOML, max_size=8))
def test_any_manifest_parses_or_fails_with_one_line(tmp_path_factory, document: dict) -> None:
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):
        return  # not TOML at all (a list at the top of an array of mixed kinds...)
    try:
        parse_manifest(text, base_dir=tmp_path_factory.getbasetemp())
    except MvmError as err:
        assert "\n" not in str(err)


def _path_max_escape(target: str, depth: int = 16) -> bytes:
    """The CVE-2025-4517 shape: directories with 247-character names, each also reached through
    a one-letter link, so the link-expanded path passes PATH_MAX and realpath stops resolving
    (and so stops seeing that it leaves); then a link up out of the copy, and a file through it."""
    out = io.BytesIO()
    long_name, steps, path = "d" * 247, "abcdefghijklmnop"[:depth], ""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for step in steps:
            directory = tarfile.TarInfo(os.path.join(path, long_name))
            directory.type, directory.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(directory)
            link = tarfile.TarInfo(os.path.join(path, step))
            link.type, link.linkname = tarfile.SYMTYPE, long_name
            tar.addfile(link)
            path = os.path.join(path, long_name)
        deep = tarfile.TarInfo(os.path.join("/".join(steps), "l" * 254))
        deep.type, deep.linkname = tarfile.SYMTYPE, "../" * len(steps)
        tar.addfile(deep)
        escape = tarfile.TarInfo("escape")
        escape.type, escape.linkname = tarfile.SYMTYPE, deep.name + "/.." * depth + "/" + target.lstrip("/")
        tar.addfile(escape)
        content = b"written by the guest\n"
        payload = tarfile.TarInfo("escape/pwned.txt")
        payload.size, payload.mode = len(content), 0o644
        tar.addfile(payload, io.BytesIO(content))
    return out.getvalue()


def test_a_chain_of_long_links_does_not_carry_a_file_out_of_the_copy(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    target = tmp_path / "a" / "b" / "dest"
    target.mkdir(parents=True)
    skipped = extract_safely(io.BytesIO(_path_max_escape(str(victim))), target)
    assert list(victim.iterdir()) == []
    assert (target / "escape" / "pwned.txt").is_file()  # (links come last: "escape" was a directory by then)
    assert "escape: something is already at that path" in skipped, skipped
    assert any(line.startswith("a/b/c/") for line in skipped), skipped  # (the link up: not made)
    assert not [p for p in target.rglob("*") if p.is_symlink() and not _inside(p, target)]


def _inside(link: Path, root: Path) -> bool:
    try:
        return link.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return True  # (a loop or a name too long: leads nowhere)


def test_an_ordinary_tree_comes_out_whole(tmp_path: Path) -> None:
    """Links that stay inside (also through ..) are kept; a file is never written through one
    (links are made last: a file under a link's name makes a directory there instead)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind, extra in [("./", tarfile.DIRTYPE, ""), ("etc/", tarfile.DIRTYPE, ""),
                                  ("usr/share/doc/", tarfile.DIRTYPE, ""), ("usr/share/doc/readme", tarfile.REGTYPE, "hi"),
                                  ("etc/readme", tarfile.SYMTYPE, "../usr/share/doc/readme"),
                                  ("etc/doc", tarfile.SYMTYPE, "../usr/share/doc"),
                                  ("etc/doc/through-a-link", tarfile.REGTYPE, "no")]:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, 0o755
            data = extra.encode() if kind == tarfile.REGTYPE else b""
            if kind == tarfile.SYMTYPE:
                info.linkname = extra
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "dest"
    target.mkdir()
    skipped = extract_safely(io.BytesIO(out.getvalue()), target)
    assert (target / "etc" / "readme").read_text() == "hi"
    assert skipped == ["etc/doc: something is already at that path"]
    assert (target / "etc" / "doc" / "through-a-link").read_text() == "no"
    assert not (target / "usr" / "share" / "doc" / "through-a-link").exists()


def test_a_link_through_another_link_that_climbs_out_is_not_kept(tmp_path: Path) -> None:
    """Each of these looks inside when read alone: x/y/s leads to the top of the copy, and
    t to x/y/s/.. (x/y, by the letters); followed as the kernel would, t leads out."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind, linkname in [("x/y", tarfile.DIRTYPE, ""), ("x/y/s", tarfile.SYMTYPE, "../.."),
                                     ("t", tarfile.SYMTYPE, "x/y/s/..")]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, linkname
            tar.addfile(info)
    target = tmp_path / "dest"
    target.mkdir()
    skipped = extract_safely(io.BytesIO(out.getvalue()), target)
    assert skipped == ["t: a link that leads out of the copy (x/y/s/..)"]
    assert os.readlink(target / "x" / "y" / "s") == "../.." and not (target / "t").is_symlink()


def test_a_link_that_cannot_be_made_does_not_leave_the_earlier_ones_unchecked(tmp_path: Path) -> None:
    """Links are made, then checked: one failing to be made (a name too long) is a skip line,
    and the links before it are still checked (an escaping one removed)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, linkname in [("esc", "../../../etc"), ("n" * 300, "x"), ("fine", "esc2"), ("big", "t" * 5000)]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, linkname
            tar.addfile(info)
    target = tmp_path / "dest"
    target.mkdir()
    skipped = extract_safely(io.BytesIO(out.getvalue()), target)
    assert not (target / "esc").is_symlink() and (target / "fine").is_symlink()
    assert "esc: a link that leads out of the copy (../../../etc)" in skipped
    assert any(line.startswith("n" * 300 + ": File name too long") for line in skipped), skipped
    assert any(line.startswith("big: ") for line in skipped), skipped
