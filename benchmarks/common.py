"""Helpers shared by the benchmark sections: timing, statistics, VMs, the agent hello."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MVMCTL = [sys.executable, "-m", "mvm.cli.main"]
FOREVER_TOML = """\
# benchmarks: an entrypoint that never ends, so the VM stays up until `mvmctl down`
name = "bench"
vcpus = 1
memory_mib = 256

[entrypoint]
command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
"""


@dataclass
class Bench:
    """One run's shared state: private MVM_HOME, the environment for child processes, results."""

    work: Path
    env: dict[str, str]
    rounds: int
    docker_host: str | None = None
    summary: list[tuple[str, str, str]] = field(default_factory=list)  # (what, measured, verdict)
    boot_markers: dict[str, list[dict[str, int]]] = field(default_factory=dict)  # VM name -> {phase: ms} per `up`

    @property
    def home(self) -> Path:
        return Path(self.env["MVM_HOME"])

    @property
    def forever(self) -> Path:
        return self.work / "forever"

    def mvm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*MVMCTL, *args], env=self.env, check=check, capture_output=True,
                              stdin=subprocess.DEVNULL)

    def record(self, name: str) -> dict:
        return json.loads((self.home / "vms" / name / "record.json").read_text())

    def target(self, what: str, measured: str, met: bool | None, target: str) -> None:
        verdict = "n/a" if met is None else ("met" if met else "MISSED")
        self.summary.append((what, measured, f"{verdict} ({target})"))


def write_forever_workload(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mvm.toml").write_text(FOREVER_TOML)
    return directory


def dev_forever(bench: Bench) -> Path:
    """The forever workload as an accessible (dev) image: the benchmark-only switches (audit
    off, QEMU's seccomp off) are refused on a sealed one."""
    directory = bench.work / "forever-dev"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mvm.toml").write_text(FOREVER_TOML.replace("[entrypoint]", "dev = true\n\n[entrypoint]", 1))
    return directory


def run_quiet(argv: list[str], env: dict[str, str], check: bool = True) -> float:
    """Seconds from exec to exit."""
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def alternate_commands(bench: Bench, kinds: dict[str, list[str]], n: int) -> dict[str, list[float]]:
    """Each command ``n`` times, taking turns (A,B,A,B,...), and a row of timings per command."""
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(n):
        for label, argv in kinds.items():
            times[label].append(run_quiet(argv, bench.env))
    for label, xs in times.items():
        row(label, fmt_ms(xs))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def fmt_s(xs: list[float]) -> str:
    return f"{median(xs):7.3f} s  (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def fmt_ms(xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return f"{median(ms):7.2f} ms median, p95 {p95(ms):.2f} ms, min {min(ms):.2f} (n={len(ms)})"


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem from /proc/PID/status and Pss from smaps_rollup, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    except OSError:
        pass
    return out


def agent_hello(sock: socket.socket, deadline: float) -> dict:
    """Send the host's hello on a connected agent channel and read until the agent's hello."""
    from mvm.core import protocol

    sock.sendall(protocol.hello("host"))
    decoder = protocol.Decoder()
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(1 << 16)
        if not data:
            raise RuntimeError("the agent channel closed before the agent's hello")
        frames, _ = decoder.feed_all(data)
        for frame in frames:
            if frame.type == "hello":
                return frame.header


def connect_when_there(path: Path, deadline: float) -> socket.socket:
    """Connect to a unix socket a starting process will create (QEMU's chardev server)."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} did not appear") from None
            time.sleep(0.002)


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass


def down_all(bench: Bench) -> None:
    """`mvmctl down --force` every VM of our private home (best effort, for cleanup)."""
    vms = bench.home / "vms"
    if not vms.is_dir():
        return
    for entry in vms.iterdir():
        if entry.is_dir() and not entry.name.startswith("."):
            bench.mvm("down", "--force", entry.name, check=False)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def banner(title: str) -> None:
    print(f"\n{title}", flush=True)


def row(label: str, value: str) -> None:
    print(f"  {label:<48} {value}", flush=True)


def samples(label: str, xs: list[float]) -> None:
    """Every sample in run order, so a reader can see noise and outliers, not just the median."""
    print(f"    samples, {label}: " + " ".join(f"{x:.2f}" for x in xs), flush=True)


def env_with_src() -> None:
    src = str(REPO / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    os.environ["PYTHONPATH"] = src + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")


def timed_up(bench: Bench, name: str, hypervisor: str, directory: Path | None = None) -> tuple[float, float | None]:
    """Seconds for `mvmctl up` of the forever workload (or ``directory``) to return, and the
    backend spawn -> agent-ready part from its record (None if missing); the VM is taken down after."""
    started = time.perf_counter()
    bench.mvm("up", str(directory or bench.forever), "--name", name, "--hypervisor", hypervisor)
    took = time.perf_counter() - started
    markers = {m["phase"]: m["ms"] for m in reversed(bench.record(name)["markers"])}  # (the first of each)
    bench.boot_markers.setdefault(name, []).append(markers)
    ready = markers.get("agent-ready")
    bench.mvm("down", "--force", name)
    return took, None if ready is None else ready / 1000


def alternate_ups(bench: Bench, name: str, hypervisor: str,
                  plain: Callable[[], float]) -> tuple[list[float], list[float], list[float]]:
    """``bench.rounds`` rounds of a timed `mvmctl up` then ``plain()`` (seconds of the start it
    is compared with): the up times, their spawn -> agent-ready parts, and the plain times."""
    mvm_times: list[float] = []
    parts: list[float] = []
    plain_times: list[float] = []
    for _ in range(bench.rounds):
        took, ready = timed_up(bench, name, hypervisor)
        mvm_times.append(took)
        if ready is not None:
            parts.append(ready)
        plain_times.append(plain())
    return mvm_times, parts, plain_times



def compare_to_hello(bench: Bench, *, mvm_label: str, mvm_times: list[float], part_label: str, part: list[float],
                     other: str, other_label: str, other_times: list[float], target: str, limit: float) -> None:
    """Print `mvmctl up` against a plain start of the same guest, both to the agent's hello,
    and record the ratio against its target."""
    samples("mvmctl up", mvm_times)
    samples(other, other_times)
    ratio = median(mvm_times) / median(other_times)
    row(mvm_label, fmt_s(mvm_times))
    row(part_label, fmt_s(part) if part else "-")
    row(other_label, fmt_s(other_times))
    row(f"ratio mvmctl up / {other}", f"{ratio:7.2f} x")
    bench.target(target, f"{ratio:.2f}x ({median(mvm_times):.2f} s vs {median(other_times):.2f} s)",
                 ratio <= limit, f"<= {limit:.2f}x")


def reuse_cached_kernel(bench: Bench) -> str | None:
    """Take mvm's own kernel from the user's cache when it has the current build (compiling
    takes minutes), so the private home's default (`kernel = "auto"`) is what the user's is.
    Returns its name, or None: then images in this run boot Debian's kernel."""
    from mvm.build import kernel_source
    from mvm.core.state import MvmHome

    theirs = Path(os.environ.get("MVM_HOME") or Path.home() / ".mvm")
    found = kernel_source.cached_kernel(MvmHome(theirs))
    if found is None:
        return None
    target = MvmHome(bench.home).kernels
    if not (target / found.name).exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(found.directory, target / found.name)
    return found.name
