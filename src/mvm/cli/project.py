"""Which project directory a command means: DIRECTORY, or ``--flake DIR`` (the
documentation's spelling of the same thing), else the current directory. DIRECTORY may also
be a Python declaration, ``app.py`` or ``app.py:NAME`` (core.workdir says which file and lock
that means; core.declaration reads it without running it)."""

from __future__ import annotations

from pathlib import Path

import click

from mvm.core.errors import UsageError

FLAKE_OPTION = click.option(
    "--flake", metavar="DIR", type=click.Path(),
    help="The project directory (the one with mvm.toml and flake.nix); `--flake .` is this one.")


def project_dir(directory: str | None, flake: str | None) -> str:
    if directory is not None and flake is not None and Path(directory).resolve() != Path(flake).resolve():
        raise UsageError(f"two project directories: {directory} and --flake {flake}", "give one of them")
    return directory or flake or "."
