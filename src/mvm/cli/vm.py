"""VM lifecycle verbs: up, down, wait, detach, pause, resume, forward (cli/vm_state.py reads
a VM's state: ls, status, logs, boot-report)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from mvm.build import stamps
from mvm.cli.network import network_options
from mvm.cli.project import FLAKE_OPTION, project_dir
from mvm.core.bootimage import BootImage, PortForward, parse_host
from mvm.core.errors import UsageError
from mvm.core.sizes import format_size, parse_mib
from mvm.core.state import DamagedVm, MvmHome, check_vm_name_quietly
from mvm.runtime import backends, lifecycle
from mvm.runtime.allow_list import with_network
from mvm.runtime.boot_phases import boot_phases

MAX_STOP_TIMEOUT_S = 3600.0


def resources(cpus: int | None, memory: str | None) -> tuple[int | None, int | None]:
    if cpus is not None and cpus < 1:
        raise UsageError(f"--cpus: {cpus} must be at least 1")
    try:
        return cpus, (parse_mib(memory) if memory else None)
    except ValueError as err:
        raise UsageError(f"--memory: {err}") from None


ALLOW_STUB_OPTION = click.option(
    "--allow-stub", is_flag=True,
    help="Start an image whose artifact does not record mvm's real agent (agent_binary = 'real'); refused otherwise.")
OVERCOMMIT_OPTION = click.option(
    "--overcommit", is_flag=True,
    help="Boot even if --cpus is more than the host's CPU threads, or --memory more than it has available "
         "less 1 GiB kept for the host and builder (refused otherwise, before booting).")

HYPERVISOR_OPTION = click.option(
    "--hypervisor", type=click.Choice(["auto", *backends.ALL_BACKENDS]),
    help="Backend to run on (default: mvm.toml's, else the first available of firecracker > qemu > docker).")


VOLUME_OPTION = click.option(
    "-v", "--volume", "volume_specs", multiple=True, metavar="HOST:GUEST[:ro|rw]",
    help="Share host directory HOST at GUEST in the guest, read-only unless :rw (repeatable; besides mvm.toml's "
         "[[volumes]]). HOST must be inside the workload's directory.")
BROAD_MOUNT_OPTION = click.option(
    "--allow-broad-mount", is_flag=True,
    help="Allow a volume of /, your home directory, or a directory outside the workload's (refused otherwise).")


def volume_options(project: str, specs: tuple[str, ...], allow_broad: bool) -> dict[str, Any]:
    """What start_vm/make_plan take for -v and --allow-broad-mount (-v HOST is relative to the
    current directory; the workload's directory is where mvm.toml or APP.py is)."""
    from mvm.runtime import volumes

    return {"volumes": tuple(volumes.parse_option(spec) for spec in specs),
            "workload_dir": volumes.workload_dir_of(project), "allow_broad_mount": allow_broad}


POLICY_OPTION = click.option(
    "--policy", "policies", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
    help="An admission policy to hold the plan to, besides $MVM_HOME/policy.toml (repeatable; docs/audit.md).")


def print_plan(home: MvmHome, directory: str, name: str | None, as_json: bool, *, policies: tuple[str, ...] = (),
               volumes: tuple[Any, ...] = (), workload_dir: Path | None = None, allow_broad_mount: bool = False,
               network: tuple[str | None, tuple[str, ...]] = (None, ()), **options: Any) -> None:
    """--dry-run: the admitted plan (or the rule that refuses it); nothing is started or built
    (a workload not built yet is planned from its mvm.toml, and says so). ``network``:
    `--network`/`--allow`, planned over the image's own as `up` would start it."""
    from mvm.runtime.allow_list import with_network
    from mvm.runtime.plan import admit, make_plan, unbuilt_image

    image, workload = stamps.lookup(home, directory), None
    if image is None:
        from mvm.core.manifest import load_manifest

        parsed = load_manifest(directory)
        workload = json.loads(parsed.canonical_json())
        image = unbuilt_image(Path(directory), workload)
    image = with_network(image, *network)
    mounts = lifecycle.check_volumes(home, image, volumes, workload_dir, allow_broad_mount)
    plan = admit(home, make_plan(home, image, name=name or image.name, workload=workload, mounts=mounts, **options),
                 policies, sealed=image.sealed, dry_run=True)
    lifecycle.refuse_unenforced_settings(image)  # as `up` would, after admission
    click.echo(json.dumps(plan.as_dict(), indent=2) if as_json else "\n".join(plan.lines()))


def note(message: str) -> None:
    click.echo(f"mvmctl: {message}", err=True)


def boot_image(directory: str, home: MvmHome) -> BootImage:
    """The image of the workload in ``directory``: found by its stamp when nothing changed
    since it was built (no pydantic, no builder imports before QEMU starts), else built now."""
    image = stamps.lookup(home, directory)
    if image is None:
        from mvm.cli.build import build_workload

        _, result = build_workload(directory, home=home)
        image = BootImage.open(result.artifact.path)
    return image


@click.command()
@click.argument("directory", required=False, type=click.Path())
@FLAKE_OPTION
@click.option("-d", "--detach", is_flag=True, help="Accepted for symmetry with run: up always returns once the VM is up.")
@click.option("--name", help="The VM's name (default: the workload's name).")
@click.option("--cpus", type=int, help="vCPUs (default: the image's).")
@click.option("--memory", metavar="SIZE", help="Memory, e.g. 512M (default: the image's).")
@OVERCOMMIT_OPTION
@ALLOW_STUB_OPTION
@HYPERVISOR_OPTION
@click.option("-p", "--publish", multiple=True, metavar="[ADDR:]HOST:GUEST",
              help="Forward a host TCP port (on 127.0.0.1 unless ADDR says) to a port on the guest's loopback.")
@click.option("--snapshot", "snapshot_tag", metavar="TAG",
              help="Start a clone of snapshot TAG instead of booting (needs --name; no DIRECTORY).")
@click.option("--cold", is_flag=True, help="Boot even when a template of this image exists (`mvmctl template build`).")
@click.option("--json", "as_json", is_flag=True, help="Print the VM's record as JSON.")
@click.option("--receipt", is_flag=True, help="Print the id of the start's audit record (stderr; with --json, a "
                                               "'receipt' field).")
@click.option("--dry-run", is_flag=True, help="Print the admitted plan (what would run, where, how) and start nothing.")
@VOLUME_OPTION
@BROAD_MOUNT_OPTION
@POLICY_OPTION
@network_options
def up(directory: str | None, flake: str | None, detach: bool, name: str | None, cpus: int | None,
       memory: str | None, overcommit: bool, hypervisor: str | None, publish: tuple[str, ...],
       snapshot_tag: str | None, cold: bool, as_json: bool, receipt: bool, dry_run: bool,
       policies: tuple[str, ...], allow_stub: bool, network_mode: str | None, allow_entries: tuple[str, ...],
       volume_specs: tuple[str, ...], allow_broad_mount: bool) -> None:
    """Build the guest in DIRECTORY if needed and start it in the background.

    DIRECTORY may instead be APP.py (or APP.py:NAME): a Python file with an `@mvm.app(...)`
    declaration, read without running it.

    Returns once the guest's agent answers, so `mvmctl exec` works straight after. The VM
    keeps running until `mvmctl down NAME` (or until its entrypoint ends). When a template
    of the image exists (`mvmctl template build`), the VM is a clone of it rather than a
    fresh boot, unless --cold.
    """
    vcpus, memory_mib = resources(cpus, memory)
    forwards = tuple(PortForward.parse(spec) for spec in publish)
    home = MvmHome.default()
    receipts: list[str] = []
    if (network_mode or allow_entries) and snapshot_tag is not None:
        raise UsageError("--network and --allow go with a boot from a workload, not with --snapshot",
                         "leave them out (a clone keeps its snapshot's network)")
    mounting = volume_options(project_dir(directory, flake), volume_specs, allow_broad_mount)
    if dry_run:
        if snapshot_tag is not None:
            raise UsageError("--dry-run plans a boot; a clone of a snapshot is not planned here",
                             "`mvmctl snapshot inspect TAG` shows what a clone would start from")
        print_plan(home, project_dir(directory, flake), name, as_json, vcpus=vcpus, memory_mib=memory_mib,
                   hypervisor=hypervisor, forwards=forwards, overcommit=overcommit, policies=policies,
                   network=(network_mode, allow_entries), **mounting)
        return
    if snapshot_tag is not None:
        if volume_specs:
            raise UsageError("-v: a clone of a snapshot cannot mount volumes", "boot the workload instead, with -v")
        if directory is not None or flake is not None:
            raise UsageError("--snapshot starts from a saved VM, not from a workload directory",
                             "leave DIRECTORY out, or leave --snapshot out")
        if name is None:
            raise UsageError("--snapshot needs --name for the new VM", f"e.g. `mvmctl up --snapshot {snapshot_tag} "
                                                                        "--name copy1`")
        from mvm.runtime import cloning

        record = cloning.clone(home, cloning.CloneRequest(snapshot_tag, name, vcpus, memory_mib, hypervisor,
                                                          forwards=forwards, policies=policies, overcommit=overcommit,
                                                          on_receipt=receipts.append), progress=note)
    else:
        image = boot_image(project_dir(directory, flake), home)
        name = name or image.name
        from mvm.runtime import cloning

        if network_mode or allow_entries:  # (a template's guest booted with mvm.toml's network: boot afresh)
            image, cold = with_network(image, network_mode, allow_entries), True
        cold = cold or bool(volume_specs or image.volumes)  # (a template's clones carry no volumes)
        template = None if cold else cloning.template_to_clone(home, image, hypervisor=hypervisor, vcpus=vcpus,
                                                               memory_mib=memory_mib)
        if template is not None:
            record = cloning.clone(home, cloning.CloneRequest(template, name, forwards=forwards, policies=policies,
                                                              overcommit=overcommit, on_receipt=receipts.append),
                                   progress=note)
        else:
            record = lifecycle.up(home, image, name=name, vcpus=vcpus, memory_mib=memory_mib, hypervisor=hypervisor,
                                  progress=note, forwards=forwards, overcommit=overcommit,
                                  on_receipt=receipts.append, policies=policies, allow_stub=allow_stub, **mounting)
    vm_name = record.name
    if receipt and not as_json:
        note(f"receipt {receipts[0] if receipts else 'none (no audit record was written)'}")
    if as_json:
        click.echo(json.dumps({**asdict(record), **({"receipt": receipts[0] if receipts else None} if receipt else {})},
                              indent=2))
    elif record.state == "stopped":
        click.echo(f"VM {vm_name} ran to the end before its agent was ready: {record.stop_reason} "
                   f"(`mvmctl logs {vm_name}` shows its output)")
    else:
        ready = boot_phases(record)["agent-ready"] or 0
        origin = f"; a clone of snapshot {record.snapshot}" if record.snapshot else ""
        origin += "; network OPEN" if record.network == "open" else ""
        origin += f"; network allow-list ({len(record.allow)} entries)" if record.network == "allow-list" else ""
        click.echo(f"VM {vm_name} is up ({record.backend}/{record.accel}, {record.arch}, {record.vcpus} vCPU, "
                   f"{record.memory_mib} MiB; agent ready {ready / 1000:.2f} s after {record.backend} started{origin})")
        for forward in lifecycle.list_forwards(home, vm_name):
            click.echo(f"  {forward.host} -> guest port {forward.guest_port}")
        for volume in record.volumes:
            click.echo(f"  volume {volume['host']} -> {volume['guest']} ({'ro' if volume['readonly'] else 'rw'})")


@click.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Kill the VM at once instead of asking the guest to shut down.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for a graceful shutdown before killing the VM.")
@click.option("--purge", is_flag=True, help="Also remove its data disk (kept otherwise, for the next `up` of NAME).")
def down(name: str, force: bool, timeout: float, purge: bool) -> None:
    """Stop VM NAME and remove everything it kept on disk (overlay, log, sockets, record).

    Its data disk (mvm.toml's data_disk) is kept in $MVM_HOME/disks/ and reattached by the
    next `up` of the same name; --purge removes it too.
    """
    if not 0 <= timeout <= MAX_STOP_TIMEOUT_S:  # (also refuses inf and nan)
        raise UsageError(f"--timeout {timeout:g}: must be 0 to {MAX_STOP_TIMEOUT_S:.0f} seconds")
    record = lifecycle.down(MvmHome.default(), name, force=force, timeout=timeout, purge=purge)
    if record is None:
        click.echo(f"VM {name}'s kept data disk is removed")
    elif isinstance(record, DamagedVm):
        click.echo(f"VM {name} is removed (its record was damaged: {record.why})")
    elif record.suspended:
        click.echo(f"VM {name} is removed, with what `pause --to-disk` saved of it"
                   + ("; its data disk too" if purge else ""))
    else:
        click.echo(f"VM {name} is down ({record.stop_reason or 'stopped'})"
                   + ("; its data disk is removed" if purge else ""))


@click.command()
@click.argument("name")
def wait(name: str) -> None:
    """Wait for VM NAME to stop; exit with its entrypoint's status (any VM: attached or not)."""
    home = MvmHome.default()
    _, current = lifecycle.require_vm(home, name)
    if current.running and current.mode == "detached":
        click.echo(f"mvmctl: VM {name} is detached: waiting anyway until it stops (`mvmctl down {name}` stops it)",
                   err=True)
    record = lifecycle.wait_vm(home, name)
    if record.exit_status is None:
        click.echo(f"VM {name} stopped without an entrypoint status: {record.stop_reason}", err=True)
        sys.exit(1)
    sys.exit(record.exit_status)


@click.command()
@click.argument("name")
def detach(name: str) -> None:
    """Let VM NAME outlive the `mvmctl run` attached to it."""
    home = MvmHome.default()
    _, record = lifecycle.require_vm(home, name)
    if record.running and record.mode == "detached":
        click.echo(f"VM {name} is already detached: it keeps running; `mvmctl down {name}` stops it")
        return
    lifecycle.detach(home, name)
    click.echo(f"VM {name} is detached: it keeps running; `mvmctl down {name}` stops it")


@click.command()
@click.argument("name")
@click.option("--to-disk", is_flag=True,
              help="Save the VM to disk and stop it, freeing its memory; `mvmctl resume` brings it back.")
def pause(name: str, to_disk: bool) -> None:
    """Freeze VM NAME (its vCPUs, or its container's processes); `mvmctl resume` thaws it.

    With --to-disk the VM is saved (memory, devices, disk) and stopped: it takes no host
    memory, and comes back with its processes by `mvmctl resume`, even after the host has
    rebooted. The saved files hold the guest's memory (0600, under $MVM_HOME/snapshots/).
    """
    if to_disk:
        from mvm.runtime import cloning

        saved = cloning.suspend_vm(MvmHome.default(), name)
        click.echo(f"VM {name} is suspended to disk ({format_size(saved.size)}); `mvmctl resume {name}` "
                   "brings it back")
        return
    _set_paused(name, True)


@click.command()
@click.argument("name")
def resume(name: str) -> None:
    """Thaw VM NAME after `mvmctl pause`, or start it again after `mvmctl pause --to-disk`."""
    home = MvmHome.default()
    _, record = lifecycle.require_vm(home, name)
    if record.suspended and not record.running:
        from mvm.runtime import cloning

        record = cloning.resume_suspended(home, name)
        click.echo(f"VM {name} is {record.state} again (resumed from disk)")
        return
    _set_paused(name, False)


def _set_paused(name: str, paused: bool) -> None:
    home = MvmHome.default()
    _, record = lifecycle.require_vm(home, name)
    backends.get(record.backend).require("pause_resume", name)
    with lifecycle.connect(home, name) as client:
        state = client.call("pause" if paused else "resume")["state"]
    click.echo(f"VM {name} is {state}")


@click.command()
@click.argument("name")
@click.argument("specs", metavar="[[ADDR:]HOST:GUEST]...", nargs=-1)
@click.option("-p", "--publish", multiple=True, metavar="[ADDR:]HOST:GUEST", help="A forward (repeatable); the same as a positional one.")
@click.option("--json", "as_json", is_flag=True, help="With `forward ls`: print the forwards as JSON.")
def forward(name: str, specs: tuple[str, ...], publish: tuple[str, ...], as_json: bool) -> None:
    """Forward host TCP ports to VM NAME's loopback ports while it runs; list and remove them.

    \b
      mvmctl forward web -p 8080:80 -p 127.0.0.1:8443:443    add (or: mvmctl forward web 8080:80)
      mvmctl forward ls web [--json]                         list
      mvmctl forward rm web 8080                             remove (HOST, or ADDR:HOST)

    Binds 127.0.0.1 unless ADDR says otherwise ([::1]:8080:80 for IPv6). The connection is
    carried by the guest's agent, so the guest needs no network interface (the default-deny
    network stays). Removing a forward closes the connections it carries.
    """
    home = MvmHome.default()
    if name in ("ls", "rm") and specs and check_vm_name_quietly(specs[0]) and not publish:
        if name == "ls":
            if len(specs) != 1:
                raise UsageError("forward ls takes one VM name", "e.g. `mvmctl forward ls web`")
            _list_forwards(home, specs[0], as_json)
        else:
            if len(specs) != 2 or as_json:
                raise UsageError("forward rm takes a VM name and a host port", "e.g. `mvmctl forward rm web 8080`")
            _remove_forward(home, specs[0], specs[1])
        return
    if as_json:
        raise UsageError("--json goes with `forward ls`", f"`mvmctl forward ls {name} --json`")
    all_specs = [*specs, *publish]
    if not all_specs:
        raise UsageError("forward needs a port: [ADDR:]HOST:GUEST", f"e.g. `mvmctl forward {name} -p 8080:80`")
    port_forwards = [PortForward.parse(s) for s in all_specs]
    _, record = lifecycle.require_vm(home, name)
    backends.get(record.backend).require("port_forwarding", name)
    with lifecycle.connect(home, name) as client:
        for port_forward in port_forwards:
            lifecycle.add_forward(client, port_forward)
            click.echo(f"{port_forward.host} -> VM {name} port {port_forward.guest_port}")


def _list_forwards(home: MvmHome, name: str, as_json: bool) -> None:
    forwards = lifecycle.list_forwards(home, name)
    if as_json:
        click.echo(json.dumps([asdict(f) for f in forwards], indent=2))
    elif not forwards:
        click.echo(f"VM {name} has no forwards (add one with `mvmctl forward {name} -p HOST:GUEST`)")
    else:
        for f in forwards:
            click.echo(f"{f.host} -> VM {name} port {f.guest_port}")


def _remove_forward(home: MvmHome, name: str, host: str) -> None:
    addr, port = parse_host(host)
    with lifecycle.connect(home, name) as client:
        lifecycle.remove_forward(client, port, addr)
    click.echo(f"VM {name}: host port {host} is no longer forwarded")


COMMANDS = [up, down, wait, detach, pause, resume, forward]
