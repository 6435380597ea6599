"""Verbs that work inside a running VM through its agent: exec, console, cp, fs."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from mvm.cli.exec_run import run_exec
from mvm.cli.terminal import interactive, write_stdout
from mvm.core.errors import UsageError, VmError
from mvm.core.state import MvmHome
from mvm.runtime import lifecycle, transfer


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "env_pairs", multiple=True, metavar="K=V", help="Set an environment variable (repeatable).")
@click.option("--cwd", metavar="DIR", help="Working directory in the guest (default /).")
@click.option("--timeout", type=float, metavar="S", help="Kill the command after S seconds (exit 137).")
@click.option("-i", "--interactive", "stdin", is_flag=True, help="Stream this terminal's stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run the command on a pseudo-terminal.")
@click.option("--receipt", is_flag=True, help="Print the id of the command's audit record on stderr.")
def exec_(name: str, argv: tuple[str, ...], env_pairs: tuple[str, ...], cwd: str | None, timeout: float | None,
          stdin: bool, tty: bool, receipt: bool) -> None:
    """Run ARGV in VM NAME (after `--`); its exit status becomes mvmctl's.

    \b
      mvmctl exec web -- uname -a
      echo hi | mvmctl exec -i web -- cat
      mvmctl exec -it web -- /bin/sh
    """
    sys.exit(run_exec(name, argv, env_pairs, cwd, timeout, stdin, tty, receipt))


@click.command()
@click.argument("name")
@click.option("--command", "command", metavar="CMD", help="Run CMD (a shell command line) instead of a login shell.")
def console(name: str, command: str | None) -> None:
    """An interactive shell in VM NAME on a pseudo-terminal (accessible images only).

    Sealed images have no console: the request is refused before connecting.
    """
    home = MvmHome.default()
    _, record = lifecycle.require_vm(home, name)
    if record.sealed:
        refused = UsageError(f"VM {name} runs a sealed image, which has no console",
                             "use `mvmctl exec`, or build with dev = true for an accessible image")
        # (a try at a sealed VM's console is worth knowing of afterwards: it is recorded too)
        lifecycle.audit_action(home, "console", name=name, vm=record, error=refused, detail={"refused": "sealed"})
        raise refused
    with lifecycle.connect(home, name) as client:
        result = interactive(client, ["/bin/sh", "-c", command] if command else None, kind="console")
    sys.exit(result.exit_status)


@click.command()
@click.argument("source")
@click.argument("dest")
@click.option("--receipt", is_flag=True, help="Print the ids of the copy's audit records (one per file) on stderr.")
def cp(source: str, dest: str, receipt: bool) -> None:
    """Copy files or directories between the host and a VM, keeping modes.

    \b
      mvmctl cp ./site web:/data/site      host -> guest
      mvmctl cp web:/var/log/app.log .     guest -> host
    """
    home = MvmHome.default()
    src_vm, src_path = transfer.split_vm_path(source)
    dst_vm, dst_path = transfer.split_vm_path(dest)
    if (src_vm is None) == (dst_vm is None):
        raise UsageError("cp copies between the host and a VM: exactly one side must be NAME:/path",
                         "e.g. `mvmctl cp file.txt web:/tmp/` or `mvmctl cp web:/etc/hostname .`")
    if dst_vm is not None:
        with lifecycle.connect(home, dst_vm) as client:
            transfer.copy_in(client, Path(src_path), dst_path)
            receipts, warnings = client.receipts, client.audit_warnings
    else:
        assert src_vm is not None
        target = Path(dst_path)
        if not target.parent.is_dir():
            raise UsageError(f"{dst_path}: the host directory {target.parent} does not exist")
        with lifecycle.connect(home, src_vm) as client, _stopped_like_ctrl_c():
            skipped = transfer.copy_out(client, src_path, target)
            receipts, warnings = client.receipts, client.audit_warnings
        for line in transfer.describe_skipped(skipped):
            click.echo(f"mvmctl: {line}", err=True)
    for warning in warnings:
        click.echo(f"mvmctl: warning: this copy is not in the audit log: {warning}", err=True)
    if receipt:
        for record_id in receipts or ["none (no audit record was written)"]:
            click.echo(f"mvmctl: receipt {record_id}", err=True)


@click.command()
@click.argument("name")
@click.argument("action", type=click.Choice(["ls", "cat", "rm", "mkdir", "stat"]))
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="rm: remove a directory and its contents.")
@click.option("--json", "as_json", is_flag=True, help="ls, stat: print JSON.")
def fs(name: str, action: str, path: str, recursive: bool, as_json: bool) -> None:
    """Look at and change VM NAME's files: ls, cat, rm, mkdir, stat PATH."""
    if not path.startswith("/"):
        raise UsageError(f"{path}: guest paths must be absolute", f"write /{path}")
    with lifecycle.connect(MvmHome.default(), name) as client:
        if action == "cat":
            client.read_file(path, write_stdout)
        elif action == "rm":
            client.call("remove", path=path, recursive=recursive)
        elif action == "mkdir":
            client.call("mkdir", path=path, parents=True)
        elif action == "stat":
            info = client.call("stat", path=path).get("stat")
            if not isinstance(info, dict):
                raise VmError(f"VM {name} answered stat of {path} with no stat")
            click.echo(json.dumps(info, indent=2) if as_json else
                       f"{transfer.printable(str(info.get('name')))}: {transfer.printable(str(info.get('type')))}, "
                       f"{info.get('size')} bytes, mode {transfer.file_mode_text(info.get('mode'), info.get('type'))}, "
                       f"uid {info.get('uid')}")
        else:
            entries = client.call("list", path=path).get("entries")
            if not isinstance(entries, list):
                raise VmError(f"VM {name} answered ls of {path} with no list")
            if as_json:
                click.echo(json.dumps(entries, indent=2))
            for entry in [] if as_json else [e for e in entries if isinstance(e, dict)]:
                name_text = transfer.printable(shlex.quote(str(entry.get("name"))))
                size = entry.get("size") if isinstance(entry.get("size"), int) else "?"
                click.echo(f"{transfer.file_mode_text(entry.get('mode'), entry.get('type'))} {size:>10} "
                           f"{name_text}{'/' if entry.get('type') == 'dir' else ''}")


COMMANDS = [exec_, console, cp, fs]


@contextmanager
def _stopped_like_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP end a copy out as Ctrl-C does, so its half-written temporary file is
    removed (``timeout 10 mvmctl cp web:/big .`` otherwise left one, as large as it had got)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
