"""The SDK's templates: a built-in name ("base", "python") or a directory with an mvm.toml.

A built-in's mvm.toml ships in this package; it is copied to ``$MVM_HOME/templates/<name>/``
(where its mvm.lock is written) and built there on first use, then found by its stamp.
"""

from __future__ import annotations

from pathlib import Path

from mvm.core.errors import UsageError
from mvm.core.state import MvmHome, write_atomic

BUILT_IN = ("base", "python")
_HERE = Path(__file__).parent / "templates"


def template_dir(home: MvmHome, template: str) -> Path:
    if template in BUILT_IN:
        shipped = (_HERE / template / "mvm.toml").read_bytes()
        directory = home.root / "templates" / template
        copy = directory / "mvm.toml"
        if not copy.is_file() or copy.read_bytes() != shipped:
            write_atomic(copy, shipped)
        return directory
    directory = Path(template)
    if not (directory / "mvm.toml").is_file():
        raise UsageError(f"template {template!r} is neither a built-in ({', '.join(BUILT_IN)}) nor a directory "
                         "with an mvm.toml", "pass one of those")
    return directory
