"""Lifecycle benchmarks: `mvmctl up` vs raw QEMU to the agent's hello, exec round trips,
in-process client round trips, and host memory per idle VM."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    MVMCTL,
    REPO,
    Bench,
    agent_hello,
    alternate_commands,
    alternate_ups,
    banner,
    compare_to_hello,
    connect_when_there,
    fmt_ms,
    median,
    p95,
    row,
    status_kib,
    stop_proc,
)

# -- 3. boot: mvmctl up vs raw qemu-system, both to the agent's hello ----------------------------


def raw_up_argv(bench: Bench, artifact_name: str) -> tuple[list[str], Path, Path]:
    """The argv mvm's launcher would give QEMU for this artifact, with our own overlay and sockets."""
    from mvm.build.store import ArtifactStore
    from mvm.core.bootimage import BootImage
    from mvm.core.state import MvmHome
    from mvm.runtime.backends import qemu

    image = BootImage.open(ArtifactStore(MvmHome(bench.home)).require(artifact_name).path)
    overlay = bench.work / "rawup-overlay.qcow2"
    overlay.unlink(missing_ok=True)
    qemu.create_overlay(image.rootfs, overlay)
    spec = qemu.image_spec(image, overlay, bench.env["MVM_ACCEL"])
    spec.agent_socket = bench.work / "rawup-agent.sock"
    spec.qmp_socket = bench.work / "rawup-qmp.sock"  # mvm passes one too
    spec.agent_socket.unlink(missing_ok=True)
    spec.qmp_socket.unlink(missing_ok=True)
    return spec.argv(), spec.agent_socket, overlay


def raw_qemu_to_hello(argv: list[str], agent_sock: Path, env: dict[str, str]) -> float:
    """Seconds from exec of QEMU to the agent's hello on the chardev socket; QEMU is then killed."""
    deadline = time.monotonic() + 120
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        sock = connect_when_there(agent_sock, deadline)
        with sock:
            agent_hello(sock, deadline)
        return time.perf_counter() - started
    finally:
        stop_proc(proc)


def bench_up(bench: Bench) -> None:
    n = bench.rounds
    banner(f"boot to agent-ready: `mvmctl up` (qemu) vs raw qemu-system, same argv ({n} each, alternated)")

    def raw_up() -> float:
        argv, sock, _ = raw_up_argv(bench, "bench")
        return raw_qemu_to_hello(argv, sock, bench.env)

    mvm_times, qemu_part, raw_times = alternate_ups(bench, "upbench", "qemu", raw_up)
    compare_to_hello(bench, mvm_label="mvmctl up (exec -> command returns)", mvm_times=mvm_times,
                     part_label="  of which QEMU spawn -> agent-ready (record)", part=qemu_part,
                     other="raw qemu", other_label="raw qemu-system (exec -> agent hello)",
                     other_times=raw_times, target="boot: mvmctl up / raw qemu to agent hello", limit=1.10)
    print_boot_phases(bench.boot_markers.get("upbench", []))
    trace_up(bench, ["--hypervisor", "qemu"], "upbench")


def print_boot_phases(boots: list[dict[str, int]]) -> None:
    """The boot-report phases of those `up`s (ms since QEMU's spawn, median), and the agent's
    own start: /init starting it -> its hello on the host."""
    if not boots:
        return
    print(f"  boot phases of those {len(boots)} ups (median ms since QEMU's spawn; see docs/boot.md):")
    for phase in ("initramfs", "root-mounted", "init", "agent-started", "agent-imported", "agent-ready", "entrypoint"):
        values = [b[phase] for b in boots if phase in b]
        if values:
            print(f"    {phase:<15} {statistics.median(values):7.0f} ms")
    starts = [b["agent-ready"] - b["agent-started"] for b in boots if "agent-ready" in b and "agent-started" in b]
    if starts:
        print(f"    agent-started -> agent-ready: median {statistics.median(starts):.0f} ms "
              f"(min {min(starts)}, max {max(starts)})", flush=True)


def trace_up(bench: Bench, extra: list[str], name: str) -> None:
    """One extra `up`, run with timestamps around its phases (benchmarks/trace_up.py)."""
    log = bench.work / f"trace-{name}.jsonl"
    log.unlink(missing_ok=True)
    env = {**bench.env, "PYTHONPATH": str(REPO / "src")}
    t0 = time.time()
    subprocess.run([sys.executable, str(Path(__file__).with_name("trace_up.py")), str(log), "up",
                    str(bench.forever), "--name", name, *extra], env=env, check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)
    t_end = time.time()
    record = bench.record(name)
    bench.mvm("down", "--force", name)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    print(f"  where the time of one traced `mvmctl up {' '.join(extra)}` goes (ms from exec):")
    for event in sorted(events, key=lambda e: e["start"]):
        start, end = (event["start"] - t0) * 1000, (event["end"] - t0) * 1000
        print(f"    {start:7.0f} .. {end:7.0f}  ({end - start:6.0f} ms)  {event['what']}")
    spawn = next((e for e in events if e["what"] == "child: spawn backend process"), None)
    ready = next((m for m in record["markers"] if m["phase"] == "agent-ready"), None)
    if spawn and ready:
        at = (spawn["end"] - t0) * 1000
        print(f"    {at:7.0f} .. {at + ready['ms']:7.0f}  ({ready['ms']:6.0f} ms)  backend spawned -> agent-ready (record)")
    print(f"    {0:7.0f} .. {(t_end - t0) * 1000:7.0f}  whole process", flush=True)


# -- 1. exec round trips -------------------------------------------------------------------------


