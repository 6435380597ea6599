"""The agent's entry point: choose the channel, refuse root. /init calls ``main()`` from
/usr/lib/mvm with ``python3 -E -s -S -c`` (no site, no runpy); ``python3 -m agent`` works too.

Signals are set through _signal, the C module (signal.py builds enums at import). /init's
own argv is read without argparse (with gettext and re behind it, a tenth of a second
under TCG, before the agent can answer anything): ``quick_args`` takes exactly the forms
/init and the tests write; anything else (``--help``, a mistake) goes to argparse, which says
what is wrong. tests/unit/test_agent.py holds the two to the same answers.
"""

from __future__ import annotations

import os
import sys
from _signal import SIG_DFL, SIGINT, SIGQUIT, signal

from . import __doc__ as AGENT_DOC
from . import system
from .serve import serve_fd, serve_port, serve_vsock

CHANNELS = ("--port", "--fd", "--vsock")


class Args:
    """The parsed argv: one channel, and who commands run as."""

    def __init__(self, port: str | None = None, fd: int | None = None, vsock: int | None = None,
                 exec_uid: int | None = None, allow_root_for_tests: bool = False) -> None:
        self.port, self.fd, self.vsock = port, fd, vsock
        self.exec_uid, self.allow_root_for_tests = exec_uid, allow_root_for_tests

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Args) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Args({vars(self)})"


def quick_args(argv: list[str]) -> Args | None:
    """``--port PATH | --fd N | --vsock PORT``, ``--exec-uid UID`` and ``--allow-root-for-tests``,
    each at most once, values as separate words; None for anything else (argparse decides)."""
    values: dict[str, str | bool] = {}
    words = iter(argv)
    for word in words:
        if word in values:
            return None
        if word == "--allow-root-for-tests":
            values[word] = True
            continue
        if word not in (*CHANNELS, "--exec-uid"):
            return None
        value = next(words, None)
        if value is None or value.startswith("-"):
            return None
        if word != "--port" and not (value.isascii() and value.isdigit()):
            return None
        values[word] = value
    if sum(channel in values for channel in CHANNELS) != 1:
        return None

    def number(key: str) -> int | None:
        return int(values[key]) if key in values else None  # type: ignore[arg-type]

    port = values.get("--port")
    return Args(port=port if isinstance(port, str) else None, fd=number("--fd"), vsock=number("--vsock"),
                exec_uid=number("--exec-uid"), allow_root_for_tests=bool(values.get("--allow-root-for-tests")))


def parse_args(argv: list[str]) -> Args:
    """argparse's answer: the same Args as quick_args where that has one, else usage or an error."""
    import argparse

    parser = argparse.ArgumentParser(prog="agent", description=AGENT_DOC)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="the virtio-serial device, e.g. /dev/vport0p1 (or a unix socket "
                                      "to connect to); reopened after every disconnect")
    where.add_argument("--fd", type=int, help="an inherited, connected descriptor; served until EOF")
    where.add_argument("--vsock", type=int, metavar="PORT",
                       help="listen on this AF_VSOCK port (Firecracker); hosts are served one at a time")
    parser.add_argument("--exec-uid", type=int, metavar="UID",
                        help="run exec and console commands as this uid (default: the agent's own)")
    parser.add_argument("--allow-root-for-tests", action="store_true",
                        help="tests on the host run as root; in a guest the agent never is")
    return Args(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    system.IMPORTED.append(system.uptime())  # every module the agent needs to answer is loaded by now
    argv = sys.argv[1:] if argv is None else argv
    args = quick_args(argv) or parse_args(argv)
    if os.getuid() == 0 and not args.allow_root_for_tests:
        print("mvm agent: refusing to run as root", file=sys.stderr)
        return 2
    if args.exec_uid is not None:
        system.EXEC_UID.append(args.exec_uid)
    # /init starts us as a background job, and ash makes those ignore SIGINT and SIGQUIT;
    # ignored signals survive exec, so without this no process we start could be ^C'd.
    signal(SIGINT, SIG_DFL)
    signal(SIGQUIT, SIG_DFL)
    if args.fd is not None:
        serve_fd(args.fd)
    elif args.vsock is not None:
        serve_vsock(args.vsock)
    else:
        serve_port(args.port)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
