"""A workload's directory on the host: its mvm.toml, and the mvm.lock the builder keeps beside it.

Commands take either the directory or the mvm.toml itself; these say which file that means.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_FILE = "mvm.toml"
LOCK_FILE = "mvm.lock"


def manifest_file(path: str | Path) -> Path:
    """The mvm.toml that ``path`` names: a workload directory's, or the file itself."""
    given = Path(path)
    return given / MANIFEST_FILE if given.is_dir() else given


def manifest_dir(path: str | Path) -> Path:
    """Where the workload's mvm.lock lives and its relative paths start: beside its mvm.toml."""
    return manifest_file(path).parent
