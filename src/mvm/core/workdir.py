"""A workload's place on the host: its mvm.toml (or the Python file that declares it), and the
lock the builder keeps beside it.

Commands take a directory, the mvm.toml itself, or a declaration: ``app.py`` (its only
``@mvm.app``) or ``app.py:NAME`` (the function ``NAME``'s). These say which file that means
and where its lock lives: ``mvm.lock`` beside an mvm.toml; ``app.mvm.lock`` beside ``app.py``
(``app.NAME.mvm.lock`` for ``app.py:NAME``), so a declaration never shares a lock with an
mvm.toml in the same directory, nor two declarations in one file with each other.
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST_FILE = "mvm.toml"
LOCK_FILE = "mvm.lock"
DECLARATION_SUFFIX = ".py"

_SELECTOR = re.compile(r"^(?P<file>.+\.py):(?P<app>[A-Za-z_][A-Za-z0-9_]*)$")


def declaration(path: str | Path) -> tuple[Path, str | None] | None:
    """``(file, app)`` when ``path`` names a Python declaration (``app.py`` or ``app.py:NAME``),
    else None (a directory or an mvm.toml). Decided from the name alone: nothing is read."""
    text = str(path)
    match = _SELECTOR.match(text)
    if match is not None and not Path(text).exists():
        return Path(match["file"]), match["app"]
    given = Path(text)
    if given.suffix == DECLARATION_SUFFIX and not given.is_dir():
        return given, None
    return None


def manifest_file(path: str | Path) -> Path:
    """The file that describes the workload at ``path``: a directory's mvm.toml, the mvm.toml
    itself, or the Python file of a declaration (without its ``:NAME``)."""
    declared = declaration(path)
    if declared is not None:
        return declared[0]
    given = Path(path)
    return given / MANIFEST_FILE if given.is_dir() else given


def manifest_dir(path: str | Path) -> Path:
    """Where the workload's lock lives and its relative paths start: beside its file."""
    return manifest_file(path).parent


def lock_file(path: str | Path) -> Path:
    """The package lock of the workload at ``path`` (see the module docstring)."""
    declared = declaration(path)
    if declared is None:
        return manifest_dir(path) / LOCK_FILE
    file, app = declared
    stem = file.name[: -len(DECLARATION_SUFFIX)]
    return file.parent / (f"{stem}.{app}.{LOCK_FILE}" if app else f"{stem}.{LOCK_FILE}")
