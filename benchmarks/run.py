"""Build, boot, exec, client, memory and docker-backend benchmarks, side by side in one run.

    .venv/bin/python benchmarks/run.py [--rounds N] [--only build,boot,exec,client,memory,docker,restore,sdk,audit,forward,egress]

Prints, for the same artifacts on the same host in the same run (compared runs alternate
A,B,A,B...; medians; ratios):
  * build: cold (empty package cache), cold with a warm package cache, no-change rebuild;
  * boot: `mvmctl run examples/hello` vs raw qemu-system to the greeting on the console, and
    `mvmctl up` (qemu) vs raw qemu-system with mvm's argv to the agent's hello (target 1.10x),
    plus one traced `up` that shows where its time goes (benchmarks/trace_up.py);
  * exec: `mvmctl exec VM -- true` (qemu VM, docker VM) vs `docker exec CONTAINER true`
    (target: mvmctl no slower), with interpreter start and import costs for context;
  * client: in-process VmClient ping and exec(["true"]) round trips (target < 5 ms median);
  * memory: RSS of the supervisor per idle VM (target < 30 MiB), and of QEMU;
  * docker: `mvmctl up --hypervisor docker` vs plain `docker run` with mvm's argv to the
    agent's hello (target 1.20x);
  * audit: `mvmctl exec -- true` with vs without its audit record (target < 3 % or < 1 ms),
    one append, and `mvmctl audit verify` over 100,000 records.
Uses a private MVM_HOME under /tmp and an answering dockerd (tests/dockerd.py: the host's, or
a private one it starts and stops); every VM and container it starts is removed at the end.
"""
from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

