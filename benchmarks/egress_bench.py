"""Egress: the guest downloads 100 MiB from a server on the host's loopback, through the
allow-list path (the agent's listener, the host's check and its connection, relayed in
frames) and through `open` mode (QEMU's user-mode network: the guest connects to 10.0.2.2),
alternated; throughput measured inside the guest, and the ratio. Traffic stays on the host's
loopback."""

from __future__ import annotations

import socket
import threading

from common import Bench, banner, median, row

SIZE = 100 << 20
TOML = """\
name = "{name}"
vcpus = 1
memory_mib = 256

[network]
mode = "{mode}"
{allow}
[entrypoint]
command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
"""
# Timed in the guest, so neither exec's start nor Python's counts.
DOWNLOAD = """\
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
started, got = time.perf_counter(), 0
while chunk := s.recv(1 << 20):
    got += len(chunk)
print(got, time.perf_counter() - started)
"""


class Source:
    """Sends SIZE zero bytes to every connection, then closes it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        chunk = bytes(1 << 20)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    for _ in range(SIZE // len(chunk)):
                        conn.sendall(chunk)
                except OSError:
                    pass


def _download(bench: Bench, name: str, host: str, port: int) -> float:
    """MB/s of one download in the guest."""
    proc = bench.mvm("exec", name, "--", "python3", "-c", DOWNLOAD, host, str(port))
    got, took = proc.stdout.decode().split()
    if int(got) != SIZE:
        raise RuntimeError(f"{name}: got {got} bytes, not {SIZE}")
    return SIZE / float(took) / 1e6


def bench_egress(bench: Bench) -> None:
    source = Source()
    vms = {"allow-list (agent tunnel)": ("egbench-list", "allow-list", "127.0.0.1"),
           "open (QEMU user network)": ("egbench-open", "open", "10.0.2.2")}
    try:
        for name, mode, _ in vms.values():
            directory = bench.work / name
            directory.mkdir(exist_ok=True)
            allow = f'allow = ["127.0.0.1:{source.port}"]\n' if mode == "allow-list" else ""
            (directory / "mvm.toml").write_text(TOML.format(name=name, mode=mode, allow=allow))
            bench.mvm("up", str(directory), "--hypervisor", "qemu", "--cold")
        n = max(3, bench.rounds)
        banner(f"egress: the guest downloads {SIZE >> 20} MiB from the host's loopback ({n} each, alternated)")
        results: dict[str, list[float]] = {label: [] for label in vms}
        for _ in range(n):
            for label, (name, _, host) in vms.items():
                results[label].append(_download(bench, name, host, source.port))
        for label, samples in results.items():
            row(f"{label}: throughput", f"{median(samples):7.1f} MB/s (min {min(samples):.1f})")
        ours, theirs = (median(results[label]) for label in vms)
        ratio = ours / theirs
        row("ratio allow-list / open (throughput)", f"{ratio:7.2f} x")
        bench.target("egress: allow-list throughput vs open mode", f"{ratio:.2f}x ({ours:.0f} vs {theirs:.0f} MB/s)",
                     ratio >= 0.5, ">= 0.5x, goal 0.8x (issue 17)")
    finally:
        for name, _, _ in vms.values():
            bench.mvm("down", "--force", name, check=False)
        source.sock.close()
