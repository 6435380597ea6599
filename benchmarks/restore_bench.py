"""Snapshot benchmarks: a clone (`up --snapshot`) against a cold `up` of the same image, both to
the agent answering; `fork --count 10`; host memory per idle clone against a cold VM; the
snapshot's size against the guest's RAM."""

from __future__ import annotations

import time
from pathlib import Path

from common import Bench, banner, fmt_s, median, row, samples

FORK_COUNT = 10


def _timed(bench: Bench, *args: str) -> tuple[float, float | None]:
    """Seconds for `mvmctl up ARGS` to return, and QEMU spawn -> agent-ready from the record."""
    name = args[args.index("--name") + 1]
    started = time.perf_counter()
    bench.mvm("up", *args)
    took = time.perf_counter() - started
    ready = next((m["ms"] for m in bench.record(name)["markers"] if m["phase"] == "agent-ready"), None)
    return took, None if ready is None else ready / 1000


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process: PSS splits pages shared by clones among them."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0])
    return fields["Rss"], fields["Pss"]


def bench_restore(bench: Bench) -> None:
    n = bench.rounds
    bench.mvm("up", str(bench.forever), "--name", "rsrc", "--hypervisor", "qemu", "--cold")
    time.sleep(1)  # let the guest settle, as the exec benchmarks do
    started = time.perf_counter()
    bench.mvm("snapshot", "create", "rsrc", "--tag", "rbench")
    snapshot_s = time.perf_counter() - started
    banner(f"start to agent-ready: `up --snapshot` (a clone) vs cold `up`, same image ({n} each, alternated)")
    clone, clone_part, cold, cold_part = [], [], [], []
    clone_phases: dict[str, list[float]] = {"restored": [], "identity": []}
    for _ in range(n):
        took, part = _timed(bench, "--snapshot", "rbench", "--name", "rclone")
        clone.append(took)
        clone_part += [part] if part is not None else []
        for marker in bench.record("rclone")["markers"]:
            if marker["phase"] in clone_phases:
                clone_phases[marker["phase"]].append(marker["ms"] / 1000)
        bench.mvm("down", "--force", "rclone")
        took, part = _timed(bench, str(bench.forever), "--name", "rcold", "--hypervisor", "qemu", "--cold")
        cold.append(took)
        cold_part += [part] if part is not None else []
        bench.mvm("down", "--force", "rcold")
    samples("clone", clone)
    samples("cold", cold)
    row("mvmctl up --snapshot (command returns)", fmt_s(clone))
    row("  of which QEMU spawn -> agent-ready", fmt_s(clone_part))
    row("    QEMU spawn -> state loaded (restored)", fmt_s(clone_phases["restored"]))
    row("    QEMU spawn -> own identity applied", fmt_s(clone_phases["identity"]))
    row("mvmctl up, cold boot (command returns)", fmt_s(cold))
    row("  of which QEMU spawn -> agent-ready", fmt_s(cold_part))
    ratio = median(cold) / median(clone)
    row("ratio cold / clone", f"{ratio:7.1f} x")
    bench.target("restore: cold up / up --snapshot", f"{ratio:.1f}x ({median(cold):.2f} s vs {median(clone):.2f} s)",
                 ratio >= 10, ">= 10x, goal 50x")
    row("snapshot create (VM runs on)", f"{snapshot_s:.2f} s")

    banner(f"fork --count {FORK_COUNT}, and memory of idle VMs")
    started = time.perf_counter()
    bench.mvm("fork", "rsrc", "--count", str(FORK_COUNT), "--name-prefix", "rfork")
    fork_s = time.perf_counter() - started
    row(f"fork --count {FORK_COUNT} (all answering)", f"{fork_s:.2f} s ({fork_s / FORK_COUNT * 1000:.0f} ms per copy)")
    bench.target(f"restore: fork --count {FORK_COUNT}", f"{fork_s:.2f} s", None, "measured")
    time.sleep(2)  # idle
    clones = [_memory_kib(bench.record(f"rfork-{i}")["qemu_pid"]) for i in range(1, FORK_COUNT + 1)]
    cold_rss, cold_pss = _memory_kib(bench.record("rsrc")["qemu_pid"])
    row("cold VM's QEMU: RSS / PSS", f"{cold_rss / 1024:.1f} / {cold_pss / 1024:.1f} MiB")
    row("a clone's QEMU: RSS / PSS (median)", f"{median([c[0] for c in clones]) / 1024:.1f} / "
                                               f"{median([c[1] for c in clones]) / 1024:.1f} MiB")
    bench.target("restore: PSS per idle clone vs cold VM",
                 f"{median([c[1] for c in clones]) / 1024:.0f} vs {cold_pss / 1024:.0f} MiB", None, "measured")
    for i in range(1, FORK_COUNT + 1):
        bench.mvm("down", "--force", f"rfork-{i}")

    directory = bench.home / "snapshots" / "rbench"
    on_disk = sum(p.stat().st_blocks * 512 for p in directory.iterdir())
    ram = bench.record("rsrc")["memory_mib"] << 20
    state = (directory / "state").stat().st_size
    row("snapshot on disk / guest RAM", f"{on_disk / 2**20:.1f} MiB / {ram / 2**20:.0f} MiB "
                                         f"(device state {state / 1024:.0f} KiB)")
    bench.mvm("down", "--force", "rsrc")
    bench.mvm("snapshot", "rm", "rbench")
