"""``mvmctl``'s entry point: the click group in cli/commands.py."""

from __future__ import annotations

import sys


def main() -> None:
    from mvm.cli.commands import cli

    cli(prog_name="mvmctl")


if __name__ == "__main__":
    sys.exit(main())
