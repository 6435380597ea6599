"""A project directory to its image: found by its stamp when nothing changed since it was
built, else loaded and built now (and stamped). The CLI and the SDK both come here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mvm.build import stamps
from mvm.core.bootimage import BootImage
from mvm.core.state import MvmHome
from mvm.core.workdir import lock_file, manifest_dir, manifest_file

if TYPE_CHECKING:
    from mvm.build.builder import BuildResult
    from mvm.core.manifest import ManifestOverrides
    from mvm.core.workload import Workload

Progress = Callable[[str, str], None]  # (phase, detail)


def build_project(path: str | Path, overrides: ManifestOverrides | None = None, *, home: MvmHome,
                  progress: Progress | None = None, no_cache: bool = False) -> tuple[Workload, BuildResult]:
    """Load mvm.toml (or a Python declaration: ``app.py``, ``app.py:NAME``) and build. A build
    from the workload alone (no overrides) leaves a stamp."""
    from mvm.build.builder import Builder
    from mvm.core.manifest import ManifestOverrides, load_manifest

    manifest = None
    if overrides is None or overrides == ManifestOverrides():
        try:
            manifest = manifest_file(path).read_bytes()
        except OSError:
            pass  # missing or unreadable: load_manifest says so in one line
    workload = load_manifest(path, overrides=overrides)
    builder = Builder(home, progress) if progress is not None else Builder(home)
    result = builder.build(workload, manifest_dir(path), no_cache=no_cache, lock_path=lock_file(path))
    if manifest is not None:
        stamps.record(home, path, manifest, result.artifact.meta.key)
    return workload, result


def image_for(path: str | Path, home: MvmHome, progress: Progress | None = None) -> BootImage:
    """The image of the project at ``path``, built first when its stamp does not match."""
    image = stamps.lookup(home, path)
    if image is None:
        _, result = build_project(path, home=home, progress=progress)
        image = BootImage.open(result.artifact.path)
    return image
