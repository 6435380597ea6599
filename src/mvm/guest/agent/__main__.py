"""``python3 -m agent``, as /init starts it from /usr/lib/mvm: choose the channel, refuse root."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from . import __doc__ as AGENT_DOC
from . import system
from .serve import serve_fd, serve_port, serve_vsock


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    if os.getuid() == 0 and not args.allow_root_for_tests:
        print("mvm agent: refusing to run as root", file=sys.stderr)
        return 2
    if args.exec_uid is not None:
        system.EXEC_UID.append(args.exec_uid)
    # /init starts us as a background job, and ash makes those ignore SIGINT and SIGQUIT;
    # ignored signals survive exec, so without this no process we start could be ^C'd.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    if args.fd is not None:
        serve_fd(args.fd)
    elif args.vsock is not None:
        serve_vsock(args.vsock)
    else:
        serve_port(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
