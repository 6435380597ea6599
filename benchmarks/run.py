"""Build and boot benchmarks, measured side by side in one run.

    .venv/bin/python benchmarks/run.py [--boots N]

Prints, for the same artifact on the same host in the same run:
  * build: cold (empty package cache), cold with a warm package cache, and a no-change
    rebuild (cache hit);
  * boot: `mvmctl run examples/hello` vs the raw qemu-system command mvm would run, each
    timed from process start to the entrypoint's greeting on the console, alternated N times,
    medians compared as a ratio (target: mvmctl at most 1.10x raw).
Uses a private MVM_HOME under /tmp; nothing else is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    from mvm.core.state import MvmHome
    from mvm.runtime import qemu

    artifact = ArtifactStore(MvmHome.default()).require("hello")
    overlay = work / "raw-overlay.qcow2"
    qemu.create_overlay(artifact.rootfs, overlay)
    spec = qemu.artifact_spec(artifact, overlay, env["MVM_ACCEL"])
    spec.agent_socket = work / "raw-agent.sock"
    return spec.argv()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=5, help="boots of each kind (default 5)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from mvm.core.state import MvmHome
    from mvm.runtime.kvm import select_accel

    with tempfile.TemporaryDirectory(prefix="mvm-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MVM_HOME": str(work / "home")}
        accel, why = select_accel(MvmHome(work / "home"))
        env["MVM_ACCEL"] = accel
        print(f"accelerator: {accel} ({why})\n")

        print("build (examples/hello)")
        for label, seconds in bench_build(env, work).items():
            print(f"  {label:<34} {seconds:7.2f} s")

        raw = raw_qemu_argv(env, work)
        mvm_times, raw_times = [], []
        for _ in range(args.boots):
            mvm_times.append(time_to_line([*MVMCTL, "run", str(work / "hello")], env, GREETING))
            (work / "raw-overlay.qcow2").unlink()
            raw = raw_qemu_argv(env, work)
            raw_times.append(time_to_line(raw, env, GREETING))
        mvm_median, raw_median = statistics.median(mvm_times), statistics.median(raw_times)
        print(f"\ncold boot to entrypoint output ({args.boots} boots each, alternated, median)")
        print(f"  mvmctl run examples/hello          {mvm_median:7.2f} s   (min {min(mvm_times):.2f})")
        print(f"  raw qemu-system, same artifact     {raw_median:7.2f} s   (min {min(raw_times):.2f})")
        ratio = mvm_median / raw_median
        verdict = "meets" if ratio <= 1.10 else "misses"
        print(f"  ratio mvmctl / raw                 {ratio:7.2f} x   ({verdict} the 1.10x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
