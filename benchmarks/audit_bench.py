"""The audit chain's cost (docs/audit.md): `mvmctl exec VM -- true` on a VM whose supervisor
appends a record per exec vs one started with the benchmark-only switch that turns that off,
alternated in the same run; one append on its own; and `mvmctl audit verify` over 100,000
records."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from common import MVMCTL, Bench, alternate_commands, banner, dev_forever, fmt_ms, median, row, run_quiet


def bench_audit(bench: Bench) -> None:
    from mvm.core.state import MvmHome
    from mvm.security import audit

    off_env = {**bench.env, audit.OFF_FOR_BENCHMARK: "1"}
    dev = dev_forever(bench)  # (both on a dev image: the switch never turns off a sealed VM's audit)
    bench.mvm("up", str(dev), "--name", "ba", "--hypervisor", "qemu")
    subprocess.run([*MVMCTL, "up", str(dev), "--name", "bo", "--hypervisor", "qemu"], env=off_env,
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    time.sleep(1)
    try:
        n = bench.rounds * 8
        banner(f"audit: `mvmctl exec VM -- true` with and without its audit record ({n} each, alternated)")
        kinds = {"with the audit (a record per exec)": [*MVMCTL, "exec", "ba", "--", "true"],
                 "without (MVM_AUDIT_OFF_FOR_BENCHMARK=1)": [*MVMCTL, "exec", "bo", "--", "true"]}
        times = alternate_commands(bench, kinds, n)
        on, off = (median(xs) for xs in times.values())
        cost_ms, ratio = (on - off) * 1000, on / off - 1
        row("cost of the audit per exec (median difference)", f"{cost_ms:7.2f} ms ({ratio * 100:+.1f} %)")
        bench.target("audit: exec -- true with vs without its record", f"{cost_ms:+.2f} ms ({ratio * 100:+.1f} %)",
                     ratio < 0.03 or cost_ms < 1.0, "< 3 % or < 1 ms")
    finally:
        for name in ("ba", "bo"):
            bench.mvm("down", "--force", name, check=False)

    scratch = MvmHome(bench.work / "audit-scratch")
    entry = {"operation": "exec", "vm": "bench", "argv": ["true"], "result": "ok", "exit_status": 0,
             "actor": audit.self_actor(), "duration_ms": 12.5, "detail": {"stdout_bytes": 0, "stderr_bytes": 0}}
    audit.append(scratch, entry)
    appends = []
    for _ in range(200):
        started = time.perf_counter()
        audit.append(scratch, entry)
        appends.append(time.perf_counter() - started)
    row("one append (flock, sign, write, fdatasync, head)", fmt_ms(appends))
    while (audit.read_head(scratch) or {}).get("count", 0) < 100_000:
        audit.append(scratch, entry, durable=False)  # (test data: no fsync, or this takes minutes)
    started = time.perf_counter()
    run_quiet([*MVMCTL, "audit", "verify"], {**bench.env, "MVM_HOME": str(scratch.root)})
    seconds = time.perf_counter() - started
    row("mvmctl audit verify, 100,000 records", f"{seconds:7.2f} s ({seconds / 100_000 * 1e6:.0f} us a record)")
    bench.target("audit: verify 100,000 records", f"{seconds:.1f} s", None, "measured")
    size = sum(p.stat().st_size for p in Path(scratch.root / "audit").glob("audit*.jsonl"))
    row("their size on disk", f"{size / 1e6:7.1f} MB")
