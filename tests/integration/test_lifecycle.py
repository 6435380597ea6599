"""The whole VM lifecycle on real QEMU guests: up, exec, cp, fs, logs, status, console,
boot-report, wait, detach, down, and what survives kill -9 of each process involved."""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
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
from tests.conftest import Mvmctl, initramfs_phases
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


@pytest.fixture(scope="module", params=["qemu", "docker"])
def ctl(request: pytest.FixtureRequest) -> Mvmctl:
    """The CLI, with `up` and `run` on one backend; every test here runs on each."""
    base = request.getfixturevalue("mvmctl" if request.param == "qemu" else "docker_mvmctl")
    return base.with_backend(request.param)


def running(ctl: Mvmctl, name: str) -> list[str]:
    """What still runs for VM ``name`` on its backend: QEMU pids, or docker container ids."""
    if ctl.hypervisor == "docker":
        out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=mvm.vm={name}"], env=ctl.env,
                             capture_output=True, text=True, check=True).stdout
        return out.split()
    return [str(p.pid) for p in qemu_of_vm(ctl.home, name)]


@pytest.fixture(scope="module")
def sandbox(ctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory):
    """One sealed VM shared by the read-mostly tests of this module."""
    directory = tmp_path_factory.mktemp("sandbox")
    (directory / "mvm.toml").write_text(SANDBOX.format(name="sbx", extra=""))
    proc = ctl("up", str(directory), check=True)
    assert "VM sbx is up" in proc.stdout
    yield "sbx"
    ctl("down", "sbx", "--force")


def vm_dir(ctl: Mvmctl, name: str) -> Path:
    return ctl.home / "vms" / name


def record(ctl: Mvmctl, name: str) -> dict:
    return json.loads((vm_dir(ctl, name) / "record.json").read_text())


# -- up, ls, status ------------------------------------------------------------------------------


def test_up_is_ready_and_listed(ctl: Mvmctl, sandbox: str) -> None:
    listing = json.loads(ctl("ls", "--json", check=True).stdout)
    mine = next(vm for vm in listing if vm["name"] == sandbox)
    assert mine["state"] == "running" and mine["backend"] == ctl.hypervisor and mine["mode"] == "detached"
    assert json.loads((vm_dir(ctl, sandbox) / "mode.json").read_text()) == {"mode": "detached"}
    # up returned after the agent answered: an exec needs no retry
    assert ctl("exec", sandbox, "--", "true").returncode == 0


def test_status_cross_checks_uids_seen_in_the_guest(ctl: Mvmctl, sandbox: str) -> None:
    report = json.loads(ctl("status", sandbox, "--json", check=True).stdout)
    assert report["state"] == "running" and report["mode"] == "detached"
    assert report["guest"]["agent"]["uid"] == 990 == report["uids"]["agent"]
    assert report["guest"]["entrypoint"]["uid"] == 1000 == report["uids"]["entrypoint"]
    assert report["uid_check"][:2] == ["agent: uid 990 (matches the image)", "entrypoint: uid 1000 (matches the image)"]
    assert report["uid_check"][2].startswith("processes: all ") and len(report["uid_check"]) == 3
    uids = {uid for _, uid, _, euid in report["guest"]["processes"] for uid in (uid, euid)}  # real, effective
    assert {990, 1000} <= uids <= {0, 990, 1000}  # every process of the guest, the agent's and the workload's
    assert report["guest"]["memory"]["total"] > 100 * 1024 * 1024
    human = ctl("status", sandbox, check=True).stdout
    assert f"backend     {ctl.hypervisor} (" in human
    if ctl.hypervisor == "docker":
        assert "reduced isolation" in human
    assert "entrypoint: uid 1000 (matches the image)" in human


# -- exec ----------------------------------------------------------------------------------------


