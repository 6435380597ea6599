"""``mvmctl``: the command-line shell over mvm's functions.

Each verb group lives in its own module and only parses, calls and prints. Every
:class:`~mvm.core.errors.MvmError` becomes one line on stderr and its exit code; nothing
a user can cause prints a traceback.
"""

from __future__ import annotations

import sys

import click

from mvm import __version__
from mvm.core.errors import MvmError


class MvmGroup(click.Group):
    """Turns our errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except MvmError as err:
            click.echo(f"mvmctl: error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("mvmctl: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=MvmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mvmctl")
def cli() -> None:
    """Build small Linux guests from mvm.toml and run them as microVMs.

    \b
    Typical use:
      mvmctl bootstrap          install the host tools (QEMU, e2fsprogs, ...)
      mvmctl build examples/hello
      mvmctl run examples/hello --attached
    """


def _register() -> None:
    from mvm.cli import build, host, run, validate

    for module in (host, validate, build, run):
        for command in module.COMMANDS:
            cli.add_command(command)


def main() -> None:
    _register()
    cli(prog_name="mvmctl")


if __name__ == "__main__":
    sys.exit(main())
