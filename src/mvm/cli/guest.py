"""Verbs that work inside a running VM through its agent: exec, console, cp, fs."""

from __future__ import annotations

import json
import shlex
import stat
import sys
from pathlib import Path

import click

from mvm.cli.exec_run import run_exec
from mvm.cli.terminal import interactive, write_stdout
from mvm.core.errors import UsageError
from mvm.core.state import MvmHome
from mvm.runtime import lifecycle


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "env_pairs", multiple=True, metavar="K=V", help="Set an environment variable (repeatable).")
@click.option("--cwd", metavar="DIR", help="Working directory in the guest (default /).")
@click.option("--timeout", type=float, metavar="S", help="Kill the command after S seconds (exit 137).")
@click.option("-i", "--interactive", "stdin", is_flag=True, help="Stream this terminal's stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run the command on a pseudo-terminal.")
def exec_(name: str, argv: tuple[str, ...], env_pairs: tuple[str, ...], cwd: str | None, timeout: float | None,
          stdin: bool, tty: bool) -> None:
    """Run ARGV in VM NAME (after `--`); its exit status becomes mvmctl's.

    \b
      mvmctl exec web -- uname -a
      echo hi | mvmctl exec -i web -- cat
      mvmctl exec -it web -- /bin/sh
    """
    sys.exit(run_exec(name, argv, env_pairs, cwd, timeout, stdin, tty))


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
        raise UsageError(f"VM {name} runs a sealed image, which has no console",
                         "use `mvmctl exec`, or build with dev = true for an accessible image")
    with lifecycle.connect(home, name) as client:
        result = interactive(client, ["/bin/sh", "-c", command] if command else None, kind="console")
    sys.exit(result.exit_status)


@click.command()
@click.argument("source")
@click.argument("dest")
def cp(source: str, dest: str) -> None:
    """Copy files or directories between the host and a VM, keeping modes.

    \b
      mvmctl cp ./site web:/data/site      host -> guest
      mvmctl cp web:/var/log/app.log .     guest -> host
    """
    home = MvmHome.default()
    src_vm, src_path = lifecycle.split_vm_path(source)
    dst_vm, dst_path = lifecycle.split_vm_path(dest)
    if (src_vm is None) == (dst_vm is None):
        raise UsageError("cp copies between the host and a VM: exactly one side must be NAME:/path",
                         "e.g. `mvmctl cp file.txt web:/tmp/` or `mvmctl cp web:/etc/hostname .`")
    if dst_vm is not None:
        with lifecycle.connect(home, dst_vm) as client:
            lifecycle.copy_in(client, Path(src_path), dst_path)
    else:
        assert src_vm is not None
        target = Path(dst_path)
        if not target.parent.is_dir():
            raise UsageError(f"{dst_path}: the host directory {target.parent} does not exist")
        with lifecycle.connect(home, src_vm) as client:
            lifecycle.copy_out(client, src_path, target)


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
            info = client.call("stat", path=path)["stat"]
            click.echo(json.dumps(info, indent=2) if as_json else
                       f"{info['name']}: {info['type']}, {info['size']} bytes, mode {stat.filemode(_st_type(info) | info['mode'])}, uid {info.get('uid')}")
        else:
            entries = client.call("list", path=path)["entries"]
            if as_json:
                click.echo(json.dumps(entries, indent=2))
            for entry in [] if as_json else entries:
                click.echo(f"{stat.filemode(_st_type(entry) | entry['mode'])} {entry['size']:>10} "
                           f"{shlex.quote(entry['name'])}{'/' if entry['type'] == 'dir' else ''}")


def _st_type(entry: dict) -> int:
    return {"dir": stat.S_IFDIR, "link": stat.S_IFLNK, "file": stat.S_IFREG}.get(entry["type"], 0)


COMMANDS = [exec_, console, cp, fs]
