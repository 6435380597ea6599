"""``mvmctl run``: build if needed and boot; detached by default, or attached (stream the
console, exit with the entrypoint's status); ``-- ARGV`` instead of the entrypoint;
``--dry-run`` for the plan."""

from __future__ import annotations

import os
import selectors
import sys
import time
from contextlib import nullcontext

import click

from mvm.cli.network import network_options
from mvm.cli.project import FLAKE_OPTION, project_dir
from mvm.cli.terminal import raw_terminal, write_stdout
from mvm.cli.vm import (
    ALLOW_STUB_OPTION,
    BROAD_MOUNT_OPTION,
    HYPERVISOR_OPTION,
    OVERCOMMIT_OPTION,
    POLICY_OPTION,
    VOLUME_OPTION,
    boot_image,
    note,
    print_plan,
    resources,
    volume_options,
)
from mvm.cli.vm_state import boot_report_lines
from mvm.core.bootimage import PortForward
from mvm.core.errors import UsageError
from mvm.core.state import MvmHome, VmRecord
from mvm.runtime import lifecycle
from mvm.runtime.allow_list import with_network
from mvm.runtime.client import VmClient

DETACH_KEY = b"\x1d"  # Ctrl-]: leave the console, which stops an attached VM


class RunCommand(click.Command):
    """`run`'s words up to ``--`` are its own; what follows is the command to run in the guest
    (click alone cannot tell ``run -- python3 x.py`` from ``run python3 x.py``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta["guest_argv"] = args[cut + 1:]
            args = args[:cut]
        return super().parse_args(ctx, args)


@click.command(cls=RunCommand)
@click.argument("directory", required=False, type=click.Path())
@FLAKE_OPTION
@click.option("--attached/--detached", " /-d", default=False,
              help="Attached: stream the console; the VM lives as long as this command (Ctrl-C stops it) and "
                   "its exit status is the command's. Detached (the default): return once it has booted.")
@click.option("--detach", "detach", is_flag=True, help="The same as --detached.")
@click.option("--name", help="The VM's name (default: the workload's name).")
@click.option("--cpus", type=int, help="vCPUs for this run (default: the image's).")
@click.option("--memory", metavar="SIZE", help="Memory for this run, e.g. 512M (default: the image's).")
@OVERCOMMIT_OPTION
@ALLOW_STUB_OPTION
@HYPERVISOR_OPTION
@click.option("-p", "--publish", multiple=True, metavar="[ADDR:]HOST:GUEST",
              help="Forward a host TCP port (on 127.0.0.1 unless ADDR says) to a port on the guest's loopback.")
@click.option("--boot-report", is_flag=True, help="Print when each boot phase was reached (stderr).")
@click.option("--dry-run", is_flag=True, help="Print what would run, where and how, and start nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
@click.option("--mode", type=click.Choice(["live", "plan"]), default="live", show_default=True,
              help="plan: the argument is a Python script; run it with its sandboxes in record mode and print "
                   "the plan they would carry out (as `mvmctl plan record`).")
@click.option("--receipt", is_flag=True, help="Print the id of the start's audit record on stderr.")
@VOLUME_OPTION
@BROAD_MOUNT_OPTION
@POLICY_OPTION
@network_options
@click.pass_context
def run(ctx: click.Context, directory: str | None, flake: str | None, attached: bool, detach: bool, name: str | None,
        cpus: int | None, memory: str | None, overcommit: bool, hypervisor: str | None, publish: tuple[str, ...],
        boot_report: bool, dry_run: bool, as_json: bool, mode: str, receipt: bool, policies: tuple[str, ...],
        allow_stub: bool, network_mode: str | None, allow_entries: tuple[str, ...], volume_specs: tuple[str, ...],
        allow_broad_mount: bool) -> None:
    """Build the guest in DIRECTORY if needed and boot it; `run -- ARGV` runs ARGV instead of
    its entrypoint (as the same uid). DIRECTORY may be APP.py[:NAME], an `@mvm.app` declaration.

    \b
      mvmctl run                      detached (the default): returns once it has booted
      mvmctl run --attached           streams the console, exits with the entrypoint's status
      mvmctl run --attached -- python3 task.py
      mvmctl run --dry-run --json -- python3 task.py    the plan; nothing starts

    Attached, Ctrl-C or this command going away for any reason stops the VM; `mvmctl detach
    NAME` from another terminal lets it live on. On an accessible image with a shell
    entrypoint your terminal is the guest's console: Ctrl-] leaves it and stops the VM.
    """
    if mode == "plan":
        from mvm.cli.plan import record_script

        if directory is None or not directory.endswith(".py"):
            raise UsageError("--mode plan records a Python script", "e.g. `mvmctl run --mode plan job.py`")
        click.echo(record_script(directory, tuple(ctx.meta.get("guest_argv") or ())), nl=False)
        return
    if attached and detach:
        raise UsageError("--attached and --detach contradict each other", "give one of them")
    if as_json and not dry_run:
        raise UsageError("--json goes with --dry-run", "`mvmctl status NAME --json` describes a running VM")
    argv = ctx.meta.get("guest_argv")
    if argv is not None and not argv:
        raise UsageError("nothing follows --", "e.g. `mvmctl run -- python3 -V`")
    lifecycle.check_argv(argv)  # before any build: a command that cannot travel fails at once
    vcpus, memory_mib = resources(cpus, memory)
    forwards = tuple(PortForward.parse(spec) for spec in publish)
    home = MvmHome.default()
    mounting = volume_options(project_dir(directory, flake), volume_specs, allow_broad_mount)
    if dry_run:
        print_plan(home, project_dir(directory, flake), name, as_json, vcpus=vcpus, memory_mib=memory_mib,
                   hypervisor=hypervisor, argv=argv, forwards=forwards, overcommit=overcommit, policies=policies,
                   network=(network_mode, allow_entries), **mounting)
        return
    image = with_network(boot_image(project_dir(directory, flake), home), network_mode, allow_entries)
    vm_name = name or image.name
    receipts: list[str] = []
    if not attached:
        record = lifecycle.up(home, image, name=vm_name, vcpus=vcpus, memory_mib=memory_mib,
                              hypervisor=hypervisor, progress=note, argv=argv, forwards=forwards,
                              overcommit=overcommit, operation="run", on_receipt=receipts.append, policies=policies,
                              allow_stub=allow_stub, **mounting)
        if receipt:
            note(f"receipt {receipts[0] if receipts else 'none (no audit record was written)'}")
        if record.state == "stopped":
            click.echo(f"VM {vm_name} ran to the end before its agent was ready: {record.stop_reason} "
                       f"(`mvmctl logs {vm_name}` shows its output)")
        else:
            click.echo(f"VM {vm_name} is {record.state} (detached). Follow it: `mvmctl logs -f {vm_name}`; "
                       f"its exit status: `mvmctl wait {vm_name}`; stop it: `mvmctl down {vm_name}`")
        if boot_report:
            print_boot_report(record)
        return
    started = time.monotonic()
    launch = lifecycle.start_vm(home, image, name=vm_name, mode="attached", vcpus=vcpus, memory_mib=memory_mib,
                                hypervisor=hypervisor, progress=note, argv=argv, policies=policies,
                                overcommit=overcommit, allow_stub=allow_stub, **mounting)
    try:
        if forwards or image.forwards:  # listening before anyone is told the VM runs (replay keeps the console)
            lifecycle.add_start_forwards(launch, image, forwards)
        attach_id = launch.client.send({"type": "attach", "replay": True})
        record_id = lifecycle.audit_action(home, "run", name=vm_name, image=image, vm=launch.record, started=started,
                                           sealed=image.sealed, argv=argv, detail={"mode": "attached"})
        launch.commit()
        if receipt:
            note(f"receipt {record_id or 'none (no audit record was written)'}")
        interactive = image.accessible and image.entrypoint_kind == "shell" and argv is None
        try:
            code = follow_console(launch.client, attach_id, vm_name, sys.stdin.fileno() if interactive else None)
        except KeyboardInterrupt:
            # Like `docker run`: Ctrl-C stops the VM, and we return once it has stopped.
            click.echo(f"\nmvmctl: stopping VM {vm_name}", err=True)
            launch.client.call("stop", reason="stopped by Ctrl-C on its attached mvmctl")
            code = 130
    finally:
        launch.abandon()
        launch.client.close()
    lifecycle.wait_supervisor_gone(launch.paths)
    if boot_report:
        print_boot_report(lifecycle.wait_vm(home, vm_name))
    sys.exit(code)


def follow_console(client: VmClient, attach_id: int, name: str, stdin_fd: int | None) -> int:
    """Relay the console until the VM stops (its exit status) or is detached (0)."""
    assert client.sock is not None
    with raw_terminal(stdin_fd) if stdin_fd is not None else nullcontext(False) as is_tty:
        add_cr = is_tty  # the supervisor stores LF line ends; a raw terminal needs CRLF
        selector = selectors.DefaultSelector()
        selector.register(client.sock, selectors.EVENT_READ, "vm")
        if stdin_fd is not None:
            selector.register(stdin_fd, selectors.EVENT_READ, "stdin")
        try:
            while True:
                for key, _ in selector.select():
                    if key.data == "stdin":
                        data = os.read(stdin_fd, 4096)  # type: ignore[arg-type]
                        if DETACH_KEY in data:
                            client.send({"type": "stop", "reason": "the console user pressed Ctrl-]"})
                            selector.unregister(stdin_fd)  # type: ignore[arg-type]
                        elif data:
                            client.send({"type": "stdin", "id": attach_id}, data)
                        else:
                            selector.unregister(stdin_fd)  # type: ignore[arg-type]
                        continue
                    for frame in client.receive_batch():
                        if frame.id == attach_id and frame.type == "stdout":
                            write_stdout(frame.body.replace(b"\n", b"\r\n") if add_cr else frame.body)
                        elif frame.id == attach_id and frame.type == "exit":
                            code = frame.header.get("code")
                            if code is None:
                                click.echo(f"\nmvmctl: VM {name} stopped: {frame.header.get('reason')}", err=True)
                                return 130 if "Ctrl-" in str(frame.header.get("reason")) else 1
                            return int(code)
                        elif frame.type == "detached":
                            click.echo(f"\nmvmctl: VM {name} is detached and keeps running", err=True)
                            return 0
        finally:
            selector.close()


def print_boot_report(record: VmRecord) -> None:
    for line in boot_report_lines(record):
        click.echo(line, err=True)
    agent = next((m for m in record.markers if m["phase"] == "agent-ready"), None)
    if agent is None:
        click.echo("  agent        no hello on its channel before the VM stopped", err=True)
    else:
        click.echo(f"  agent        answered as {' '.join(agent['args'])}", err=True)


COMMANDS = [run]
