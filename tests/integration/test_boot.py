"""Boot real guests under QEMU (TCG here) and check what they print and how they end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.conftest import EXAMPLES, Mvmctl, default_kernel, default_signals, initramfs_phases

pytestmark = pytest.mark.vm


def qemu_of_vm(home: Path, name: str) -> list[psutil.Process]:
    """QEMU processes booting VM ``name`` (their overlay lives in its directory)."""
    # (the command line read when the processes were listed: one may exit meanwhile)
    return [p for p in qemu_processes_using(home) if f"/vms/{name}/" in " ".join(p.info["cmdline"] or [])]


def qemu_processes_using(home: Path) -> list[psutil.Process]:
    """QEMU processes whose command line points into this test's MVM_HOME."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if "qemu" in (proc.info["name"] or "") and str(home) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_hello_demo_prints_greeting_and_kernel(mvmctl: Mvmctl) -> None:
    proc = mvmctl("run", "--attached", str(EXAMPLES / "hello"))
    assert proc.returncode == 0, proc.stderr
    assert "Hello from hello, a microVM running Linux 6.1." in proc.stdout
    suffix = "cloud-amd64" if default_kernel(mvmctl.home) == "debian" else "-mvm"
    assert f"{suffix} as uid 1000" in proc.stdout
    assert "mvm-boot:" not in proc.stdout  # markers are for the host, not the user


def test_python_example_runs_python_in_the_guest(mvmctl: Mvmctl) -> None:
    proc = mvmctl("run", "--attached", str(EXAMPLES / "python"))
    assert proc.returncode == 0, proc.stderr
    assert "python 3.11" in proc.stdout and "sum(range(10)) = 45" in proc.stdout


def test_shell_example_is_an_interactive_console(mvmctl: Mvmctl) -> None:
    proc = mvmctl("run", "--attached", str(EXAMPLES / "shell"), input="echo shell-$((6*7)); id -u; cat /etc/motd; exit 3\n")
    assert proc.returncode == 3, proc.stderr
    assert "shell-42" in proc.stdout
    assert "Welcome to an mvm shell image" in proc.stdout
    assert "\n0\n" in proc.stdout  # accessible (dev) images run the entrypoint as root by default


