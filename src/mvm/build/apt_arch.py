"""apt for a guest architecture the host's apt is not configured for (arm64 on an amd64 host).

The host's apt configuration is never changed (no ``dpkg --add-architecture``): apt is run
with a private state under ``$MVM_HOME/cache/apt-<arch>`` instead: its own package lists
(filled by one ``apt-get update`` from the host's configured sources), its own package cache,
and ``APT::Architecture`` set to the guest's. For the host's own architecture nothing changes:
the host's lists are used as before.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from pathlib import Path

from mvm.core.arch import GuestArch, host_arch
from mvm.core.errors import BuildError
from mvm.core.state import MvmHome

UPDATE_TIMEOUT_S = 600
# Lists older than this are fetched again before a resolution: nobody runs `apt-get update`
# on a private state by hand, and stale lists name versions the archive has dropped.
MAX_LIST_AGE_S = 24 * 3600


def apt_state_dir(arch: GuestArch, home: MvmHome) -> Path:
    return home.root / "cache" / f"apt-{arch.debian}"


def foreign(arch: GuestArch) -> bool:
    """Whether the host's apt lists (its own architecture) cannot serve this guest."""
    return arch.name != host_arch()


def state_options(arch: GuestArch, home: MvmHome) -> list[str]:
    """apt options that point at the private state for ``arch`` (none for the host's own)."""
    if not foreign(arch):
        return []
    state = apt_state_dir(arch, home)
    return [
        "-o", f"APT::Architecture={arch.debian}",
        "-o", f"APT::Architectures={arch.debian}",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'cache'}",
    ]


def ensure_lists(arch: GuestArch, home: MvmHome, *, refresh: bool = False) -> None:
    """Fill the private package lists for ``arch`` from the host's configured sources: when
    there are none, they are over a day old, or ``refresh`` asks."""
    if not foreign(arch):
        return
    state = apt_state_dir(arch, home)
    lists = glob.glob(str(state / "lists" / "*_Packages*"))
    if not refresh and lists and time.time() - max(os.path.getmtime(p) for p in lists) < MAX_LIST_AGE_S:
        return
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    argv = ["apt-get", "-q", *state_options(arch, home), "-o", f"Dir::State::status={state / 'status'}",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "update"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
                              timeout=UPDATE_TIMEOUT_S)
    except FileNotFoundError:
        raise BuildError("resolve", "apt-get is not available; the built-in builder needs a Debian or Ubuntu host",
                         "run `mvmctl bootstrap` on a Debian/Ubuntu machine") from None
    except subprocess.TimeoutExpired:
        raise BuildError("resolve", f"apt-get update for {arch.debian} did not finish within {UPDATE_TIMEOUT_S} s",
                         "check the host's package sources and the network") from None
    errors = [line[3:].strip() for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("E: ")]
    if proc.returncode != 0 or errors or not glob.glob(str(state / "lists" / "*_Packages*")):
        reason = errors[0] if errors else "no package lists were fetched"
        raise BuildError("resolve", f"apt-get update for {arch.debian} failed: {reason}",
                         f"check that the host's apt sources serve {arch.debian} (Debian's main archive does)")
