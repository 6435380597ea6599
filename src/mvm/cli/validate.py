"""``mvmctl validate``: check an mvm.toml (or a Python declaration) without building anything.

It runs the same loader as ``build`` so a manifest that validates is one the builder will
accept; mistakes surface as ManifestError, which the CLI shell prints as one line (exit 2).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from mvm.core.arch import is_native
from mvm.core.manifest import load_declaration, load_manifest
from mvm.core.sizes import MIB, format_size
from mvm.core.workdir import declaration
from mvm.core.workload import EntrypointKind, Workload


@click.command()
@click.argument("directory", default=".", type=click.Path(path_type=Path), metavar="[DIR | APP.py[:NAME]]")
@click.option("--json", "as_json", is_flag=True, help="Print the whole validated workload as JSON.")
def validate(directory: Path, as_json: bool) -> None:
    """Check DIR/mvm.toml (default: the current directory) and summarise it.

    DIR may also be the path of the manifest file itself, or a Python file with an
    `@mvm.app(...)` declaration (APP.py:NAME picks the function NAME when it has several):
    the file is parsed, never imported or run, and only literal arguments are taken.
    `mvm.nix_packages` passes here but `build` refuses it. On success this prints the
    workload's name, entrypoint, whether the image is sealed or accessible, uids,
    vCPUs, memory and packages; with --json it prints the full workload (the IR the
    builder consumes). On a mistake it prints one line naming the field and the fix,
    and exits with status 2.

    \b
    Examples:
      mvmctl validate examples/hello
      mvmctl validate --json . | jq .entrypoint
    """
    nix = None
    if declaration(directory) is not None:
        declared = load_declaration(directory)
        workload, nix = declared.workload, declared.nix_packages
    else:
        workload = load_manifest(directory)
    if as_json:
        record = workload.model_dump(mode="json")
        if nix is not None:
            record["nix_packages"] = list(nix)
        click.echo(json.dumps(record, indent=2))
        return
    rows = summary(workload)
    if nix is not None:
        rows = [(label, value) for label, value in rows if label != "packages"]
        refused = "(no Nix builder in this version: build refuses it)"
        rows.append(("packages", f"nix: {', '.join(nix) or '(none)'} {refused}"))
    for label, value in rows:
        click.echo(f"{label:<11} {value}")


def summary(workload: Workload) -> list[tuple[str, str]]:
    """The lines a person checks first: what runs, as whom, with what resources."""
    rows = [
        ("name", workload.name),
        ("entrypoint", _entrypoint(workload)),
        ("image", "accessible (dev: console allowed)" if workload.accessible else "sealed"),
        ("uids", f"agent {workload.uids.agent}, entrypoint {workload.uids.entrypoint}"),
        ("vcpus", str(workload.vcpus)),
        ("memory", format_size(workload.memory_mib * MIB)),
        ("arch", workload.arch + ("" if is_native(workload.arch) else " (emulated on this host)")),
    ]
    if workload.data_disk_bytes is not None:
        rows.append(("data disk", format_size(workload.data_disk_bytes)))
    rows.append(("packages", ", ".join(workload.packages) or "(none)"))
    if workload.extra_files:
        rows.append(("files", ", ".join(f.path for f in workload.extra_files)))
    network = workload.network.mode.value
    if network == "open":
        network += " (ordinary outbound networking: QEMU's user-mode network, docker's bridge)"
    elif network == "allow-list":
        network += f" (checked on the host; allow {', '.join(workload.network.allow) or 'nothing'})"
    if workload.network.forward:
        forwards = (
            f"{f.host_addr}:{f.host_port}->{f.guest_port}" for f in workload.network.forward
        )
        network += "; forward " + ", ".join(forwards)
    rows.append(("network", network))
    for volume in workload.volumes:
        access = "ro" if volume.readonly else "rw"
        rows.append(("volume", f"{volume.host} -> {volume.guest} ({access}; checked when up/run starts it)"))
    if workload.hypervisor != "auto":
        rows.append(("hypervisor", workload.hypervisor))
    return rows


def _entrypoint(workload: Workload) -> str:
    entry = workload.entrypoint
    if entry.kind is EntrypointKind.SHELL:
        return f"shell {entry.shell}"
    if entry.kind is EntrypointKind.COMMAND:
        return "command " + shlex.join(entry.command or ())
    names = ", ".join(f"{s.name} ({s.restart.value})" for s in entry.services)
    return f"services {names}"


COMMANDS = [validate]