def bench_exec(bench: Bench, qemu_vm: str | None, docker_vm: str | None) -> None:
    n = bench.rounds * 4
    banner(f"exec round trip of `true`, whole CLI processes ({n} each, alternated)")
    container = bench.record(docker_vm)["backend_id"] if docker_vm else None
    kinds: dict[str, list[str]] = {}
    if qemu_vm:
        kinds["mvmctl exec (qemu VM)"] = [*MVMCTL, "exec", qemu_vm, "--", "true"]
    if docker_vm:
        kinds["mvmctl exec (docker VM)"] = [*MVMCTL, "exec", docker_vm, "--", "true"]
        kinds["docker exec (same container)"] = ["docker", "exec", container, "true"]
    # what the CLI process costs before it talks to anything
    kinds["python -c pass (interpreter start)"] = [sys.executable, "-c", "pass"]
    kinds["python -c 'import mvm.cli.commands' (click, every other verb)"] = [sys.executable, "-c",
                                                                          "import mvm.cli.commands"]
    kinds["python -c 'import mvm.cli.exec_run' (exec's imports)"] = [sys.executable, "-c", "import mvm.cli.exec_run"]
    times = alternate_commands(bench, kinds, n)
    if docker_vm and qemu_vm:
        mq, md = median(times["mvmctl exec (qemu VM)"]), median(times["mvmctl exec (docker VM)"])
        de = median(times["docker exec (same container)"])
        row("ratio mvmctl exec (docker VM) / docker exec", f"{md / de:7.2f} x")
        row("ratio mvmctl exec (qemu VM) / docker exec", f"{mq / de:7.2f} x")
        row("ratio mvmctl exec qemu VM / docker VM", f"{mq / md:7.2f} x")
        bench.target("exec: mvmctl exec (docker VM) / docker exec", f"{md / de:.2f}x ({md * 1000:.0f} vs "
                     f"{de * 1000:.0f} ms)", md <= de, "<= 1.00x")
        bench.target("exec: mvmctl exec (qemu VM) / docker exec", f"{mq / de:.2f}x ({mq * 1000:.0f} vs "
                     f"{de * 1000:.0f} ms)", mq <= de, "<= 1.00x")
    import_breakdown(bench, "mvm.cli.exec_run")


IMPORT_GROUPS = ("click", "pydantic", "mvm.core.workload", "mvm.core.artifact", "asyncio",
                 "mvm.runtime.supervisor", "mvm.runtime.launcher", "mvm.runtime.lifecycle", "mvm.cli.guest",
                 "re", "json", "socket", "mvm.core.home", "mvm.core.protocol", "mvm.runtime.client", "mvm.cli.exec_run")


def import_breakdown(bench: Bench, module: str) -> None:
    """Cumulative import time of the heavy modules `mvmctl exec` loads (python -X importtime, one
    run: the tracing itself inflates the numbers a little, the proportions are what matter)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], env=bench.env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    cumulative: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        parts = [part.strip() for part in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[1].isdigit():
            cumulative.setdefault(parts[2], int(parts[1]))  # first (outermost) load wins
    print(f"  cumulative import times under `python -X importtime -c 'import {module}'` (each includes what it "
          f"imports first, so they overlap):")
    for name in IMPORT_GROUPS:
        if name in cumulative:
            print(f"    {cumulative[name] / 1000:7.1f} ms  {name}")


# -- 2. in-process client round trips -----------------------------------------------------------


def bench_client(bench: Bench, vms: dict[str, str]) -> None:
    from mvm.core.state import MvmHome
    from mvm.runtime.client import VmClient

    pings, execs = 200, 50
    banner(f"in-process VmClient round trips ({pings} pings, {execs} execs of `true`)")
    for label, name in vms.items():
        paths = MvmHome(bench.home).vm(name)
        with VmClient.connect(paths) as client:
            client.call("ping")  # warm
            ping = _repeat(lambda: client.call("ping"), pings)
            execute = _repeat(lambda: client.exec(["true"]), execs)

        def connect_ping(paths=paths) -> None:
            with VmClient.connect(paths) as fresh:
                fresh.call("ping")

        connect_and_ping = _repeat(connect_ping, pings)
        row(f"{label}: call('ping'), one connection", fmt_ms(ping))
        row(f"{label}: connect + call('ping') + close", fmt_ms(connect_and_ping))
        row(f"{label}: exec(['true']), one connection", fmt_ms(execute))
        if label == "qemu":
            bench.target("client: VmClient ping median (qemu, TCG)", f"{median(ping) * 1000:.2f} ms "
                         f"(p95 {p95(ping) * 1000:.2f})", median(ping) < 0.005, "< 5 ms")


def _repeat(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


# -- 4. memory --------------------------------------------------------------------------------


def bench_memory(bench: Bench, vms: dict[str, str]) -> None:
    banner("host memory per idle VM (KiB from /proc/PID/status and smaps_rollup)")
    for label, name in vms.items():
        record = bench.record(name)
        backend_role = "QEMU" if record["backend"] == "qemu" else f"{record['backend']} client process"
        for role, pid in (("supervisor", record["supervisor_pid"]), (backend_role, record["qemu_pid"])):
            if not pid:
                continue
            try:
                kib = status_kib(pid)
            except OSError:
                continue
            detail = ", ".join(f"{k} {v / 1024:.1f}" for k, v in kib.items() if k != "VmRSS")
            row(f"{label}: {role} (pid {pid})", f"VmRSS {kib['VmRSS'] / 1024:6.1f} MiB  ({detail} MiB)")
            if role == "supervisor" and label == "qemu":
                rss = kib["VmRSS"] / 1024
                bench.target("memory: supervisor VmRSS per idle VM", f"{rss:.1f} MiB (Pss {kib.get('Pss', 0) / 1024:.1f})",
                             rss < 30, "< 30 MiB")