def test_exec_passes_output_and_exit_status(ctl: Mvmctl, sandbox: str) -> None:
    proc = ctl("exec", sandbox, "--env", "GREETING=hi there", "--cwd", "/etc", "--",
                  "/bin/sh", "-c", 'echo "$GREETING from $(pwd) as $(id -u)"; echo oops >&2; exit 7')
    assert proc.returncode == 7
    assert proc.stdout == "hi there from /etc as 1000\n"  # the exec uid: the entrypoint's, not the agent's
    assert proc.stderr == "oops\n"


def test_exec_binary_output_is_byte_exact(ctl: Mvmctl, sandbox: str) -> None:
    proc = subprocess.run(ctl.argv("exec", sandbox, "--", "python3", "-c",
                                      "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4096)"),
                          env=ctl.env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == bytes(range(256)) * 4096


def test_exec_streams_stdin(ctl: Mvmctl, sandbox: str) -> None:
    data = "".join(f"line {i}\n" for i in range(5000))
    proc = ctl("exec", "-i", sandbox, "--", "/bin/sh", "-c", "wc -l; echo done", input=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["5000", "done"]


def test_exec_timeout_kills_the_command(ctl: Mvmctl, sandbox: str) -> None:
    started = time.monotonic()
    proc = ctl("exec", "--timeout", "1", sandbox, "--", "sleep", "60")
    assert proc.returncode == 137
    assert "timeout" in proc.stderr
    assert time.monotonic() - started < 30


def test_exec_tty_gives_a_pty(ctl: Mvmctl, sandbox: str) -> None:
    proc = ctl("exec", "-t", sandbox, "--", "tty")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("/dev/pts/")


def test_exec_of_a_missing_program_is_one_line(ctl: Mvmctl, sandbox: str) -> None:
    proc = ctl("exec", sandbox, "--", "/no/such/program")
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "/no/such/program" in proc.stderr and "Traceback" not in proc.stderr


def test_exec_as_another_uid_is_refused(ctl: Mvmctl, sandbox: str) -> None:
    with connect(MvmHome(ctl.home), sandbox) as client, pytest.raises(AgentError, match="uid 1000 only"):
        client.call("exec", argv=["id"], uid=0)


def test_many_concurrent_execs_share_one_vm(ctl: Mvmctl, sandbox: str) -> None:
    def one(i: int) -> subprocess.CompletedProcess:
        return ctl("exec", sandbox, "--", "/bin/sh", "-c", f"sleep 0.$((RANDOM % 5)); echo exec-{i}; exit {i % 4}")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    for i, proc in enumerate(results):
        assert proc.returncode == i % 4, proc.stderr
        assert proc.stdout == f"exec-{i}\n"
    # and many requests interleaved on one client connection
    with connect(MvmHome(ctl.home), sandbox) as client:
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


def test_cp_large_file_round_trip(ctl: Mvmctl, sandbox: str, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(24 * 1024 * 1024 + 123))
    source.chmod(0o640)
    ctl("cp", str(source), f"{sandbox}:/tmp/big.bin", check=True)
    guest_sum = ctl("exec", sandbox, "--", "sha256sum", "/tmp/big.bin", check=True).stdout.split()[0]
    assert guest_sum == hashlib.sha256(source.read_bytes()).hexdigest()
    back = tmp_path / "back.bin"
    ctl("cp", f"{sandbox}:/tmp/big.bin", str(back), check=True)
    assert back.read_bytes() == source.read_bytes()
    assert back.stat().st_mode & 0o777 == 0o640


def test_cp_directory_round_trip_keeps_modes(ctl: Mvmctl, sandbox: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "sub" / "secret").write_text("s3cret")
    (tree / "sub" / "secret").chmod(0o600)
    ctl("cp", str(tree), f"{sandbox}:/tmp/tree", check=True)
    assert ctl("exec", sandbox, "--", "/tmp/tree/run.sh", check=True).stdout == "ran\n"
    out = tmp_path / "out"
    out.mkdir()
    ctl("cp", f"{sandbox}:/tmp/tree", str(out), check=True)
    assert (out / "tree" / "sub" / "secret").read_text() == "s3cret"
    assert (out / "tree" / "sub" / "secret").stat().st_mode & 0o777 == 0o600
    assert (out / "tree" / "run.sh").stat().st_mode & 0o777 == 0o755


def test_fs_verbs(ctl: Mvmctl, sandbox: str) -> None:
    ctl("fs", sandbox, "mkdir", "/tmp/fsdir/deeper", check=True)
    ctl("exec", sandbox, "--", "/bin/sh", "-c", "echo content > /tmp/fsdir/file", check=True)
    listing = json.loads(ctl("fs", sandbox, "ls", "/tmp/fsdir", "--json", check=True).stdout)
    assert {(e["name"], e["type"]) for e in listing} == {("deeper", "dir"), ("file", "file")}
    assert ctl("fs", sandbox, "cat", "/tmp/fsdir/file", check=True).stdout == "content\n"
    info = json.loads(ctl("fs", sandbox, "stat", "/tmp/fsdir/file", "--json", check=True).stdout)
    assert info["size"] == 8 and info["uid"] == 1000  # written as the exec uid
    ctl("fs", sandbox, "rm", "-r", "/tmp/fsdir", check=True)
    missing = ctl("fs", sandbox, "cat", "/tmp/fsdir/file")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "/tmp/fsdir/file" in missing.stderr


# -- logs, console, boot report ------------------------------------------------------------------


def test_logs_show_the_entrypoint_output(ctl: Mvmctl, sandbox: str) -> None:
    proc = ctl("logs", sandbox, check=True)
    assert "sandbox-started" in proc.stdout and "mvm-boot:" not in proc.stdout


def test_console_is_refused_on_a_sealed_image(ctl: Mvmctl, sandbox: str) -> None:
    proc = ctl("console", sandbox)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "sealed" in proc.stderr


def test_boot_report_phases_are_in_order_and_complete(ctl: Mvmctl, sandbox: str) -> None:
    report = json.loads(ctl("boot-report", sandbox, "--json", check=True).stdout)
    phases, steps = report["phases_ms"], report["steps_ms"]
    if ctl.hypervisor == "docker":  # a container boots no kernel and no initramfs
        assert phases["kernel"] is None and phases["initramfs"] is None and phases["root-mounted"] is None
        chain = ["init", "agent-started", "agent-imported", "agent-ready"]
    else:
        chain = ["kernel", *initramfs_phases(ctl.home), "init", "agent-started", "agent-imported", "agent-ready"]
        assert phases["kernel"] >= 0
    # (guest markers carry the guest's uptime, to 10 ms: neighbours may share a tick)
    assert all(phases[a] <= phases[b] for a, b in itertools.pairwise(chain)), phases
    assert phases["agent-started"] <= phases["entrypoint"]
    assert phases["init"] < phases["agent-ready"]
    assert phases["exit"] is None and steps["exit"] is None
    assert steps["agent-ready"] == phases["agent-ready"] - phases["agent-imported"]
    assert steps["entrypoint"] == phases["entrypoint"] - phases["agent-started"]  # alongside the agent
    text = ctl("boot-report", sandbox, check=True).stdout
    assert "agent-imported" in text and "after agent-started" in text


def test_console_on_an_accessible_image(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "devbox", extra="dev = true")
    ctl("up", str(directory), check=True)
    try:
        proc = ctl("console", "devbox", "--command", "id -u; tty; exit 4")
        assert proc.returncode == 4, proc.stderr
        assert proc.stdout.split()[0] == "0" and "/dev/pts/" in proc.stdout  # a dev image: as root
        shell = ctl("console", "devbox", input="echo shell-$((6*7)); exit 5\n")  # no --command: a login shell
        assert shell.returncode == 5, shell.stderr
        assert "shell-42" in shell.stdout
    finally:
        ctl("down", "devbox", check=True)


# -- wait, detach, down --------------------------------------------------------------------------


def test_wait_returns_the_entrypoint_status_and_down_removes_all(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "waiter")
    ctl("up", str(directory), check=True)
    waiter = subprocess.Popen(ctl.argv("wait", "waiter"), env=ctl.env, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert waiter.poll() is None  # still running: wait waits
    ctl("exec", "waiter", "--", "touch", "/tmp/stop", check=True)
    assert waiter.wait(timeout=60) == 5
    assert record(ctl, "waiter")["exit_status"] == 5
    assert "exit 5" in ctl("ls", check=True).stdout
    assert running(ctl, "waiter") == []
    proc = ctl("down", "waiter", check=True)
    assert "down" in proc.stdout
    assert not vm_dir(ctl, "waiter").exists()
    assert "waiter" not in ctl("ls", check=True).stdout


def test_down_is_graceful_then_leaves_nothing(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "downer")
    ctl("up", str(directory), check=True)
    assert len(running(ctl, "downer")) == 1
    ctl("down", "downer", check=True)
    assert running(ctl, "downer") == []
    assert not vm_dir(ctl, "downer").exists()
    again = ctl("down", "downer")
    assert again.returncode == 2 and "no VM named downer" in again.stderr


def test_detach_lets_an_attached_run_go(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "attach")
    ctl("build", str(directory), check=True)
    run = subprocess.Popen(ctl.argv("run", "--attached", str(directory)), env=ctl.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert run.stdout is not None
    assert run.stdout.readline().strip() == "sandbox-started"
    assert record(ctl, "attach")["mode"] == "attached"
    ctl("detach", "attach", check=True)
    assert run.wait(timeout=30) == 0
    assert "detached" in run.stderr.read()
    assert json.loads(ctl("status", "attach", "--json", check=True).stdout)["mode"] == "detached"
    assert ctl("exec", "attach", "--", "true").returncode == 0
    ctl("down", "attach", check=True)


def test_run_with_argv_runs_it_instead_of_the_entrypoint(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "argvrun")
    proc = ctl("run", "--attached", str(directory), "--", "/bin/sh", "-c", "echo \"two words\" $0; id -u; exit 6",
               "it's $HOME")  # quotes, spaces and a dollar reach the guest as they are
    assert proc.returncode == 6, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["two words it's $HOME", "1000"]  # as the image's entrypoint uid
    assert "sandbox-started" not in proc.stdout
    assert record(ctl, "argvrun")["argv"][0] == "/bin/sh"


def test_run_is_detached_by_default_and_says_how_to_follow(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "detachedrun")
    proc = ctl("run", str(directory))
    try:
        assert proc.returncode == 0, proc.stderr
        assert "detached" in proc.stdout and "mvmctl logs -f detachedrun" in proc.stdout
        assert record(ctl, "detachedrun")["mode"] == "detached" and record(ctl, "detachedrun")["state"] == "running"
    finally:
        ctl("down", "detachedrun", "--force")


# -- names and races -----------------------------------------------------------------------------


def test_bad_names_are_refused(ctl: Mvmctl, sandbox: str) -> None:
    for name in ("../evil", "a/b", "x" * 41, "UPPER"):
        proc = ctl("exec", name, "--", "true")
        assert proc.returncode == 2 and "VM name" in proc.stderr and proc.stderr.count("\n") == 1


def test_two_ups_with_one_name_one_wins(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "race")
    ctl("build", str(directory), check=True)
    procs = [subprocess.Popen(ctl.argv("up", str(directory)), env=ctl.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)  # type: ignore[union-attr]
    assert outcomes[0][0] == 0
    assert outcomes[1][0] == 2
    assert "race" in outcomes[1][1] and ("already running" in outcomes[1][1] or "being started" in outcomes[1][1])
    assert len(running(ctl, "race")) == 1
    ctl("down", "race", check=True)


# -- kill -9 of each process ---------------------------------------------------------------------


def test_kill_9_of_the_supervisor(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "killsup")
    ctl("up", str(directory), check=True)
    backend_process = psutil.Process(record(ctl, "killsup")["qemu_pid"])
    os.kill(record(ctl, "killsup")["supervisor_pid"], signal.SIGKILL)
    _, alive = psutil.wait_procs([backend_process], timeout=20)  # PDEATHSIG
    assert alive == []
    report = json.loads(ctl("status", "killsup", "--json", check=True).stdout)
    assert report["state"] == "stopped" and "supervisor" in report["stop_reason"] and "died" in report["stop_reason"]
    # A container outlives its docker CLI; the status call above reconciled it away.
    assert running(ctl, "killsup") == []
    ctl("down", "killsup", check=True)


def test_kill_9_of_the_backend_process(ctl: Mvmctl, workload_dir) -> None:
    directory = make_sandbox(workload_dir, "killqemu")
    ctl("up", str(directory), check=True)
    supervisor = psutil.Process(record(ctl, "killqemu")["supervisor_pid"])
    os.kill(record(ctl, "killqemu")["qemu_pid"], signal.SIGKILL)
    supervisor.wait(timeout=20)  # it records why and goes
    report = json.loads(ctl("status", "killqemu", "--json", check=True).stdout)
    assert report["state"] == "stopped" and "signal 9" in report["stop_reason"]
    assert not (vm_dir(ctl, "killqemu") / "ctl.sock").exists()
    assert running(ctl, "killqemu") == []
    ctl("down", "killqemu", check=True)


@pytest.mark.parametrize("delay", [0.3, 2.0])
def test_kill_9_of_up_while_booting_leaves_nothing(ctl: Mvmctl, workload_dir, delay: float) -> None:
    name = f"killup{int(delay * 10)}"
    directory = make_sandbox(workload_dir, name)
    ctl("build", str(directory), check=True)
    up = subprocess.Popen(ctl.argv("up", str(directory)), env=ctl.env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    time.sleep(delay)
    if up.poll() == 0:  # a guest that was up before the kill (a faster kernel): then it is fully registered
        assert [vm["state"] for vm in json.loads(ctl("ls", "--json", check=True).stdout) if vm["name"] == name] \
            == ["running"]
        ctl("down", name, "--force", check=True)
        return
    up.kill()
    up.wait()
    deadline = time.monotonic() + 30
    while (vm_dir(ctl, name).exists() or running(ctl, name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(ctl, name) == []
    assert not vm_dir(ctl, name).exists()
    assert name not in ctl("ls", check=True).stdout


def test_the_root_disk_has_no_background_ext4_thread(ctl: Mvmctl, sandbox: str) -> None:
    """ext4's lazyinit thread read block bitmaps behind the workload's back, and a quick
    power-off cut one mid-read: "EXT4-fs error ... Cannot read block bitmap" in run's output."""
    if ctl.hypervisor == "docker":
        pytest.skip("a container's root is the host's filesystem: no guest kernel mounts it")
    out = ctl("exec", sandbox, "--", "sh", "-c", "grep ' / ' /proc/mounts; ps -o comm", check=True).stdout
    assert "noinit_itable" in out and "no_prefetch_block_bitmaps" in out
    assert "ext4lazyinit" not in out


def test_nothing_left_behind(ctl: Mvmctl, sandbox: str) -> None:
    """Only the shared sandbox may still be running at this point of the module."""
    names = {" ".join(p.cmdline()).split("/vms/")[1].split("/")[0] for p in qemu_processes_using(ctl.home)}
    assert names <= {sandbox}
    if ctl.hypervisor == "docker":
        out = subprocess.run(["docker", "ps", "--format", "{{.Label \"mvm.vm\"}}"], env=ctl.env,
                             capture_output=True, text=True, check=True).stdout
        assert set(out.split()) <= {sandbox}


def test_a_verb_the_backend_cannot_serve_is_refused_before_anything(ctl: Mvmctl, sandbox: str) -> None:
    if ctl.hypervisor != "docker":
        pytest.skip("qemu makes snapshots (tests/integration/test_snapshots.py)")
    for verb in (("snapshot", "create", sandbox, "--tag", "nope"), ("fork", sandbox)):
        proc = ctl(*verb)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1
        assert "runs on docker, which has no snapshots capability" in proc.stderr
        assert "a container has no memory state to save" in proc.stderr
    assert not (ctl.home / "snapshots" / "nope").exists()
    assert ctl("exec", sandbox, "--", "true").returncode == 0


def ticks(ctl: Mvmctl, name: str) -> int:
    text = ctl("fs", name, "cat", "/tmp/ticks", check=True).stdout.strip()
    return int(text or 0)


def test_pause_freezes_the_guest_and_resume_thaws_it(ctl: Mvmctl, sandbox: str) -> None:
    """A counter in the guest ticks every 0.1 s: it must not move while the VM is paused."""
    ctl("exec", sandbox, "--", "/bin/sh", "-c", "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/ticks.new; "
        "mv /tmp/ticks.new /tmp/ticks; sleep 0.1; done' </dev/null >/dev/null 2>&1 &", check=True)
    deadline = time.monotonic() + 60
    while ctl("fs", sandbox, "stat", "/tmp/ticks").returncode != 0 or ticks(ctl, sandbox) < 5:
        assert time.monotonic() < deadline, "the counter never started"
    before = ticks(ctl, sandbox)
    assert "is paused" in ctl("pause", sandbox, check=True).stdout
    assert record(ctl, sandbox)["state"] == "paused"
    refused = ctl("exec", sandbox, "--", "true")
    assert refused.returncode == 1 and "paused" in refused.stderr
    time.sleep(5)  # frozen for 5 s: a running counter would gain ~50
    assert "is running" in ctl("resume", sandbox, check=True).stdout
    thawed = ticks(ctl, sandbox)
    assert thawed - before < 20, (before, thawed)
    while ticks(ctl, sandbox) < thawed + 5:  # and it counts again
        assert time.monotonic() < deadline + 60, "the counter did not resume"
    ctl("exec", sandbox, "--", "pkill", "-f", "ticks.new")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_forward_reaches_a_guest_service_without_a_guest_nic(ctl: Mvmctl, sandbox: str) -> None:
    import urllib.request

    ctl("exec", sandbox, "--", "/bin/sh", "-c",
        "cd /etc && python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &", check=True)
    ctl("exec", sandbox, "--", "python3", "-c",  # wait until the server listens
        "import socket, time\nfor _ in range(100):\n  try: socket.create_connection(('127.0.0.1', 8000)); break\n"
        "  except OSError: time.sleep(0.1)", check=True)
    port = free_port()
    proc = ctl("forward", sandbox, f"{port}:8000", check=True)
    assert f"127.0.0.1:{port}" in proc.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/mvm/name", timeout=30) as reply:
        assert reply.read().decode().strip() == sandbox
    # the guest has no way out: no interface but loopback
    out = ctl("exec", sandbox, "--", "cat", "/proc/net/dev", check=True).stdout
    assert {line.split(":")[0].strip() for line in out.splitlines()[2:]} == {"lo"}
    taken = ctl("forward", sandbox, f"{port}:8000")
    assert taken.returncode == 1 and f"{port}" in taken.stderr and taken.stderr.count("\n") == 1


def test_status_lists_services_with_their_restart_policy(ctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir("""
        name = "svcs"
        [entrypoint.services.web]
        command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
        restart = "always"
        [entrypoint.services.flaky]
        command = ["/bin/sh", "-c", "exit 3"]
        restart = "on-failure"
        [entrypoint.services.once]
        command = ["/bin/true"]
        restart = "never"
    """, name="svcs")
    ctl("up", str(directory), check=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            services = json.loads(ctl("status", "svcs", "--json", check=True).stdout)["services"]
            if services.get("flaky", {}).get("restarts", 0) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert services["web"]["state"] == "running" and services["web"]["restarts"] == 0
        assert services["once"] == {"state": "exited", "restarts": 0, "last_exit": 0}
        assert services["flaky"]["restarts"] >= 2 and services["flaky"]["last_exit"] == 3
        assert "service     web: running" in ctl("status", "svcs", check=True).stdout
    finally:
        ctl("down", "svcs", check=True)
