"""Snapshot, template and fork verbs: save a running VM, start clones of it, copy it live."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import click

from mvm.cli.project import FLAKE_OPTION, project_dir
from mvm.core.errors import UsageError
from mvm.core.sizes import format_size
from mvm.core.state import MvmHome
from mvm.runtime import cloning
from mvm.runtime.snapshot import TAG, Snapshot, SnapshotStore

SECRET_NOTE = ("The files hold the guest's memory, and with it any secret the guest held: they are "
               "private to you (0600) under $MVM_HOME/snapshots/.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def snapshot() -> None:
    """Save running VMs and list, inspect or remove what was saved.

    \b
      mvmctl snapshot create web --tag web-ready
      mvmctl up --snapshot web-ready --name web2    # a clone, in a fraction of a boot
      mvmctl snapshot ls
      mvmctl snapshot rm web-ready
    """


@snapshot.command("create", help=f"""Save VM NAME (memory, devices and disk) as a snapshot.

The VM runs on afterwards (or stops, with --stop). Clones start from it with `mvmctl up
--snapshot TAG`. {SECRET_NOTE}""")
@click.argument("name")
@click.option("--tag", help="The snapshot's name (default: NAME and the time).")
@click.option("--stop", is_flag=True, help="Stop the VM once it is saved, instead of letting it run on.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot's manifest as JSON.")
def create(name: str, tag: str | None, stop: bool, as_json: bool) -> None:
    home = MvmHome.default()
    tag = tag or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    saved = cloning.snapshot_vm(home, name, tag, stop=stop)
    if as_json:
        click.echo(json.dumps(_summary(saved), indent=2))
        return
    click.echo(f"snapshot {saved.tag} of VM {name}: {format_size(saved.size)} on disk "
               f"({saved.manifest.kind}), {time.monotonic() - started:.2f} s; VM {name} "
               f"{'stopped' if stop else 'runs on'}")


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def ls(as_json: bool) -> None:
    """List snapshots, with the clones running from each."""
    home = MvmHome.default()
    found = SnapshotStore(home).list()
    users = cloning.clones_by_snapshot(home)
    rows = [_summary(s, users.get(s.tag, [])) if isinstance(s, Snapshot) else
            {"tag": s.tag, "damaged": s.reason} for s in found]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no snapshots (`mvmctl snapshot create NAME` makes one)")
        return
    click.echo(f"{'TAG':<28}{'PURPOSE':<10}{'IMAGE':<16}{'MEMORY':<8}{'SIZE':<10}{'CREATED':<21}CLONES")
    for row in rows:
        if "damaged" in row:
            click.echo(f"{row['tag']:<28}damaged: {row['damaged']}")
            continue
        click.echo(f"{row['tag']:<28}{row['purpose']:<10}{row['image']:<16}{row['memory_mib']}M{'':<4}"
                   f"{format_size(row['size']):<10}{row['created']:<21}{', '.join(row['clones']) or '-'}")


@snapshot.command("inspect")
@click.argument("tag")
def inspect(tag: str) -> None:
    """Show snapshot TAG's signed manifest, after checking its signature and every file."""
    home = MvmHome.default()
    saved = SnapshotStore(home).load(tag)
    body = saved.manifest.to_dict()
    body["verified"] = ("signature and sha256 of every file match (hypervisor_version is checked against the "
                        "QEMU that loads it, as a clone starts)")
    body["clones"] = cloning.clones_by_snapshot(home).get(tag, [])
    click.echo(json.dumps(body, indent=2))


@snapshot.command("rm")
@click.argument("tags", nargs=-1, required=True)
def rm(tags: tuple[str, ...]) -> None:
    """Remove snapshots. One that a running clone still uses is refused."""
    home = MvmHome.default()
    for tag in tags:
        cloning.remove_snapshot(home, tag)
        click.echo(f"removed snapshot {tag}")


def _summary(saved: Snapshot, clones: list[str] | None = None) -> dict[str, Any]:
    m = saved.manifest
    return {"tag": m.tag, "purpose": m.purpose, "kind": m.kind, "source_vm": m.source_vm,
            "image": m.artifact_name, "artifact_key": m.artifact_key, "backend": m.backend, "accel": m.accel,
            "vcpus": m.vcpus, "memory_mib": m.memory_mib, "size": saved.size,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at)),
            "clones": clones or [], "path": str(saved.dir)}


@click.command()
@click.argument("name")
@click.option("--count", type=int, default=1, show_default=True, help="How many copies (1-64).")
@click.option("--name-prefix", help="Copies are named PREFIX-1, PREFIX-2, ... (default: NAME-fork).")
@click.option("--json", "as_json", is_flag=True, help="Print each copy's outcome as JSON.")
def fork(name: str, count: int, name_prefix: str | None, as_json: bool) -> None:
    """Make live copies of running VM NAME: its processes, its files, everything.

    Each copy gets its own disk, agent channel, entropy, clock, hostname and machine-id,
    and succeeds or fails on its own. The snapshot they start from is kept while any of them
    runs. Exits 1 if any copy failed.
    """
    home = MvmHome.default()
    saved, results = cloning.fork_vm(home, name, count, prefix=name_prefix)
    if as_json:
        click.echo(json.dumps({"snapshot": saved.tag, "copies": [
            {"name": r.name, "ok": r.error is None, "error": r.error,
             "record": asdict(r.record) if r.record else None} for r in results]}, indent=2))
    else:
        for result in results:
            click.echo(f"{result.name}: {'running' if result.error is None else 'failed: ' + result.error}")
    if any(r.error for r in results):
        raise SystemExit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def template() -> None:
    """Templates: a workload booted once and saved, so that `up` starts it from memory."""


@template.command("build", help=f"""Build the workload in DIRECTORY, boot it until its agent answers, snapshot it as TAG
and stop it. Afterwards `mvmctl up DIRECTORY` starts from this template whenever the image
is unchanged (`up --cold` boots instead). {SECRET_NOTE}""")
@click.argument("directory", required=False, type=click.Path())
@FLAKE_OPTION
@click.option("--tag", help="The template's name (default: the workload's name + '-template').")
def template_build(directory: str | None, flake: str | None, tag: str | None) -> None:
    from mvm.cli.vm import boot_image, note

    home = MvmHome.default()
    image = boot_image(project_dir(directory, flake), home)
    started = time.monotonic()
    if tag is None and not TAG.fullmatch(f"{image.name}-template"):
        raise UsageError(f"the default template tag {image.name + '-template'!r} is not a valid tag",
                         "give one with --tag (1-64 lowercase letters, digits, '.', '_' or '-')")
    saved = cloning.build_template(home, image, tag or f"{image.name}-template", progress=note)
    click.echo(f"template {saved.tag} of image {image.name}: {format_size(saved.size)} on disk, "
               f"{time.monotonic() - started:.1f} s; `mvmctl up` of this image now starts from it")


COMMANDS = [snapshot, fork, template]

