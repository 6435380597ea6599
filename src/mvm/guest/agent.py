"""The guest agent: serves the host over the virtio-serial port ``org.mvm.agent``.

/init starts it as uid 990 (never root) and restarts it if it dies. It answers the host's
``hello`` with its own (protocol version, its uid, the guest's uptime) and serves requests on
the same channel. A bad frame gets an ``error`` reply and the agent keeps serving.
"""

from __future__ import annotations

import argparse
import os
import time
import sys

from mvm.core import protocol


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def handle(frame: protocol.Frame) -> bytes:
    if frame.type == "hello":
        # The host speaks first: what it writes is queued for us, while what we write with
        # no host connected is lost. So every host hello gets our hello back.
        return protocol.hello("agent", uid=os.getuid(), pid=os.getpid(), uptime=uptime())
    if frame.type == "ping":
        return protocol.encode({"type": "pong", "id": frame.id, "uptime": uptime()})
    return protocol.error(frame.id, f"unknown request type {frame.type!r}")


def send(fd: int, data: bytes) -> None:
    """Write a reply; with no host connected the port refuses writes, which is not fatal."""
    try:
        os.write(fd, data)
    except OSError:
        pass


def serve(port: str) -> None:
    fd = os.open(port, os.O_RDWR)
    decoder = protocol.Decoder()
    while True:
        data = os.read(fd, 65536)
        if not data:
            # No host connected: virtio-serial reports EOF until one is. Start afresh.
            os.close(fd)
            time.sleep(0.05)
            fd = os.open(port, os.O_RDWR)
            decoder = protocol.Decoder()
            continue
        try:
            frames = decoder.feed(data)
        except protocol.ProtocolError as err:
            send(fd, protocol.error(None, str(err)))
            continue
        for frame in frames:
            send(fd, handle(frame))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", required=True, help="the virtio-serial device, e.g. /dev/vport0p1")
    args = parser.parse_args(argv)
    if os.getuid() == 0:
        print("mvm agent: refusing to run as root", file=sys.stderr)
        return 2
    serve(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