def test_entrypoint_exit_status_becomes_mvmctls(mvmctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir("""
        name = "status"
        [entrypoint]
        command = ["/bin/sh", "-c", "echo about-to-fail >&2; exit 7"]
    """)
    proc = mvmctl("run", "--attached", str(directory))
    assert proc.returncode == 7
    assert "about-to-fail" in proc.stdout  # the guest's stderr reaches the console too


def test_uids_and_privileges_as_seen_in_the_guest(mvmctl: Mvmctl, workload_dir) -> None:
    """The entrypoint runs as 1000 with no_new_privs and no groups; the agent as 990."""
    script = (
        "grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapEff)' /proc/self/status; "
        "for p in /proc/[0-9]*; do "
        "  if [ \"$(cat $p/comm 2>/dev/null)\" = python3 ]; then grep '^Uid' $p/status | sed 's/^/agent-/'; fi; "
        "done; cat /etc/mvm/name; ls -l /etc/mvm/artifact.json"
    )
    directory = workload_dir(f"""
        name = "uids"
        [entrypoint]
        command = ["/bin/sh", "-c", '''{script}''']
    """)
    proc = mvmctl("run", "--attached", str(directory))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Uid:\t1000\t1000\t1000\t1000" in out
    assert "Gid:\t1000\t1000\t1000\t1000" in out
    assert "NoNewPrivs:\t1" in out
    assert "CapEff:\t0000000000000000" in out
    assert "agent-Uid:\t990\t990\t990\t990" in out
    assert "\nuids\n" in out


def test_services_are_supervised_with_restart_policy(mvmctl: Mvmctl, workload_dir, tmp_path: Path) -> None:
    """An on-failure service is restarted until it succeeds; then the VM stops."""
    directory = workload_dir("""
        name = "svc"
        [entrypoint.services.flaky]
        command = ["/bin/sh", "-c", "n=$(cat /tmp/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /tmp/n; echo flaky-run-$n; [ $n -ge 3 ]"]
        restart = "on-failure"
        [entrypoint.services.once]
        command = ["/bin/echo", "once-ran"]
        restart = "never"
    """)
    proc = mvmctl("run", "--attached", str(directory))
    assert proc.returncode == 0, proc.stderr
    assert "flaky-run-1" in proc.stdout and "flaky-run-3" in proc.stdout
    assert "flaky-run-4" not in proc.stdout
    assert proc.stdout.count("once-ran") == 1


def start_forever_vm(mvmctl: Mvmctl, workload_dir, name: str) -> subprocess.Popen:
    """`mvmctl run` of a guest that prints "up" and then never ends; returns once "up" is seen."""
    directory = workload_dir(f"""
        name = "{name}"
        [entrypoint]
        command = ["/bin/sh", "-c", "echo up; while :; do sleep 1; done"]
    """)
    mvmctl("build", str(directory), check=True)
    proc = subprocess.Popen(mvmctl.argv("run", "--attached", str(directory)), env=mvmctl.env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, preexec_fn=default_signals)
    assert proc.stdout is not None
    for line in proc.stdout:  # pytest-timeout bounds this if the guest never speaks
        if line.strip() == "up":
            break
    assert qemu_of_vm(mvmctl.home, name), "QEMU should be running for the attached VM"
    return proc


def test_ctrl_c_stops_the_vm_and_leaves_no_qemu(mvmctl: Mvmctl, mvm_home: Path, workload_dir) -> None:
    proc = start_forever_vm(mvmctl, workload_dir, "forever")
    qemus = qemu_of_vm(mvmctl.home, "forever")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode == 130
    _, alive = psutil.wait_procs(qemus, timeout=20)  # run returns once its supervisor is gone
    assert alive == [] and qemu_processes_using(mvm_home) == []


def test_kill_9_of_mvmctl_takes_qemu_down(mvmctl: Mvmctl, workload_dir) -> None:
    proc = start_forever_vm(mvmctl, workload_dir, "orphan")
    qemus = qemu_of_vm(mvmctl.home, "orphan")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(qemus, timeout=20)
    assert alive == [], f"QEMU outlived mvmctl: {alive}"
    listing = mvmctl("ls", "--json", check=True).stdout
    assert '"state": "stopped"' in listing and "attached mvmctl went away" in listing


def test_run_with_resources_and_data_disk(mvmctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir("""
        name = "sized"
        vcpus = 2
        mem = "384M"
        data_disk = "64M"
        [entrypoint]
        command = ["/bin/sh", "-c", "nproc; grep MemTotal /proc/meminfo; df -m /data | tail -1; touch /data/x && echo data-writable"]
    """)
    proc = mvmctl("run", "--attached", str(directory))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].strip() == "2"
    mem_kib = int(lines[1].split()[1])
    assert 300 * 1024 < mem_kib <= 384 * 1024
    assert "/data" in lines[2] and "data-writable" in proc.stdout
    override = mvmctl("run", "--attached", str(directory), "--cpus", "1", "--memory", "256M")
    assert override.returncode == 0
    assert override.stdout.splitlines()[0].strip() == "1"


def test_bad_run_flags_are_one_line_errors(mvmctl: Mvmctl) -> None:
    proc = mvmctl("run", "--attached", str(EXAMPLES / "hello"), "--memory", "12Q")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--memory" in proc.stderr and "Traceback" not in proc.stderr


def test_unsupported_hypervisor_is_refused_before_boot(mvmctl: Mvmctl, mvm_home: Path, workload_dir) -> None:
    directory = workload_dir("""
        name = "fc"
        hypervisor = "firecracker"
        [entrypoint]
        command = ["/bin/true"]
    """)
    proc = mvmctl("run", "--attached", str(directory))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "firecracker" in proc.stderr and "doctor" in proc.stderr
    assert qemu_processes_using(mvm_home) == []


def test_boot_report_and_agent_channel(mvmctl: Mvmctl, workload_dir) -> None:
    """The agent greets the host over virtio-serial as uid 990 and answers a ping."""
    directory = workload_dir("""
        name = "report"
        [entrypoint]
        command = ["/bin/sh", "-c", "sleep 3; echo finished"]
    """)
    proc = mvmctl("run", "--attached", str(directory), "--boot-report")
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stdout
    report = proc.stderr
    for phase in ("kernel", *initramfs_phases(mvmctl.home), "init", "agent-started", "agent-imported", "agent-ready",
                  "entrypoint", "exit"):
        line = next(line for line in report.splitlines() if line.strip().startswith(phase + " "))
        assert re.fullmatch(rf"\s+{phase}\s+\d+ ms\s+[+-]\d+ ms after [a-z -]+", line), line
    assert "uid=990 protocol=1" in report


# -- the boot gate ------------------------------------------------------------------------------


def test_perf_boot_gate_fails_an_impossible_budget_and_passes_a_generous_one(mvmctl: Mvmctl) -> None:
    """Not a timing test: the same boots judged against 1 ms (no boot is that fast) and 10 min."""
    hello = str(EXAMPLES / "hello")
    missed = mvmctl("perf", "boot", hello, "--runs", "2", "--p50-ms", "1", timeout=600)
    assert missed.returncode == 1, missed.stderr
    assert missed.stderr.strip().splitlines()[-1].startswith("mvmctl: error: p50 agent-ready ")
    assert "over the budget of 1 ms" in missed.stderr and "Traceback" not in missed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in missed.stdout.splitlines()[2:]}
    assert rows["agent-ready"][0] == "2" and rows["init"][0] == "2"  # both boots reached both
    passed = mvmctl("perf", "boot", hello, "--runs", "2", "--p50-ms", "600000", "--json", timeout=600)
    assert passed.returncode == 0, passed.stderr
    report = json.loads(passed.stdout)
    assert report["passed"] and report["budget_ms"] == 600000 and len(report["runs"]) == 2
    assert report["phases"]["agent-ready"]["n"] == 2
    p50 = report["phases"]["agent-ready"]["p50"]
    assert report["phases"]["kernel"]["p50"] < report["phases"]["init"]["p50"] < p50 == report["p50_ms"]
    assert report["accel"] in ("kvm", "tcg") and mvmctl("ls", "--json", check=True).stdout.count("perf-hello") == 0
