"""``mvmctl build``: mvm.toml -> artifact in the store."""

from __future__ import annotations

import json
import sys
import time
from typing import get_args

import click

from mvm.build.builder import BuildResult
from mvm.build.project import build_project
from mvm.cli.project import FLAKE_OPTION, project_dir
from mvm.core.artifact import ArtifactMeta
from mvm.core.bootimage import BootImage
from mvm.core.errors import BuildError
from mvm.core.manifest import ManifestOverrides
from mvm.core.state import MvmHome
from mvm.core.workdir import lock_file
from mvm.core.workload import KernelName, Workload
from mvm.runtime.backends import ALL_BACKENDS


class PhaseProgress:
    """One line per build phase on a terminal; silent when stderr is not one."""

    def __init__(self) -> None:
        self.console = None
        if sys.stderr.isatty():
            from rich.console import Console  # only worth its import time when drawn

            self.console = Console(stderr=True, highlight=False)
        self.phase: str | None = None
        self.started = time.monotonic()
        self.status = None

    def __call__(self, phase: str, detail: str) -> None:
        if self.console is None:
            return
        if phase != self.phase:
            self.finish_phase()
            self.phase, self.started = phase, time.monotonic()
            self.status = self.console.status(f"[bold]{phase}[/] {detail}")
            self.status.start()
        elif self.status is not None:
            self.status.update(f"[bold]{phase}[/] {detail}")

    def finish_phase(self) -> None:
        if self.status is not None and self.console is not None:
            self.status.stop()
            self.console.print(f"[green]✓[/] {self.phase} [dim]{time.monotonic() - self.started:.1f}s[/]")
            self.status = None


def build_workload(path: str, overrides: ManifestOverrides | None = None, *, no_cache: bool = False,
                   home: MvmHome | None = None) -> tuple[Workload, BuildResult]:
    """build/project.py's build, with progress drawn on a terminal. Shared by `build`, `up`
    and `run`."""
    from mvm.security import audit

    home = home or MvmHome.default()
    progress = PhaseProgress()
    started = time.monotonic()
    try:
        built = build_project(path, overrides, home=home, progress=progress, no_cache=no_cache)
    except BuildError as err:  # (a bad argument or manifest is refused before anything is done: no record)
        audit.record_action(home, "build", name=None, started=started, error=err, paths=[str(path)])
        raise
    finally:
        if progress.status is not None:
            progress.status.stop()
    progress.finish_phase()
    workload, result = built
    audit.record_action(home, "build", name=None, started=started, paths=[str(path)], artifact=result.artifact.meta.key,
                        detail={"workload": workload.name, "cache_hit": result.cache_hit,
                                "sealed": not workload.dev})
    return built


@click.command()
@click.argument("directory", required=False, type=click.Path())
@FLAKE_OPTION
@click.option("--vcpus", type=int, help="vCPUs the image boots with by default (overrides mvm.toml).")
@click.option("--mem", "memory", metavar="SIZE", help="Guest memory, e.g. 512M or 1G (overrides mvm.toml).")
@click.option("--data-disk", metavar="SIZE", help="Size of the /data disk each VM gets, e.g. 8G.")
@click.option("--kernel", type=click.Choice(get_args(KernelName)),
              help="The guest kernel (overrides mvm.toml's kernel): auto (the default: mvm's own once `mvmctl kernel "
                   "build` has built it, else Debian's), debian (Debian's cloud kernel, with an initramfs), or mvm "
                   "(mvm's own, compiled first if it is not cached).")
@click.option("--arch", type=click.Choice(["x86_64", "aarch64"]),
              help="The guest's CPU architecture (overrides mvm.toml's arch; default x86_64). aarch64 images are "
                   "made from Debian's arm64 packages and run under qemu-system-aarch64, emulated on an x86_64 host.")
@click.option("--no-cache", is_flag=True, help="Rebuild even when the store has this exact artifact.")
@click.option("--hypervisor", type=click.Choice(["auto", *ALL_BACKENDS]),
              help="Also prepare the image for this backend (docker: import it) and check it can run here.")
@click.option("--json", "as_json", is_flag=True, help="Print the artifact record as JSON.")
def build(directory: str | None, flake: str | None, vcpus: int | None, memory: str | None, data_disk: str | None,
          kernel: str | None, arch: str | None, no_cache: bool, hypervisor: str | None, as_json: bool) -> None:
    """Build the guest described by DIRECTORY/mvm.toml into a bootable image.

    DIRECTORY may instead be APP.py (or APP.py:NAME): a Python file whose `@mvm.app(...)`
    declaration is read without running it; its lock is APP.mvm.lock (APP.NAME.mvm.lock).

    Resolves the Debian packages (pinning them in mvm.lock beside mvm.toml), downloads them
    into a shared cache, and writes a kernel, an initramfs (none with mvm's own kernel) and a
    read-only ext4 root into the content-addressed store (~/.mvm/store, or $MVM_HOME/store). Building the same inputs
    again is a cache hit; a failed build leaves the previous image in place.
    """
    started = time.monotonic()
    directory = project_dir(directory, flake)
    overrides = ManifestOverrides(vcpus=vcpus, memory=memory, data_disk=data_disk, kernel=kernel, arch=arch)
    workload, result = build_workload(directory, overrides, no_cache=no_cache)
    meta = result.artifact.meta
    backend = prepare_backend(result, hypervisor) if hypervisor else None
    if as_json:
        record = meta.model_dump(mode="json", by_alias=True)
        record.update(path=str(result.artifact.path), cacheHit=result.cache_hit, backend=backend)
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    kind = "sealed" if meta.sealed else "accessible"
    took = time.monotonic() - started
    verb = "up to date (cache hit)" if result.cache_hit else "built"
    click.echo(f"{workload.name}: {verb} in {took:.2f}s — {kind}, {meta.entrypoint_kind.value} entrypoint, "
               f"{workload.arch}, kernel {meta.kernel_release}")
    click.echo(f"  artifact {result.artifact.path}")
    assert meta.hashes is not None
    click.echo(f"  rootfs.ext4 sha256 {meta.hashes.rootfs}")
    if result.lock_written:
        click.echo(f"  wrote {lock_file(directory)} ({len(meta.packages)} packages pinned)")
    if hint := kernel_hint(workload, meta):
        click.echo(f"  {hint}")
    if backend:
        click.echo(f"  runs on {backend}")


def kernel_hint(workload: Workload, meta: ArtifactMeta) -> str | None:
    """What to do when `kernel = "auto"` fell back to Debian's kernel where ours could be built."""
    from mvm.build import kernel_source

    if workload.kernel != "auto" or meta.kernel.get("name") != "debian" or workload.arch not in kernel_source.BUILT_ARCHES:
        return None
    return ("Debian's kernel: mvm's own boots faster and becomes the default once built "
            "(`mvmctl kernel build`, minutes, once)")


def prepare_backend(result: BuildResult, hypervisor: str) -> str:
    """The backend `up` would pick for this image, made ready (a docker image imported)."""
    from mvm.runtime import lifecycle

    home = MvmHome.default()
    image = BootImage.open(result.artifact.path)
    backend = lifecycle.choose_backend(home, image, hypervisor).backend
    backend.prepare_image(image)
    return backend.name


COMMANDS = [build]
