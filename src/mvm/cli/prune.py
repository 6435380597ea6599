"""`mvmctl prune` and `mvmctl manifest-prune DIR`: free what nothing uses, and say how much."""

from __future__ import annotations

import json

import click

from mvm.build import stamps
from mvm.cli.project import project_dir
from mvm.core.errors import UsageError
from mvm.core.state import MvmHome
from mvm.runtime import prune as pruning
from mvm.runtime.transfer import printable


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def show(report: pruning.PruneReport, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    verb = "would remove" if report.dry_run else "removed"
    for item in report.removed:
        click.echo(f"{verb} {item.kind:<8} {printable(item.name)}  ({item.bytes} bytes)")
    for item in report.kept:
        if item["kind"] in ("disk", "image", "artifact"):
            click.echo(f"kept {item['kind']:<8} {printable(item['name'])}: {printable(item['why'])}")
    for note in report.notes:
        click.echo(f"note: {printable(note)}")
    freed = report.freed_bytes
    click.echo(f"{'would free' if report.dry_run else 'freed'} {freed} bytes ({_mib(freed)})")


@click.command()
@click.option("--dry-run", is_flag=True, help="Say what would be removed, and remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) removed, and why things were kept, as JSON.")
@click.option("--disks", is_flag=True, help="Also remove data disks kept for VM names that are not running.")
def prune(dry_run: bool, as_json: bool, disks: bool) -> None:
    """Remove what nothing uses: stopped VMs' files, store artifacts no running VM, snapshot,
    ref or stamp names, docker images mvm imported from artifacts that are gone, cached .debs
    no kept artifact's lock names, and scratch files of mvm processes that are gone.

    Nothing a running VM or a snapshot uses is removed. Kept data disks (`up` of the same name
    reattaches them) go only with --disks.
    """
    show(pruning.prune(MvmHome.default(), dry_run=dry_run, disks=disks), as_json)


@click.command(name="manifest-prune")
@click.argument("directory", required=False, type=click.Path())
@click.option("--dry-run", is_flag=True, help="Say what would be removed, and remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) removed as JSON.")
def manifest_prune(directory: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove the older builds of the project in DIRECTORY (default: here), keeping its newest.

    Each build of a directory takes a slot; this removes the artifacts of all but the newest,
    unless a running VM, a snapshot, a ref, or another project's newest build uses them.
    """
    home = MvmHome.default()
    path = project_dir(directory, None)
    builds = stamps.project_builds(home, path)
    if not builds:
        raise UsageError(f"no builds of {path} are recorded", f"`mvmctl build {path}` first")
    newest, older = builds[-1], builds[:-1]
    others = {}
    for file in sorted((home.store / "projects").glob("*")):
        if file != stamps.project_file(home, path) and (slots := stamps.read_slots(file)):
            others[slots[-1]] = "another project's newest build"
    report = pruning.remove_artifacts(home, older, dry_run=dry_run, also_used=others, project=str(path))
    if not dry_run:
        removed = {item.path for item in report.removed if item.kind == "artifact"}
        still = [k for k in older if str(home.store / k) not in removed and (home.store / k).is_dir()]
        stamps.keep_builds(home, path, [*still, newest])
    show(report, as_json)


COMMANDS = [prune, manifest_prune]