REPO = Path(__file__).resolve().parent.parent
HELLO = REPO / "examples" / "hello"
GREETING = b"Hello from hello"
MVMCTL = [sys.executable, "-m", "mvm.cli.main"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_to_line(argv: list[str], env: dict[str, str], needle: bytes) -> float:
    """Seconds from exec to the first output line containing ``needle``; then stop it."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if needle in line:
                return time.perf_counter() - started
        raise RuntimeError(f"{argv[0]} exited without printing {needle!r}")
    finally:
        proc.wait(timeout=30)


def bench_build(env: dict[str, str], work: Path) -> dict[str, float]:
    directory = work / "hello"
    shutil.copytree(HELLO, directory)
    (directory / "mvm.lock").unlink(missing_ok=True)
    home = Path(env["MVM_HOME"])
    results = {"cold build, empty package cache": timed([*MVMCTL, "build", str(directory)], env)}
    shutil.rmtree(home / "store")
    (directory / "mvm.lock").unlink()
    results["cold build, warm package cache"] = timed([*MVMCTL, "build", str(directory)], env)
    results["no-change rebuild (cache hit)"] = timed([*MVMCTL, "build", str(directory)], env)
    return results


def raw_qemu_argv(env: dict[str, str], work: Path) -> list[str]:
    """The command line mvm itself would run for examples/hello, with its own overlay."""
    os.environ["MVM_HOME"] = env["MVM_HOME"]
    from mvm.build.store import ArtifactStore
    from mvm.core.bootimage import BootImage
    from mvm.core.state import MvmHome
    from mvm.runtime.backends import qemu

    image = BootImage.open(ArtifactStore(MvmHome.default()).require("hello").path)
    overlay = work / "raw-overlay.qcow2"
    qemu.create_overlay(image.rootfs, overlay)
    spec = qemu.image_spec(image, overlay, env["MVM_ACCEL"])
    spec.agent_socket = work / "raw-agent.sock"
    return spec.argv()


SECTIONS = ("build", "boot", "exec", "client", "memory", "docker", "restore", "sdk", "audit", "forward", "egress",
            "kernel", "seccomp")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", "--boots", dest="rounds", type=int, default=5,
                        help="boots of each kind, and 4x this many exec round trips (default 5)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    common.env_with_src()
    # As scripts/setup.sh does: mvm's own .pyc files exist, as they would for an installed tool,
    # even where PYTHONDONTWRITEBYTECODE keeps the runs below from writing them.
    compileall.compile_dir(str(REPO / "src" / "mvm"), quiet=1)
    from mvm.core.state import MvmHome
    from mvm.runtime.kvm import select_accel

    sys.path.insert(0, str(REPO))  # tests/dockerd.py
    from tests.dockerd import start_dockerd

    dockerd = None
    with tempfile.TemporaryDirectory(prefix="mvm-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MVM_HOME": str(work / "home")}
        accel, why = select_accel(MvmHome(work / "home"))
        env["MVM_ACCEL"] = accel
        bench = common.Bench(work, env, args.rounds)
        print(f"accelerator: {accel} ({why}); {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
        ours = common.reuse_cached_kernel(bench)
        print(f"guest kernel (the default, kernel = \"auto\"): {ours or 'Debian cloud (mvm own is not built here)'}")
        try:
            if only & {"exec", "memory", "docker"}:
                dockerd = start_dockerd(work / "dockerd")
                if dockerd is None:
                    print("docker: no dockerd binary; docker comparisons are skipped")
                else:
                    env["DOCKER_HOST"] = dockerd.host
                    bench.docker_host = dockerd.host
                    print(f"docker: {dockerd.host} ({'started privately' if dockerd.proc else 'already running'})")
            run_sections(bench, only)
        finally:
            common.down_all(bench)
            if dockerd is not None:
                dockerd.stop()  # only if we started it (Dockerd.stop is a no-op otherwise)
        print_summary(bench)
    return 0


def run_sections(bench: common.Bench, only: set[str]) -> None:
    import docker_bench
    import lifecycle_bench

    env, work = bench.env, bench.work
    if "build" in only:
        print("\nbuild (examples/hello)")
        for label, seconds in bench_build(env, work).items():
            print(f"  {label:<34} {seconds:7.2f} s")
    if only - {"build"}:
        common.write_forever_workload(bench.forever)
        common.run_quiet([*MVMCTL, "build", str(bench.forever)], env)
    if "boot" in only:
        if not (work / "hello").exists():
            shutil.copytree(HELLO, work / "hello")
            common.run_quiet([*MVMCTL, "build", str(work / "hello")], env)
        bench_run_boot(bench)
        lifecycle_bench.bench_up(bench)
    docker_ok = bench.docker_host is not None
    vms: dict[str, str] = {}
    if only & {"exec", "client", "memory"}:
        bench.mvm("up", str(bench.forever), "--name", "bq", "--hypervisor", "qemu")
        vms["qemu"] = "bq"
        if docker_ok and only & {"exec", "memory"}:
            bench.mvm("up", str(bench.forever), "--name", "bd", "--hypervisor", "docker")
            vms["docker"] = "bd"
        time.sleep(1)  # let the guests settle after boot
    if "exec" in only:
        lifecycle_bench.bench_exec(bench, vms.get("qemu"), vms.get("docker"))
    if "client" in only:
        lifecycle_bench.bench_client(bench, vms)
    if "memory" in only:
        lifecycle_bench.bench_memory(bench, vms)
    for name in vms.values():
        bench.mvm("down", "--force", name, check=False)
    if "docker" in only and docker_ok:
        docker_bench.bench_docker_up(bench)
    if "restore" in only:
        import restore_bench

        restore_bench.bench_restore(bench)
    if "sdk" in only:
        import sdk_bench

        sdk_bench.bench_sdk(bench)
    if "forward" in only:
        import forward_bench

        forward_bench.bench_forward(bench)
    if "egress" in only:
        import egress_bench

        egress_bench.bench_egress(bench)
    if "audit" in only:
        import audit_bench

        audit_bench.bench_audit(bench)
    if "kernel" in only:
        import kernel_bench

        kernel_bench.bench_kernel(bench)
    if "seccomp" in only:
        import seccomp_bench

        seccomp_bench.bench_seccomp(bench)


def bench_run_boot(bench: common.Bench) -> None:
    env, work = bench.env, bench.work
    mvm_times, raw_times = [], []
    for _ in range(bench.rounds):
        mvm_times.append(time_to_line([*MVMCTL, "run", "--attached", str(work / "hello")], env, GREETING))
        (work / "raw-overlay.qcow2").unlink(missing_ok=True)
        raw = raw_qemu_argv(env, work)
        raw_times.append(time_to_line(raw, env, GREETING))
    mvm_median, raw_median = statistics.median(mvm_times), statistics.median(raw_times)
    print(f"\ncold boot to entrypoint output ({bench.rounds} boots each, alternated, median)")
    print(f"  mvmctl run examples/hello          {mvm_median:7.2f} s   (min {min(mvm_times):.2f})")
    print(f"  raw qemu-system, same artifact     {raw_median:7.2f} s   (min {min(raw_times):.2f})")
    ratio = mvm_median / raw_median
    verdict = "meets" if ratio <= 1.10 else "misses"
    print(f"  ratio mvmctl / raw                 {ratio:7.2f} x   ({verdict} the 1.10x target)", flush=True)
    bench.target("boot: mvmctl run / raw qemu to entrypoint output",
                 f"{ratio:.2f}x ({mvm_median:.2f} s vs {raw_median:.2f} s)", ratio <= 1.10, "<= 1.10x")


def print_summary(bench: common.Bench) -> None:
    if not bench.summary:
        return
    print("\nsummary (medians measured side by side in this run)")
    width = max(len(what) for what, _, _ in bench.summary)
    for what, measured, verdict in bench.summary:
        print(f"  {what:<{width}}  {measured:<34}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
