"""Turn a staged tree into bytes that do not depend on when or by whom they were built.

ext4: ``mkfs.ext4 -d`` with a fixed UUID and hash seed under ``E2FSPROGS_FAKE_TIME``, from a
tree whose atime/mtime are all ``epoch``; then one ``debugfs -w`` pass sets what mke2fs copies
from the source and cannot be fixed beforehand: every inode's ctime, its atime (reading the
tree during the build moves it), and its owner (so a build as an unprivileged user still
gives root-owned files). initramfs: a newc cpio with
sorted names, root owner and fixed mtimes.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from mvm.core.errors import BuildError

TOOL_TIMEOUT_S = 600  # mkfs, debugfs, e2fsck, cpio: minutes at most, even for a big root

BLOCK = 4096
MIB = 1024 * 1024


def normalize_times(tree: Path, epoch: int) -> None:
    """Set atime/mtime of every entry (links themselves, not their targets) to ``epoch``."""
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch))


def tree_bytes(tree: Path) -> tuple[int, int]:
    """(bytes in blocks, number of entries): enough to size the filesystem."""
    total, count = 0, 0
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            total += (st.st_size + BLOCK - 1) // BLOCK * BLOCK
            count += 1
    return total, count


def make_ext4(tree: Path, out: Path, *, uuid: str, epoch: int, headroom_mib: int,
              owners: dict[str, int]) -> None:
    """Write ``tree`` into a new ext4 image ``out``; ``owners`` maps image paths to uid=gid."""
    used, count = tree_bytes(tree)
    size_mib = (used * 5 // 4) // MIB + headroom_mib + 16
    inodes = max(4096, count * 2)
    out.unlink(missing_ok=True)
    with out.open("wb") as f:
        f.truncate(size_mib * MIB)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(epoch), "LC_ALL": "C"}
    _run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-U", uuid, "-E", f"hash_seed={uuid},root_owner=0:0",
          "-N", str(inodes), "-L", "mvm-root", str(out)],
         env, "mkfs.ext4")
    _fix_inodes(out, epoch, owners, env)
    try:
        fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True, env=env,
                              timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BuildError("image", f"e2fsck did not finish within {TOOL_TIMEOUT_S} s") from None
    if fsck.returncode != 0:
        raise BuildError("image", f"the new root filesystem does not check clean: {fsck.stdout.strip()[-200:]}")


def _used_inodes(image: Path, env: dict[str, str]) -> list[int]:
    """Inodes in use, from dumpe2fs's per-group free ranges."""
    out = _run(["dumpe2fs", str(image)], env, "dumpe2fs")
    per_group = int(re.search(r"^Inodes per group:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    groups = re.findall(r"^\s+Free inodes: ?(.*)$", out, re.M)
    used = []
    for index, ranges in enumerate(groups):
        first, last = index * per_group + 1, (index + 1) * per_group
        free = set()
        for part in filter(None, (r.strip() for r in ranges.split(","))):
            lo, _, hi = part.partition("-")
            free.update(range(int(lo), int(hi or lo) + 1))
        used.extend(i for i in range(max(first, 11), last + 1) if i not in free)
    return [2, *used]


def _fix_inodes(image: Path, epoch: int, owners: dict[str, int], env: dict[str, str]) -> None:
    commands = []
    for ino in _used_inodes(image, env):
        for field, value in (("ctime", f"@{epoch}"), ("ctime_extra", "0"), ("crtime", f"@{epoch}"),
                             ("crtime_extra", "0"), ("atime", f"@{epoch}"), ("atime_extra", "0"),
                             ("uid", "0"), ("gid", "0")):
            commands.append(f"sif <{ino}> {field} {value}")
    for path, uid in sorted(owners.items()):
        if any(c.isspace() for c in path):
            raise BuildError("image", f"owner path {path!r} contains white space")
        commands += [f"sif {path} uid {uid}", f"sif {path} gid {uid}"]
    script = image.with_suffix(".debugfs")
    script.write_text("\n".join(commands) + "\n")
    try:
        out = _run(["debugfs", "-w", "-f", str(script), str(image)], env, "debugfs")
    finally:
        script.unlink(missing_ok=True)
    errors = [line for line in out.splitlines() if "sif" not in line and line.strip() and "debugfs" not in line]
    if errors:
        raise BuildError("image", f"debugfs: {errors[0]}")


def make_initramfs(tree: Path, out: Path, epoch: int) -> None:
    """newc cpio of ``tree``: sorted names, owner root, mtimes ``epoch``."""
    normalize_times(tree, epoch)
    names = sorted(
        os.path.relpath(os.path.join(root, name), tree)
        for root, dirs, files in os.walk(tree)
        for name in dirs + files
    )
    with out.open("wb") as f:
        try:
            proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
                                  input="\n".join(names) + "\n", cwd=tree, stdout=f, stderr=subprocess.PIPE,
                                  text=True, timeout=TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BuildError("image", f"cpio did not finish within {TOOL_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise BuildError("image", f"cpio: {proc.stderr.strip()}", "run `mvmctl bootstrap` to install cpio")


def _run(argv: list[str], env: dict[str, str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                              timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError:
        raise BuildError("image", f"{argv[0]} is not installed", "run `mvmctl bootstrap`") from None
    except subprocess.TimeoutExpired:
        raise BuildError("image", f"{what} did not finish within {TOOL_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        reason = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        message = f"{what}: {reason[-1] if reason else 'failed'}"
        fix = "free disk space under $MVM_HOME" if "No space" in proc.stderr else None
        raise BuildError("image", message, fix)
    return proc.stdout + proc.stderr
