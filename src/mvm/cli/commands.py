"""``mvmctl``'s click group: every verb, its help, and one line (not a traceback) per error.

Each verb group lives in its own module and only parses, calls and prints. Every
:class:`~mvm.core.errors.MvmError` becomes one line on stderr and its exit code; nothing
a user can cause prints a traceback. cli/main.py is the entry point that loads this.
"""

from __future__ import annotations

import importlib
import sys

import click

from mvm import __version__
from mvm.cli.failure import report_failure
from mvm.core.errors import MvmError

# verb -> module that defines it. Modules load only when their verb runs (or for --help), so
# `mvmctl run` does not pay for importing what `doctor` needs, and vice versa.
VERBS = {
    "bootstrap": "mvm.cli.host",
    "doctor": "mvm.cli.host",
    "validate": "mvm.cli.validate",
    "build": "mvm.cli.build",
    "run": "mvm.cli.run",
    "up": "mvm.cli.vm",
    "ls": "mvm.cli.vm_state",
    "status": "mvm.cli.vm_state",
    "exec": "mvm.cli.guest",
    "cp": "mvm.cli.guest",
    "fs": "mvm.cli.guest",
    "console": "mvm.cli.guest",
    "logs": "mvm.cli.vm_state",
    "boot-report": "mvm.cli.vm_state",
    "wait": "mvm.cli.vm",
    "detach": "mvm.cli.vm",
    "down": "mvm.cli.vm",
    "pause": "mvm.cli.vm",
    "resume": "mvm.cli.vm",
    "snapshot": "mvm.cli.snapshots",
    "fork": "mvm.cli.snapshots",
    "template": "mvm.cli.snapshots",
    "forward": "mvm.cli.vm",
    "network": "mvm.cli.network",
    "plan": "mvm.cli.plan",
    "prune": "mvm.cli.prune",
    "manifest-prune": "mvm.cli.prune",
    "mcp": "mvm.cli.mcp",
    "audit": "mvm.cli.audit",
    "receipt": "mvm.cli.audit",
    "perf": "mvm.cli.perf",
    "kernel": "mvm.cli.kernel",
}


class MvmGroup(click.Group):
    """Loads verbs lazily and turns our errors into one clear line instead of a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        module = importlib.import_module(VERBS[name])
        return next(c for c in module.COMMANDS if c.name == name)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (MvmError, KeyboardInterrupt) as err:
            ctx.exit(report_failure(err))

    def main(self, args=None, prog_name=None, **extra):  # type: ignore[override]
        """As click's, but a usage mistake is one line too (exit 2), like every other error."""
        extra.pop("standalone_mode", None)  # (always ours: errors end here, as one line)
        try:
            status = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as err:
            where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            sys.stderr.write(f"mvmctl: error: {err.format_message()}{where}\n")
            sys.exit(2)
        except click.ClickException as err:
            sys.stderr.write(f"mvmctl: error: {err.format_message()}\n")
            sys.exit(err.exit_code)
        except click.Abort:
            sys.exit(report_failure(KeyboardInterrupt()))
        sys.exit(status if isinstance(status, int) else 0)


@click.group(cls=MvmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mvmctl")
def cli() -> None:
    """Build small Linux guests from mvm.toml and run them as microVMs.

    \b
    Typical use:
      mvmctl bootstrap          install the host tools (QEMU, e2fsprogs, ...)
      mvmctl build examples/hello
      mvmctl run examples/hello --attached
      mvmctl up examples/python --name py && mvmctl exec py -- python3 -V && mvmctl down py
    """
