"""``mvmctl kernel``: build mvm's own guest kernel and list the kernels in the cache."""

from __future__ import annotations

import json
import time

import click

from mvm.build import kernel_source
from mvm.cli.build import PhaseProgress
from mvm.core.state import MvmHome


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def kernel() -> None:
    """mvm's own guest kernel: Debian's linux-source-6.1 with every driver the guest needs built in.

    \b
      mvmctl kernel build           # minutes on two cores, once; cached by its config
      mvmctl kernel ls

    Images built with it need no initramfs and load no modules, so they boot faster. Once it
    is built, it is what an mvm.toml without `kernel` (kernel = "auto") boots; until then,
    and for aarch64 guests, Debian's cloud kernel. kernel = "debian" or "mvm" picks one.
    """


@kernel.command("build")
@click.option("--arch", type=click.Choice(kernel_source.ARCHES), default="x86_64", show_default=True,
              help="The guest architecture (no aarch64 config yet: aarch64 guests boot Debian's arm64 kernel).")
@click.option("--json", "as_json", is_flag=True, help="Print what was built as JSON.")
def build(arch: str, as_json: bool) -> None:
    """Build (or find in the cache) the kernel for the config in this version of mvm.

    Needs gcc, make, flex, bison, bc and libelf-dev on the host (the error says
    which are missing), and downloads Debian's linux-source-6.1 (about 140 MB) with apt.
    Compiling takes about 5 minutes on two cores; the result is cached under
    $MVM_HOME/cache/kernels/ by the digest of the config.
    """
    home = MvmHome.default()
    started = time.monotonic()
    cached = kernel_source.cached_kernel(home, arch) if arch in kernel_source.BUILT_ARCHES else None
    progress = PhaseProgress()
    try:
        built = cached or kernel_source.ensure_kernel(home, arch, progress)
    finally:
        if progress.status is not None:
            progress.status.stop()
    progress.finish_phase()
    if as_json:
        click.echo(json.dumps({**_row(built), "cacheHit": cached is not None}, indent=2))
        return
    verb = "up to date (cache hit)" if cached is not None else f"built in {time.monotonic() - started:.0f} s"
    click.echo(f"kernel {built.name}: {verb} — {built.release}, from {built.source}")
    click.echo(f"  vmlinux {built.vmlinux}")


@kernel.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def ls(as_json: bool) -> None:
    """List the kernels in the cache: ours (by config) and Debian's (by package)."""
    home = MvmHome.default()
    rows = [_row(k) for k in kernel_source.cached_kernels(home)]
    current = {kernel_source.config_digest(a) for a in kernel_source.BUILT_ARCHES}
    for row in rows:
        row["current"] = row["configDigest"] in current
    if home.kernels.is_dir():
        rows += [{"name": f"debian-{(d / 'release').read_text().strip()}", "kind": "debian",
                  "release": (d / "release").read_text().strip(), "path": str(d / "vmlinux")}
                 for d in sorted(home.kernels.iterdir()) if (d / "release").is_file() and (d / "vmlinux").is_file()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no kernels in the cache yet (`mvmctl build` unpacks Debian's; `mvmctl kernel build` builds ours)")
        return
    click.echo(f"{'NAME':<40}{'KIND':<8}{'RELEASE':<22}NOTE")
    for row in rows:
        note = ""
        if row["kind"] == "mvm":
            note = f"{'current config' if row['current'] else 'an older config'}, built in {row['seconds']:.0f} s"
        click.echo(f"{row['name']:<40}{row['kind']:<8}{row['release']:<22}{note}")


def _row(built: kernel_source.BuiltKernel) -> dict:
    return {"name": built.name, "kind": "mvm", "release": built.release, "arch": built.arch,
            "configDigest": built.config_digest, "source": built.source, "seconds": built.seconds,
            "path": str(built.vmlinux)}


COMMANDS = [kernel]
