"""Port forwarding: the host downloads 100 MiB from a server in the guest through `mvmctl
forward` (a tunnel through the agent), and through QEMU's own `hostfwd` to the same guest
(its user-mode network, `[network] mode = "open"`), alternated; throughput and the time to a
first byte. Traffic stays on the host's loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from common import Bench, banner, median, row

SIZE = 100 << 20
GUEST_PORT = 8000
OPEN_TOML = """\
name = "fwdbench"
vcpus = 1
memory_mib = 256

[network]
mode = "open"

[entrypoint]
command = ["/bin/sh", "-c", "while :; do head -c {size} /dev/zero | nc -l -p {port} >/dev/null; done"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _download(port: int) -> tuple[float, float]:
    """(seconds to the first byte, MB/s over the whole download) from 127.0.0.1:port. The
    guest's `nc -l` serves one connection, then listens again: a connection made in between is
    closed at once, and is tried again."""
    deadline = time.monotonic() + 30
    while True:
        result = _download_once(port)
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing came from port {port} for 30 s")
        time.sleep(0.05)


def _download_once(port: int) -> tuple[float, float] | None:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    except OSError:
        return None
    started = time.perf_counter()
    first = None
    got = 0
    with sock:
        while chunk := sock.recv(1 << 20):
            if first is None:
                first = time.perf_counter() - started
            got += len(chunk)
    took = time.perf_counter() - started
    if got == 0:
        return None
    if got != SIZE:
        raise RuntimeError(f"got {got} bytes, not {SIZE}")
    return first or took, SIZE / took / 1e6


async def _hostfwd(qmp_socket: Path, host_port: int) -> None:
    from qemu.qmp import QMPClient

    qmp = QMPClient("bench")
    await qmp.connect(str(qmp_socket))
    try:
        await qmp.execute("human-monitor-command",
                          {"command-line": f"hostfwd_add tcp:127.0.0.1:{host_port}-:{GUEST_PORT}"})
    finally:
        await qmp.disconnect()


def bench_forward(bench: Bench) -> None:
    directory = bench.work / "fwdbench"
    directory.mkdir(exist_ok=True)
    (directory / "mvm.toml").write_text(OPEN_TOML.format(size=SIZE, port=GUEST_PORT))
    bench.mvm("build", str(directory))
    forwarded, raw = _free_port(), _free_port()
    bench.mvm("up", str(directory), "--hypervisor", "qemu", "--cold", "-p", f"{forwarded}:{GUEST_PORT}")
    try:
        asyncio.run(_hostfwd(bench.home / "vms" / "fwdbench" / "qmp.sock", raw))
        n = max(3, bench.rounds)
        banner(f"port forward: the host downloads {SIZE >> 20} MiB from the guest ({n} each, alternated)")
        results: dict[str, list[tuple[float, float]]] = {"mvmctl forward": [], "raw QEMU hostfwd": []}
        for _ in range(n):
            results["mvmctl forward"].append(_download(forwarded))
            results["raw QEMU hostfwd"].append(_download(raw))
        for label, samples in results.items():
            row(f"{label}: throughput", f"{median([s[1] for s in samples]):7.1f} MB/s "
                                        f"(min {min(s[1] for s in samples):.1f})")
            row(f"{label}: to the first byte", f"{median([s[0] for s in samples]) * 1000:7.1f} ms")
        ours, theirs = (median([s[1] for s in results[k]]) for k in results)
        ratio = ours / theirs
        row("ratio forward / hostfwd (throughput)", f"{ratio:7.2f} x")
        bench.target("forward: throughput vs raw QEMU hostfwd", f"{ratio:.2f}x ({ours:.0f} vs {theirs:.0f} MB/s)",
                     ratio >= 0.5, ">= 0.5x, goal 0.8x")
    finally:
        bench.mvm("down", "--force", "fwdbench", check=False)
