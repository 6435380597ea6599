"""``mvmctl run``: build if needed, boot, stream the console, exit with the entrypoint's status."""

from __future__ import annotations

import os
import selectors
import sys
from contextlib import nullcontext

import click

from mvm.cli.terminal import raw_terminal, write_stdout
from mvm.cli.vm import HYPERVISOR_OPTION, boot_image, boot_report_lines, note, resources
from mvm.core.state import MvmHome, VmRecord
from mvm.runtime import lifecycle
from mvm.runtime.client import VmClient

DETACH_KEY = b"\x1d"  # Ctrl-]: leave the console, which stops an attached VM


@click.command()
@click.argument("directory", default=".", type=click.Path())
@click.option("--attached/--detached", default=True, show_default=True,
              help="Attached: the VM lives as long as this command and its console is your terminal. "
                   "Detached: like `mvmctl up`.")
@click.option("--name", help="The VM's name (default: the workload's name).")
@click.option("--cpus", type=int, help="vCPUs for this run (default: the image's).")
@click.option("--memory", metavar="SIZE", help="Memory for this run, e.g. 512M (default: the image's).")
@HYPERVISOR_OPTION
@click.option("--boot-report", is_flag=True, help="After the VM stops, print when each boot phase was reached (stderr).")
def run(directory: str, attached: bool, name: str | None, cpus: int | None, memory: str | None,
        hypervisor: str | None, boot_report: bool) -> None:
    """Boot the guest in DIRECTORY (building it first if needed) and stream its console.

    The entrypoint's exit status becomes mvmctl's. Ctrl-C, or this command going away for
    any reason, stops the VM; `mvmctl detach NAME` from another terminal lets it live on.
    On an accessible image with a shell entrypoint your terminal is the guest's console:
    Ctrl-] leaves it and stops the VM.
    """
    vcpus, memory_mib = resources(cpus, memory)
    home = MvmHome.default()
    image = boot_image(directory, home)
    vm_name = name or image.name
    if not attached:
        record = lifecycle.up(home, image, name=vm_name, vcpus=vcpus, memory_mib=memory_mib,
                              hypervisor=hypervisor, progress=note)
        click.echo(f"VM {vm_name} is {record.state}; `mvmctl exec {vm_name} -- CMD` works in it, "
                   f"`mvmctl down {vm_name}` stops it")
        return
    launch = lifecycle.start_vm(home, image, name=vm_name, mode="attached", vcpus=vcpus, memory_mib=memory_mib,
                                hypervisor=hypervisor, progress=note)
    try:
        attach_id = launch.client.send({"type": "attach", "replay": True})
        launch.commit()
        interactive = image.accessible and image.entrypoint_kind == "shell"
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
