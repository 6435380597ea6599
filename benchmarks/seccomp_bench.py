"""What QEMU's seccomp filter (`-sandbox on`, runtime/backends/qemu.py) costs under TCG: `mvmctl
up` to agent-ready and `mvmctl exec VM -- true`, with the filter and without it (the
benchmark-only MVM_QEMU_SECCOMP_OFF_FOR_BENCHMARK=1, honoured for dev images only), alternated
round by round. Each VM's QEMU is checked in /proc for the filter it was meant to have."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from common import MVMCTL, Bench, banner, dev_forever, median, row, run_quiet, samples

EXECS_PER_BOOT = 4


def seccomp_mode(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return int(line.split()[1])
    return None


def bench_seccomp(bench: Bench) -> None:
    from mvm.runtime.backends import qemu

    directory = dev_forever(bench)
    run_quiet([*MVMCTL, "build", str(directory)], bench.env)
    kinds = {"with -sandbox on": bench.env, "without": {**bench.env, qemu.SECCOMP_OFF_FOR_BENCHMARK: "1"}}
    ups: dict[str, list[float]] = {k: [] for k in kinds}
    ready: dict[str, list[float]] = {k: [] for k in kinds}
    execs: dict[str, list[float]] = {k: [] for k in kinds}
    banner(f"seccomp: QEMU with vs without -sandbox on ({bench.rounds} boots each, alternated; "
           f"{EXECS_PER_BOOT} execs per boot)")
    for _ in range(bench.rounds):
        for label, env in kinds.items():
            started = time.perf_counter()
            subprocess.run([*MVMCTL, "up", str(directory), "--name", "bs", "--hypervisor", "qemu"], env=env,
                           check=True, capture_output=True, stdin=subprocess.DEVNULL)
            ups[label].append(time.perf_counter() - started)
            try:
                record = bench.record("bs")
                filtered = seccomp_mode(record["qemu_pid"]) == 2
                if filtered != (label == "with -sandbox on"):
                    raise SystemExit(f"seccomp bench: QEMU of the {label!r} VM has seccomp {filtered}")
                markers = {m["phase"]: m["ms"] for m in reversed(record["markers"])}
                if markers.get("agent-ready") is not None:
                    ready[label].append(markers["agent-ready"] / 1000)
                run_quiet([*MVMCTL, "exec", "bs", "--", "true"], env)  # (untimed: the first after a boot is slow)
                for _ in range(EXECS_PER_BOOT):
                    execs[label].append(run_quiet([*MVMCTL, "exec", "bs", "--", "true"], env))
            finally:
                bench.mvm("down", "--force", "bs", check=False)
    for label in kinds:
        row(f"{label}: up (to agent-ready, as mvmctl returns)", f"{median(ups[label]) * 1000:7.0f} ms median")
        if ready[label]:
            row(f"{label}: QEMU spawn -> agent-ready (markers)", f"{median(ready[label]) * 1000:7.0f} ms median")
        row(f"{label}: exec -- true", f"{median(execs[label]) * 1000:7.1f} ms median")
        samples(f"{label}, up (s)", ups[label])
        samples(f"{label}, exec (ms)", [x * 1000 for x in execs[label]])
    up_cost = (median(ups["with -sandbox on"]) - median(ups["without"])) * 1000
    exec_cost = (median(execs["with -sandbox on"]) - median(execs["without"])) * 1000
    row("cost of -sandbox on (median difference)", f"up {up_cost:+.0f} ms, exec {exec_cost:+.1f} ms")
    bench.target("seccomp: -sandbox on, up and exec -- true vs without", f"up {up_cost:+.0f} ms, exec "
                 f"{exec_cost:+.1f} ms", None, "measured, no target")
