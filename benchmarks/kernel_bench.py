"""Cold boot with Debian's cloud kernel vs mvm's own (build/kernel_source.py), same image
otherwise: `mvmctl up` to agent-ready, the agent's own start, and QEMU's memory per idle VM."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from common import FOREVER_TOML, Bench, banner, fmt_ms, row, status_kib, timed_up


def bench_kernel(bench: Bench) -> None:
    n = bench.rounds
    ours_dir = bench.work / "forever-ownk"
    ours_dir.mkdir(exist_ok=True)
    (ours_dir / "mvm.toml").write_text(FOREVER_TOML.replace('name = "bench"', 'name = "benchk"\nkernel = "mvm"'))
    debian_dir = bench.work / "forever-debk"
    debian_dir.mkdir(exist_ok=True)
    (debian_dir / "mvm.toml").write_text(FOREVER_TOML.replace('name = "bench"', 'name = "benchd"\nkernel = "debian"'))
    bench.mvm("build", str(debian_dir))
    started = time.monotonic()
    bench.mvm("build", str(ours_dir))
    banner(f"cold boot: Debian's kernel (initramfs + modules) vs mvm's own (built in), same image ({n} each, "
           f"alternated; building ours took {time.monotonic() - started:.0f} s here)")
    ready: dict[str, list[float]] = {"debian": [], "mvm": []}
    for _ in range(n):
        for kind, directory in (("debian", debian_dir), ("mvm", ours_dir)):
            _, part = timed_up(bench, f"kern-{kind}", "qemu", directory)
            if part is not None:
                ready[kind].append(part)
    for kind in ("debian", "mvm"):
        row(f"QEMU spawn -> agent-ready, {kind} kernel", fmt_ms(ready[kind]))
        starts = [b["agent-ready"] - b["agent-started"] for b in bench.boot_markers.get(f"kern-{kind}", [])
                  if "agent-ready" in b and "agent-started" in b]
        inits = [b["init"] for b in bench.boot_markers.get(f"kern-{kind}", []) if "init" in b]
        if inits:
            row(f"  of which QEMU spawn -> /init ({kind})", f"{statistics.median(inits):7.0f} ms")
        if starts:
            row(f"  of which agent-started -> agent-ready ({kind})", f"{statistics.median(starts):7.0f} ms")
    if ready["debian"] and ready["mvm"]:
        ours, theirs = statistics.median(ready["mvm"]), statistics.median(ready["debian"])
        ratio = ours / theirs
        row("ratio mvm kernel / debian kernel", f"{ratio:7.2f} x")
        bench.target("kernel: ours / Debian's, QEMU spawn -> agent-ready",
                     f"{ratio:.2f}x ({ours:.2f} s vs {theirs:.2f} s)", ratio <= 0.5, "<= 0.5x")
        bench.target("kernel: ours, QEMU spawn -> agent-ready", f"{ours:.2f} s", ours <= 1.0, "<= 1.0 s goal")
    _idle_memory(bench, debian_dir, ours_dir)


def _idle_memory(bench: Bench, debian_dir: Path, ours_dir: Path) -> None:
    kib: dict[str, dict[str, int]] = {}
    for kind, directory in (("debian", debian_dir), ("mvm", ours_dir)):
        name = f"kmem-{kind}"
        bench.mvm("up", str(directory), "--name", name, "--hypervisor", "qemu")
        time.sleep(1)  # let the guest settle after boot
        kib[kind] = status_kib(bench.record(name)["qemu_pid"])
        bench.mvm("down", "--force", name)
    for kind, values in kib.items():
        row(f"QEMU memory per idle VM, {kind} kernel",
            f"RSS {values.get('VmRSS', 0) / 1024:5.1f} MiB, Pss {values.get('Pss', 0) / 1024:5.1f} MiB")
