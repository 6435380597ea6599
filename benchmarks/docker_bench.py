"""Docker backend: `mvmctl up --hypervisor docker` vs a plain `docker run` of the same image,
both to the agent's hello."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from common import Bench, agent_hello, alternate_ups, banner, compare_to_hello, row, stop_proc
from lifecycle_bench import trace_up


def plain_run_argv(bench: Bench) -> tuple[list[str], Path, str, int]:
    """mvm's own `docker run` argv (runtime/backends/docker.run_argv) for a VM directory of ours."""
    from mvm.build.store import ArtifactStore
    from mvm.core.state import MvmHome, VmPaths, VmRecord
    from mvm.runtime.backends import docker

    artifact = ArtifactStore(MvmHome(bench.home)).require("bench")
    meta = artifact.meta
    paths = VmPaths(bench.work / "plain" / "plainrun")
    paths.dir.mkdir(parents=True, exist_ok=True)
    record = VmRecord(name="plainrun", artifact_key=meta.key, artifact_name=meta.name, backend="docker",
                      accel="container", mode="detached", vcpus=meta.vcpus, memory_mib=meta.memory_mib,
                      accessible=meta.accessible, sealed=meta.sealed, uids={})
    docker.prepare_dirs(paths, False, meta.uids.agent)
    # /init writes its boot markers to this FIFO and blocks until someone has it open: as mvm's
    # supervisor does, the caller holds it open (read-write: it never sees EOF) while it runs.
    fifo = os.open(docker.boot_fifo_path(paths), os.O_RDWR | os.O_NONBLOCK)
    tag = docker.image_tag(meta.name, meta.key)
    return (docker.run_argv(paths, record, tag, False), docker.agent_socket_path(paths), docker.container_name(paths),
            fifo)


def plain_run_to_hello(argv: list[str], sock_path: Path, container: str, env: dict[str, str]) -> float:
    """Listen like mvm's launcher, exec `docker run`, accept the agent, hello both ways."""
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    os.chmod(sock_path, 0o777)
    listener.listen(4)
    deadline = time.monotonic() + 120
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        listener.settimeout(120)
        conn, _ = listener.accept()
        with conn:
            agent_hello(conn, deadline)
        return time.perf_counter() - started
    finally:
        listener.close()
        subprocess.run(["docker", "kill", container], env=env, capture_output=True, stdin=subprocess.DEVNULL, check=False)
        stop_proc(proc)
        subprocess.run(["docker", "rm", "--force", container], env=env, capture_output=True,
                       stdin=subprocess.DEVNULL, check=False)


def bench_docker_up(bench: Bench) -> None:
    n = bench.rounds
    banner(f"docker backend to agent-ready: `mvmctl up --hypervisor docker` vs plain `docker run` ({n} each, alternated)")
    # the first up imports the image (`docker import`); not part of the comparison
    started = time.perf_counter()
    bench.mvm("up", str(bench.forever), "--name", "dkwarm", "--hypervisor", "docker")
    row("first up, incl. docker import of the rootfs", f"{time.perf_counter() - started:7.2f} s (not compared)")
    bench.mvm("down", "--force", "dkwarm")
    argv, sock_path, container, boot_fifo = plain_run_argv(bench)
    try:
        mvm_times, container_part, plain_times = alternate_ups(
            bench, "dkbench", "docker", lambda: plain_run_to_hello(argv, sock_path, container, bench.env))
    finally:
        os.close(boot_fifo)
    compare_to_hello(bench, mvm_label="mvmctl up --hypervisor docker", mvm_times=mvm_times,
                     part_label="  of which `docker run` spawn -> agent-ready (record)", part=container_part,
                     other="docker run", other_label="plain docker run, same argv (exec -> agent hello)",
                     other_times=plain_times, target="docker: mvmctl up / docker run to agent hello", limit=1.20)
    trace_up(bench, ["--hypervisor", "docker"], "dkbench")
