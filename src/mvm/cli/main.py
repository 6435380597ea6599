"""``mvmctl``'s entry point.

`mvmctl exec NAME -- ARGV` is the verb people run in loops, and importing click costs more
than the round trip to the guest, so its plain forms run without click (cli/exec_argv.py reads
them). Everything else, and any exec that parser does not fully understand, goes to the click
group in cli/commands.py, which prints help and errors.
"""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "exec":
        from mvm.cli.exec_argv import parse_exec_args

        params = parse_exec_args(sys.argv[2:])
        if params is not None:
            sys.exit(exec_without_click(params))
    from mvm.cli.commands import cli

    cli(prog_name="mvmctl")


def exec_without_click(params: dict) -> int:
    """`mvmctl exec` with parsed parameters; ends as click and our group would on errors."""
    import errno

    from mvm.cli.exec_run import run_exec
    from mvm.cli.failure import end_on_broken_pipe, report_failure
    from mvm.core.errors import MvmError

    try:
        return run_exec(**params)
    except (MvmError, KeyboardInterrupt) as err:
        return report_failure(err)
    except OSError as err:
        if err.errno != errno.EPIPE:
            raise
        return end_on_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
