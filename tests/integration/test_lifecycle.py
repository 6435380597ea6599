"""The whole VM lifecycle on real QEMU guests: up, exec, cp, fs, logs, status, console,
boot-report, wait, detach, down, and what survives kill -9 of each process involved."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from mvm.core.state import MvmHome
from mvm.runtime.client import AgentError
from mvm.runtime.lifecycle import connect
from tests.conftest import Mvmctl
from tests.integration.test_boot import qemu_of_vm, qemu_processes_using

pytestmark = pytest.mark.vm

SANDBOX = """
    name = "{name}"
    {extra}
    [entrypoint]
    command = ["/bin/sh", "-c", "echo sandbox-started; while [ ! -f /tmp/stop ]; do sleep 0.2; done; exit 5"]
"""


def make_sandbox(workload_dir, name: str, extra: str = "") -> Path:
    return workload_dir(SANDBOX.format(name=name, extra=extra), name=name)


@pytest.fixture(scope="module")
def sandbox(mvmctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory):
    """One sealed VM shared by the read-mostly tests of this module."""
    directory = tmp_path_factory.mktemp("sandbox")
    (directory / "mvm.toml").write_text(SANDBOX.format(name="sbx", extra=""))
    proc = mvmctl("up", str(directory), check=True)
    assert "VM sbx is up" in proc.stdout
    yield "sbx"
    mvmctl("down", "sbx", "--force")


def vm_dir(mvmctl: Mvmctl, name: str) -> Path:
    return mvmctl.home / "vms" / name


def record(mvmctl: Mvmctl, name: str) -> dict:
    return json.loads((vm_dir(mvmctl, name) / "record.json").read_text())


# -- up, ls, status ------------------------------------------------------------------------------


def test_up_is_ready_and_listed(mvmctl: Mvmctl, sandbox: str) -> None:
    listing = json.loads(mvmctl("ls", "--json", check=True).stdout)
    mine = next(vm for vm in listing if vm["name"] == sandbox)
    assert mine["state"] == "running" and mine["backend"] == "qemu" and mine["mode"] == "detached"
    assert json.loads((vm_dir(mvmctl, sandbox) / "mode.json").read_text()) == {"mode": "detached"}
    # up returned after the agent answered: an exec needs no retry
    assert mvmctl("exec", sandbox, "--", "true").returncode == 0


def test_status_cross_checks_uids_seen_in_the_guest(mvmctl: Mvmctl, sandbox: str) -> None:
    report = json.loads(mvmctl("status", sandbox, "--json", check=True).stdout)
    assert report["state"] == "running" and report["mode"] == "detached"
    assert report["guest"]["agent"]["uid"] == 990 == report["uids"]["agent"]
    assert report["guest"]["entrypoint"]["uid"] == 1000 == report["uids"]["entrypoint"]
    assert report["uid_check"] == ["agent: uid 990 (matches the image)", "entrypoint: uid 1000 (matches the image)"]
    assert report["guest"]["memory"]["total"] > 100 * 1024 * 1024
    human = mvmctl("status", sandbox, check=True).stdout
    assert "qemu (tcg" in human or "qemu (kvm" in human
    assert "entrypoint: uid 1000 (matches the image)" in human


# -- exec ----------------------------------------------------------------------------------------


def test_exec_passes_output_and_exit_status(mvmctl: Mvmctl, sandbox: str) -> None:
    proc = mvmctl("exec", sandbox, "--env", "GREETING=hi there", "--cwd", "/etc", "--",
                  "/bin/sh", "-c", 'echo "$GREETING from $(pwd) as $(id -u)"; echo oops >&2; exit 7')
    assert proc.returncode == 7
    assert proc.stdout == "hi there from /etc as 990\n"
    assert proc.stderr == "oops\n"


def test_exec_binary_output_is_byte_exact(mvmctl: Mvmctl, sandbox: str) -> None:
    proc = subprocess.run(mvmctl.argv("exec", sandbox, "--", "python3", "-c",
                                      "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4096)"),
                          env=mvmctl.env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == bytes(range(256)) * 4096


def test_exec_streams_stdin(mvmctl: Mvmctl, sandbox: str) -> None:
    data = "".join(f"line {i}\n" for i in range(5000))
    proc = mvmctl("exec", "-i", sandbox, "--", "/bin/sh", "-c", "wc -l; echo done", input=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["5000", "done"]


def test_exec_timeout_kills_the_command(mvmctl: Mvmctl, sandbox: str) -> None:
    started = time.monotonic()
    proc = mvmctl("exec", "--timeout", "1", sandbox, "--", "sleep", "60")
    assert proc.returncode == 137
    assert "timeout" in proc.stderr
    assert time.monotonic() - started < 30


def test_exec_tty_gives_a_pty(mvmctl: Mvmctl, sandbox: str) -> None:
    proc = mvmctl("exec", "-t", sandbox, "--", "tty")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("/dev/pts/")


def test_exec_of_a_missing_program_is_one_line(mvmctl: Mvmctl, sandbox: str) -> None:
    proc = mvmctl("exec", sandbox, "--", "/no/such/program")
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "/no/such/program" in proc.stderr and "Traceback" not in proc.stderr


def test_exec_as_another_uid_is_refused(mvmctl: Mvmctl, sandbox: str) -> None:
    with connect(MvmHome(mvmctl.home), sandbox) as client, pytest.raises(AgentError, match="990"):
        client.call("exec", argv=["id"], uid=0)


def test_many_concurrent_execs_share_one_vm(mvmctl: Mvmctl, sandbox: str) -> None:
    def one(i: int) -> subprocess.CompletedProcess:
        return mvmctl("exec", sandbox, "--", "/bin/sh", "-c", f"sleep 0.$((RANDOM % 5)); echo exec-{i}; exit {i % 4}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    for i, proc in enumerate(results):
        assert proc.returncode == i % 4, proc.stderr
        assert proc.stdout == f"exec-{i}\n"
    # and many requests interleaved on one client connection
    with connect(MvmHome(mvmctl.home), sandbox) as client:
        ids = [client.send({"type": "exec", "argv": ["/bin/echo", f"inproc-{i}"]}) for i in range(10)]
        outputs: dict[int, bytes] = {i: b"" for i in ids}
        finished: set[int] = set()
        while len(finished) < len(ids):
            frame = client.receive()
            if frame.type == "stdout":
                outputs[frame.id] += frame.body
            elif frame.type == "exit":
                finished.add(frame.id)
        assert [outputs[i] for i in ids] == [f"inproc-{n}\n".encode() for n in range(10)]


# -- files ---------------------------------------------------------------------------------------


def test_cp_large_file_round_trip(mvmctl: Mvmctl, sandbox: str, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(24 * 1024 * 1024 + 123))
    source.chmod(0o640)
    mvmctl("cp", str(source), f"{sandbox}:/tmp/big.bin", check=True)
    guest_sum = mvmctl("exec", sandbox, "--", "sha256sum", "/tmp/big.bin", check=True).stdout.split()[0]
    assert guest_sum == hashlib.sha256(source.read_bytes()).hexdigest()
    back = tmp_path / "back.bin"
    mvmctl("cp", f"{sandbox}:/tmp/big.bin", str(back), check=True)
    assert back.read_bytes() == source.read_bytes()
    assert back.stat().st_mode & 0o777 == 0o640


def test_cp_directory_round_trip_keeps_modes(mvmctl: Mvmctl, sandbox: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "sub" / "secret").write_text("s3cret")
    (tree / "sub" / "secret").chmod(0o600)
    mvmctl("cp", str(tree), f"{sandbox}:/tmp/tree", check=True)
    assert mvmctl("exec", sandbox, "--", "/tmp/tree/run.sh", check=True).stdout == "ran\n"
    out = tmp_path / "out"
    out.mkdir()
    mvmctl("cp", f"{sandbox}:/tmp/tree", str(out), check=True)
    assert (out / "tree" / "sub" / "secret").read_text() == "s3cret"
    assert (out / "tree" / "sub" / "secret").stat().st_mode & 0o777 == 0o600
    assert (out / "tree" / "run.sh").stat().st_mode & 0o777 == 0o755


def test_fs_verbs(mvmctl: Mvmctl, sandbox: str) -> None:
    mvmctl("fs", sandbox, "mkdir", "/tmp/fsdir/deeper", check=True)
    mvmctl("exec", sandbox, "--", "/bin/sh", "-c", "echo content > /tmp/fsdir/file", check=True)
    listing = json.loads(mvmctl("fs", sandbox, "ls", "/tmp/fsdir", "--json", check=True).stdout)
    assert {(e["name"], e["type"]) for e in listing} == {("deeper", "dir"), ("file", "file")}
    assert mvmctl("fs", sandbox, "cat", "/tmp/fsdir/file", check=True).stdout == "content\n"
    info = json.loads(mvmctl("fs", sandbox, "stat", "/tmp/fsdir/file", "--json", check=True).stdout)
    assert info["size"] == 8 and info["uid"] == 990
    mvmctl("fs", sandbox, "rm", "-r", "/tmp/fsdir", check=True)
    missing = mvmctl("fs", sandbox, "cat", "/tmp/fsdir/file")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "/tmp/fsdir/file" in missing.stderr


# -- logs, console, boot report ------------------------------------------------------------------


def test_logs_show_the_entrypoint_output(mvmctl: Mvmctl, sandbox: str) -> None:
    proc = mvmctl("logs", sandbox, check=True)
    assert "sandbox-started" in proc.stdout and "mvm-boot:" not in proc.stdout


def test_console_is_refused_on_a_sealed_image(mvmctl: Mvmctl, sandbox: str) -> None:
    proc = mvmctl("console", sandbox)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "sealed" in proc.stderr


def test_boot_report_phases_are_in_order(mvmctl: Mvmctl, sandbox: str) -> None:
    phases = json.loads(mvmctl("boot-report", sandbox, "--json", check=True).stdout)["phases_ms"]
    assert 0 <= phases["kernel"] < phases["initramfs"] < phases["init"] < phases["entrypoint"]
    assert phases["init"] < phases["agent-ready"]
    assert phases["exit"] is None


def test_console_on_an_accessible_image(mvmctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "devbox", extra="dev = true")
    mvmctl("up", str(directory), check=True)
    try:
        proc = mvmctl("console", "devbox", "--command", "id -u; tty; exit 4")
        assert proc.returncode == 4, proc.stderr
        assert "990" in proc.stdout and "/dev/pts/" in proc.stdout
    finally:
        mvmctl("down", "devbox", check=True)


# -- wait, detach, down --------------------------------------------------------------------------


def test_wait_returns_the_entrypoint_status_and_down_removes_all(mvmctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "waiter")
    mvmctl("up", str(directory), check=True)
    waiter = subprocess.Popen(mvmctl.argv("wait", "waiter"), env=mvmctl.env, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert waiter.poll() is None  # still running: wait waits
    mvmctl("exec", "waiter", "--", "touch", "/tmp/stop", check=True)
    assert waiter.wait(timeout=60) == 5
    assert record(mvmctl, "waiter")["exit_status"] == 5
    assert "exit 5" in mvmctl("ls", check=True).stdout
    assert qemu_of_vm(mvmctl.home, "waiter") == []
    proc = mvmctl("down", "waiter", check=True)
    assert "down" in proc.stdout
    assert not vm_dir(mvmctl, "waiter").exists()
    assert "waiter" not in mvmctl("ls", check=True).stdout


def test_down_is_graceful_then_leaves_nothing(mvmctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "downer")
    mvmctl("up", str(directory), check=True)
    qemus = qemu_of_vm(mvmctl.home, "downer")
    assert len(qemus) == 1
    mvmctl("down", "downer", check=True)
    assert not psutil.pid_exists(qemus[0].pid) or qemus[0].status() == psutil.STATUS_ZOMBIE
    assert not vm_dir(mvmctl, "downer").exists()
    again = mvmctl("down", "downer")
    assert again.returncode == 2 and "no VM named downer" in again.stderr


def test_detach_lets_an_attached_run_go(mvmctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "attach")
    mvmctl("build", str(directory), check=True)
    run = subprocess.Popen(mvmctl.argv("run", str(directory)), env=mvmctl.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert run.stdout is not None
    assert run.stdout.readline().strip() == "sandbox-started"
    assert record(mvmctl, "attach")["mode"] == "attached"
    mvmctl("detach", "attach", check=True)
    assert run.wait(timeout=30) == 0
    assert "detached" in run.stderr.read()
    assert json.loads(mvmctl("status", "attach", "--json", check=True).stdout)["mode"] == "detached"
    assert mvmctl("exec", "attach", "--", "true").returncode == 0
    mvmctl("down", "attach", check=True)


# -- names and races -----------------------------------------------------------------------------


def test_bad_names_are_refused(mvmctl: Mvmctl, sandbox: str) -> None:
    for name in ("../evil", "a/b", "x" * 41, "UPPER"):
        proc = mvmctl("exec", name, "--", "true")
        assert proc.returncode == 2 and "VM name" in proc.stderr and proc.stderr.count("\n") == 1


def test_two_ups_with_one_name_one_wins(mvmctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "race")
    mvmctl("build", str(directory), check=True)
    procs = [subprocess.Popen(mvmctl.argv("up", str(directory)), env=mvmctl.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)  # type: ignore[union-attr]
    assert outcomes[0][0] == 0
    assert outcomes[1][0] == 2
    assert "race" in outcomes[1][1] and ("already running" in outcomes[1][1] or "being started" in outcomes[1][1])
    assert len(qemu_of_vm(mvmctl.home, "race")) == 1
    mvmctl("down", "race", check=True)


# -- kill -9 of each process ---------------------------------------------------------------------


def test_kill_9_of_the_supervisor(mvmctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "killsup")
    mvmctl("up", str(directory), check=True)
    qemus = qemu_of_vm(mvmctl.home, "killsup")
    os.kill(record(mvmctl, "killsup")["supervisor_pid"], signal.SIGKILL)
    _, alive = psutil.wait_procs(qemus, timeout=20)
    assert alive == []
    report = json.loads(mvmctl("status", "killsup", "--json", check=True).stdout)
    assert report["state"] == "stopped" and "supervisor" in report["stop_reason"] and "died" in report["stop_reason"]
    mvmctl("down", "killsup", check=True)


def test_kill_9_of_qemu(mvmctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "killqemu")
    mvmctl("up", str(directory), check=True)
    supervisor = psutil.Process(record(mvmctl, "killqemu")["supervisor_pid"])
    os.kill(record(mvmctl, "killqemu")["qemu_pid"], signal.SIGKILL)
    supervisor.wait(timeout=20)  # it records why and goes
    report = json.loads(mvmctl("status", "killqemu", "--json", check=True).stdout)
    assert report["state"] == "stopped" and "signal 9" in report["stop_reason"]
    assert not (vm_dir(mvmctl, "killqemu") / "ctl.sock").exists()
    mvmctl("down", "killqemu", check=True)


@pytest.mark.parametrize("delay", [0.3, 2.0])
def test_kill_9_of_up_while_booting_leaves_nothing(mvmctl: Mvmctl, workload_dir, delay: float) -> None:
    name = f"killup{int(delay * 10)}"
    directory = make_sandbox(workload_dir, name)
    mvmctl("build", str(directory), check=True)
    up = subprocess.Popen(mvmctl.argv("up", str(directory)), env=mvmctl.env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    time.sleep(delay)
    up.kill()
    up.wait()
    deadline = time.monotonic() + 30
    while (vm_dir(mvmctl, name).exists() or qemu_of_vm(mvmctl.home, name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_of_vm(mvmctl.home, name) == []
    assert not vm_dir(mvmctl, name).exists()
    assert name not in mvmctl("ls", check=True).stdout


def test_no_qemu_left_behind(mvmctl: Mvmctl, sandbox: str) -> None:
    """Only the shared sandbox may still be running at this point of the module."""
    names = {" ".join(p.cmdline()).split("/vms/")[1].split("/")[0] for p in qemu_processes_using(mvmctl.home)}
    assert names <= {sandbox}
