"""A named VM's data disk outlives the VM: `down` and `up` of the same name keep what /data held.

The disk itself lives in ``$MVM_HOME/disks/<name>.ext4`` (a directory, ``<name>.d``, on
docker, whose /data is a bind mount); the VM's directory holds only a symlink to it where the
backend looks (``data.ext4`` / ``data``). So everything that removes a VM's directory (`down`,
a stopped VM's cleanup, the next `up` of the name, `prune`) removes the link, never the data;
only `down --purge` and `prune --disks` remove the disk.

A new disk is made by the backend in the VM's hidden directory, as before, and moved to
disks/ before the VM's process starts (nothing has it open yet). An SDK sandbox (ephemeral)
keeps nothing, so its disk stays in its directory and goes with it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mvm.core.errors import UsageError
from mvm.core.state import MvmHome, VmPaths
from mvm.runtime.backends.base import Progress, VmBackend


def kept_path(home: MvmHome, name: str, location: Path) -> Path:
    """disks/<name>.ext4 for a disk image, disks/<name>.d for a directory (docker)."""
    return home.disks / f"{name}{location.suffix or '.d'}"


def attach_kept(home: MvmHome, backend: VmBackend, staged: VmPaths, name: str,
                progress: Progress | None = None) -> bool:
    """Before the backend prepares the VM: link the kept disk of ``name``, if there is one, to
    where the backend looks (it then uses it instead of making one). True when it did."""
    location = backend.data_location(staged)
    kept = kept_path(home, name, location)
    try:
        info = kept.lstat()
    except FileNotFoundError:
        return False
    wanted = stat.S_ISDIR if kept.suffix == ".d" else stat.S_ISREG
    if not wanted(info.st_mode) or info.st_uid != os.getuid():
        raise UsageError(f"{kept} is not a data disk mvm made (a {'directory' if kept.suffix == '.d' else 'file'} "
                         "of yours is expected)", f"remove it, or `mvmctl down {name} --purge`")
    location.symlink_to(kept)
    if progress:
        progress(f"reattached VM {name}'s data disk {kept} (kept since its last `down`)")
    return True


def keep_new(home: MvmHome, backend: VmBackend, staged: VmPaths, name: str) -> Path | None:
    """After the backend made a new disk in the hidden directory: move it to disks/ and leave
    a link. Returns where it went (the caller removes it if this start then fails)."""
    location = backend.data_location(staged)
    if location.is_symlink() or not location.exists():
        return None
    kept = kept_path(home, name, location)
    home.disks.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.rename(location, kept)
    location.symlink_to(kept)
    return kept


def purge(home: MvmHome, name: str) -> list[Path]:
    """Remove the kept data disks of ``name`` (any backend's); returns what was removed."""
    import shutil

    removed = []
    for kept in (home.disks / f"{name}.ext4", home.disks / f"{name}.d"):
        if kept.is_symlink() or kept.is_file():
            kept.unlink()
        elif kept.is_dir():
            shutil.rmtree(kept)
        else:
            continue
        removed.append(kept)
    return removed
