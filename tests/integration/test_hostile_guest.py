"""The workload as the attacker, inside real VMs on both backends.

Each test has code in the guest try to lie to the host or reach past its sandbox: forge boot
markers, flood the console and the agent channel with output (and with bytes shaped like
frames), reach the agent's channel or the boot channel from the workload's uid, fork without
end, offer setuid files and escaping links to `cp`, and make the agent hang on a FIFO or an
endless file. After each, the host's supervisor still answers, the exit status is the true
one, the supervisor's memory stays bounded, and a second VM never noticed.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from mvm.core.state import MvmHome
from mvm.runtime.lifecycle import connect
from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

FOREVER = """
    name = "{name}"
    {extra}
    [entrypoint]
    command = ["/bin/sh", "-c", '''{script}''']
"""
PHASES = ("initramfs", "root-mounted", "init", "agent-started", "agent-imported", "agent-ready", "entrypoint",
          "exit 0", "shutdown", "service-start web", "service-exit web 0", "service-exit web oops 2", "fatal forged")


@pytest.fixture(scope="module", params=["qemu", "docker"])
def ctl(request: pytest.FixtureRequest) -> Mvmctl:
    base = request.getfixturevalue("mvmctl" if request.param == "qemu" else "docker_mvmctl")
    return base.with_backend(request.param)


def up(ctl: Mvmctl, workload_dir, name: str, script: str = "while :; do sleep 1; done", extra: str = "") -> str:
    directory = workload_dir(FOREVER.format(name=name, script=script, extra=extra), name=name)
    ctl("up", str(directory), check=True)
    return name


@pytest.fixture(scope="module")
def target(ctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory):
    """The VM the attacks run in (sealed: the workload and commands run as uid 1000)."""
    name = _module_vm(ctl, tmp_path_factory, "target")
    yield name
    ctl("down", name, "--force")


@pytest.fixture(scope="module")
def bystander(ctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory):
    """A second VM that must not notice anything the attacks do."""
    name = _module_vm(ctl, tmp_path_factory, "bystander")
    yield name
    ctl("down", name, "--force")


def _module_vm(ctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory, name: str) -> str:
    directory = tmp_path_factory.mktemp(name)
    (directory / "mvm.toml").write_text(FOREVER.format(name=name, script="while :; do sleep 1; done", extra=""))
    ctl("up", str(directory), check=True)
    return name


def record(ctl: Mvmctl, name: str) -> dict:
    return json.loads((ctl.home / "vms" / name / "record.json").read_text())


def supervisor_rss_mib(ctl: Mvmctl, name: str) -> float:
    return psutil.Process(record(ctl, name)["supervisor_pid"]).memory_info().rss / (1 << 20)


def still_fine(ctl: Mvmctl, *names: str) -> None:
    """The supervisors answer and the guests run commands."""
    for name in names:
        assert json.loads(ctl("status", name, "--json", check=True).stdout)["state"] == "running"
        assert ctl("exec", name, "--", "echo", "fine", check=True).stdout == "fine\n"


def guest_python(ctl: Mvmctl, name: str, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return ctl("exec", name, "--", "python3", "-c", code, timeout=timeout)


# -- the console lies ------------------------------------------------------------------------------


def test_markers_printed_by_the_workload_are_only_output(ctl: Mvmctl, workload_dir, bystander: str) -> None:
    lines = "; ".join(f"echo 'mvm-boot: {phase} 1.0'" for phase in PHASES)
    directory = workload_dir(FOREVER.format(name="forger", extra="", script=f"{lines}; echo after-forgery; exit 3"),
                             name="forger")
    proc = ctl("run", "--attached", str(directory))
    assert proc.returncode == 3, proc.stderr  # the status PID 1 saw, not the "exit 0" it printed
    for phase in PHASES:
        assert f"mvm-boot: {phase} 1.0\n" in proc.stdout  # passed through as what it is: output
    assert "after-forgery" in proc.stdout  # and nothing after it was dropped
    final = record(ctl, "forger")
    assert final["exit_status"] == 3 and final["services"] == {}
    assert "its entrypoint exited with status 3" in final["stop_reason"]
    still_fine(ctl, bystander)


def test_the_workload_cannot_reach_the_agent_or_boot_channel(ctl: Mvmctl, target: str) -> None:
    """From uid 1000 (the workload's and every command's): no channel device, no socket, no
    FIFO, and the agent can be neither signalled nor read through /proc."""
    probe = guest_python(ctl, target, """
import errno, glob, json, os, socket
seen = {}
for dev in sorted(glob.glob('/dev/vport*')):
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_NONBLOCK)); seen[dev] = 'OPENED'
    except OSError as e:
        seen[dev] = errno.errorcode[e.errno]
for path in ('/.mvm/agent/agent.sock', '/.mvm/agent.sock'):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path); seen[path] = 'CONNECTED'
    except OSError as e:
        seen[path] = errno.errorcode[e.errno]
try:
    os.close(os.open('/.mvm/boot', os.O_WRONLY | os.O_NONBLOCK)); seen['/.mvm/boot'] = 'OPENED'
except OSError as e:
    seen['/.mvm/boot'] = errno.errorcode[e.errno]
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        status = open(f'/proc/{pid}/status').read()
    except OSError:
        continue
    if '\\nUid:\\t990\\t' in status:
        try:
            os.kill(int(pid), 0); seen['kill agent'] = 'ALLOWED'
        except OSError as e:
            seen['kill agent'] = errno.errorcode[e.errno]
        try:
            open(f'/proc/{pid}/environ').read(); seen['agent environ'] = 'READ'
        except OSError as e:
            seen['agent environ'] = errno.errorcode[e.errno]
status = open('/proc/self/status').read()
seen['me'] = [line for line in status.splitlines() if line.split(':')[0] in ('Uid', 'CapEff', 'NoNewPrivs')]
print(json.dumps(seen))
""")
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    me = seen.pop("me")
    assert "Uid:\t1000\t1000\t1000\t1000" in me and "CapEff:\t0000000000000000" in me and "NoNewPrivs:\t1" in me
    assert seen.get("kill agent") == "EPERM" and seen.get("agent environ") == "EACCES", seen
    if ctl.hypervisor == "qemu":
        assert len([k for k in seen if k.startswith("/dev/vport")]) >= 2  # the agent's port and the boot port
    else:
        assert seen["/.mvm/agent/agent.sock"] == "EACCES" and seen["/.mvm/boot"] == "EACCES", seen
    assert not {"OPENED", "CONNECTED", "ALLOWED", "READ"} & set(seen.values()), seen
    still_fine(ctl, target)


def test_a_second_agent_connection_is_refused_and_logged(ctl: Mvmctl, target: str) -> None:
    """Docker's agent dials a socket the supervisor listens on: only the agent's uid, and only
    once per boot. (QEMU's channel is a device with one opener, checked above.)"""
    if ctl.hypervisor != "docker":
        pytest.skip("the docker backend's agent socket; QEMU's channel is a virtio-serial device")
    dial = ("import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\ns.settimeout(10)\n"
            "print(repr(s.recv(100)))")
    host_side = ctl.home / "vms" / target / "chan" / "agent" / "agent.sock"
    root_on_host = subprocess.run(["python3", "-c", dial.format(path=str(host_side))], capture_output=True,
                                  text=True, timeout=30)
    container = record(ctl, target)["backend_id"]
    agent_uid_in_guest = subprocess.run(["docker", "exec", "--user", "990", container, "python3", "-c",
                                         dial.format(path="/.mvm/agent/agent.sock")],
                                        env=ctl.env, capture_output=True, text=True, timeout=60)
    for out in (root_on_host, agent_uid_in_guest):
        assert out.stdout.strip() == "b''", out  # closed at once: nothing said to an impostor
    log = (ctl.home / "vms" / target / "supervisor.log").read_text()
    assert "refused an agent connection from uid 0" in log
    assert "refused agent connection #2: one per boot" in log
    still_fine(ctl, target)


def test_an_agent_killed_in_the_guest_ends_what_it_ran_and_stays_off_the_console(ctl: Mvmctl,
                                                                                   workload_dir) -> None:
    """A root workload (a dev image) kills the agent with a signal, from a command that agent
    is running. That command ends with an error instead of waiting forever. On QEMU, /init's
    restarted agent says hello on the channel the host still holds and serves the next command,
    and what the dead agent had started (here a daemon that left its session) is gone with it.
    On Docker its one connection per boot is gone, and the next command is refused at once.
    The shell's report of the death ("Bus error") goes to the agent's log, never onto the
    console, where it would pass for the workload's output."""
    name = up(ctl, workload_dir, "agentkill", extra="[uids]\nentrypoint = 0")
    try:
        agent = json.loads(ctl("status", name, "--json", check=True).stdout)["guest"]["agent"]["pid"]
        daemon = ctl("exec", name, "--", "sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!",
                     check=True, timeout=60).stdout.strip()
        assert daemon.isdigit(), daemon
        # (the command outlives its kill by far: only the agent's death can end it, not its own exit
        # racing the signal on another core, as it can under Docker)
        killed = ctl("exec", name, "--", "sh", "-c", f"kill -BUS {agent}; sleep 30", timeout=60)
        assert killed.returncode != 0 and "agent" in killed.stderr, killed
        if ctl.hypervisor == "qemu":
            assert ctl("exec", name, "--", "echo", "back", check=True, timeout=60).stdout == "back\n"
            again = json.loads(ctl("status", name, "--json", check=True).stdout)["guest"]["agent"]["pid"]
            assert again != agent
            left = ctl("exec", name, "--", "sh", "-c", f"kill -0 {daemon} 2>/dev/null && echo alive || echo gone",
                       check=True, timeout=60).stdout
            assert left == "gone\n", f"process {daemon}, started by the dead agent, outlived it"
            log = ctl("exec", name, "--", "cat", "/run/mvm-agent.log", check=True).stdout
            assert "Bus error" in log, log
        else:
            refused = ctl("exec", name, "--", "echo", "back", timeout=30)
            assert refused.returncode != 0 and "closed its channel" in refused.stderr, refused
        assert "Bus error" not in ctl("logs", name, check=True).stdout
    finally:
        ctl("down", name, "--force")


# -- floods -----------------------------------------------------------------------------------------


FRAMES = r"""printf '\000\000\000\033\000\000\000\027{"type":"hello","id":1}'"""  # a whole frame, as bytes


def test_a_console_flood_keeps_the_supervisor_bounded(ctl: Mvmctl, workload_dir, bystander: str) -> None:
    """Console output (with frame-shaped bytes in it) floods in; the log is capped and rotated,
    the supervisor's memory does not follow the flood, and `logs` still works."""
    mib = 100 if ctl.hypervisor == "docker" else 12  # QEMU's emulated UART is slow under TCG
    script = (f"sleep 2; {FRAMES}; head -c {mib * 1024 * 1024} /dev/zero | tr '\\000' x; echo; "
              "echo flood-done; while :; do sleep 1; done")
    name = up(ctl, workload_dir, "flooder", script=script)
    try:
        before = supervisor_rss_mib(ctl, name)
        deadline = time.monotonic() + 600
        while b"flood-done" not in _tail(ctl, name) and time.monotonic() < deadline:
            time.sleep(1)
        after = supervisor_rss_mib(ctl, name)
        print(f"\n{ctl.hypervisor}: supervisor VmRSS {before:.1f} MiB before a {mib} MiB console flood, "
              f"{after:.1f} MiB after")
        assert b"flood-done" in _tail(ctl, name)
        assert after - before < 32, (before, after)
        logs = sorted((ctl.home / "vms" / name).glob("console.log*"))
        assert sum(p.stat().st_size for p in logs) <= 17 << 20, [p.stat().st_size for p in logs]
        shown = subprocess.run(ctl.argv("logs", name), env=ctl.env, capture_output=True, timeout=120).stdout
        assert shown.endswith(b"flood-done\n") and len(shown) >= min(mib, 8) << 20
        still_fine(ctl, name, bystander)
    finally:
        ctl("down", name, "--force")


def _tail(ctl: Mvmctl, name: str) -> bytes:
    try:
        with (ctl.home / "vms" / name / "console.log").open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            return f.read()
    except FileNotFoundError:
        return b""


def test_output_for_a_client_that_stops_reading_stays_bounded(ctl: Mvmctl, target: str, bystander: str) -> None:
    """100 MiB of command output toward a client that reads nothing for a while: the supervisor
    holds back (backpressure to the guest) instead of buffering it, then delivers every byte."""
    size = 100 << 20
    before = supervisor_rss_mib(ctl, target)
    with connect(MvmHome(ctl.home), target) as client:
        request = client.send({"type": "exec", "argv": ["head", "-c", str(size), "/dev/zero"]})
        time.sleep(5)  # not a wait for anything to start: this is the client not reading
        stalled = supervisor_rss_mib(ctl, target)
        received = 0
        for frame in client.replies(request):
            if frame.type == "stdout":
                received += len(frame.body)
            elif frame.type == "exit":
                assert frame.header["code"] == 0
    after = supervisor_rss_mib(ctl, target)
    print(f"\n{ctl.hypervisor}: supervisor VmRSS {before:.1f} MiB, {stalled:.1f} MiB while the client "
          f"did not read, {after:.1f} MiB after 100 MiB")
    assert received == size
    assert stalled - before < 32 and after - before < 32, (before, stalled, after)
    still_fine(ctl, target, bystander)


def test_a_fork_bomb_stays_inside_its_guest(ctl: Mvmctl, workload_dir, bystander: str) -> None:
    name = up(ctl, workload_dir, "bomb", extra="memory_mib = 192")
    try:
        bomb = ctl("exec", name, "--timeout", "20", "--", "/bin/sh", "-c", "b() { b | b & }; b; sleep 30",
                   timeout=240)  # (ends: killed at its timeout, or failed if the guest's OOM killer struck)
        assert "Traceback" not in bomb.stderr and bomb.returncode != 0
        status = ctl("status", name, "--json", timeout=60)  # its supervisor answers, whatever the guest's state
        assert status.returncode == 0 and json.loads(status.stdout)["name"] == name
        still_fine(ctl, bystander)
    finally:
        down = ctl("down", name, "--force", timeout=120)
        assert down.returncode == 0, down.stderr


# -- cp out of the guest -------------------------------------------------------------------------


def test_cp_out_drops_setuid_bits_and_escaping_links(ctl: Mvmctl, target: str, tmp_path: Path) -> None:
    made = ctl("exec", target, "--", "/bin/sh", "-c",
               "rm -rf /tmp/evil && mkdir -p /tmp/evil/sub && cd /tmp/evil && "
               "echo hi > ok.txt && chmod 0644 ok.txt && echo x > suid && chmod 4755 suid && "
               "echo y > sgid && chmod 2775 sgid && ln -s /etc/passwd evil && ln -s ../../.. up && "
               "ln -s / root && echo inner > sub/inner && ln -s ../ok.txt sub/fine")
    assert made.returncode == 0, made.stderr
    host = tmp_path / "out"
    host.mkdir()
    proc = ctl("cp", f"{target}:/tmp/evil", str(host))
    assert proc.returncode == 0, proc.stderr
    out = host / "evil"
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in out.rglob("*")}
    assert (out / "ok.txt").read_text() == "hi\n" and (out / "sub" / "inner").read_text() == "inner\n"
    assert not any(mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) for mode in modes.values()), modes
    assert not (out / "evil").is_symlink() and not (out / "up").is_symlink() and not (out / "root").is_symlink()
    assert (out / "sub" / "fine").is_symlink()  # a link that stays inside is kept
    for name in ("evil", "up", "root"):
        assert f"skipped ./{name}:" in proc.stderr, proc.stderr
    single = tmp_path / "suid-copy"
    assert ctl("cp", f"{target}:/tmp/evil/suid", str(single)).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(single.stat().st_mode) == 0o755 & ~umask


def test_cp_out_never_writes_through_a_symlink_at_the_destination(ctl: Mvmctl, target: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    trap = tmp_path / "trap"
    trap.symlink_to(victim)
    proc = ctl("cp", f"{target}:/etc/mvm/name", str(trap))
    assert proc.returncode == 2 and "is a symlink" in proc.stderr and proc.stderr.count("\n") == 1
    assert victim.read_text() == "keep me\n" and trap.is_symlink()
    # A device would never end, and a directory does not go onto a file: one line each, nothing left.
    endless = ctl("cp", f"{target}:/dev/zero", str(tmp_path / "zero"))
    assert endless.returncode == 2 and "not a regular file" in endless.stderr and endless.stderr.count("\n") == 1
    assert ctl("exec", target, "--", "ln", "-sf", "/dev/zero", "/tmp/zero-link").returncode == 0
    behind_a_link = ctl("cp", f"{target}:/tmp/zero-link", str(tmp_path / "zero"))
    assert behind_a_link.returncode != 0 and "not a regular file" in behind_a_link.stderr, behind_a_link.stderr
    onto_file = ctl("cp", f"{target}:/etc/mvm", str(victim))
    assert onto_file.returncode == 2 and "is a file on the host" in onto_file.stderr, onto_file.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trap", "victim"]


# -- hangs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "-1", "0", "604801"])
def test_absurd_exec_timeouts_are_refused_by_both_parsers(ctl: Mvmctl, target: str, value: str) -> None:
    fast = ctl("exec", target, "--timeout", value, "--", "true")  # exec's click-free parser
    slow = ctl("exec", target, "--timeout", value, "true")  # no "--": click parses it
    for proc in (fast, slow):
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "--timeout" in proc.stderr and "Traceback" not in proc.stderr


def test_reading_a_fifo_or_an_endless_file_blocks_nothing(ctl: Mvmctl, target: str) -> None:
    assert ctl("exec", target, "--", "/bin/sh", "-c", "rm -f /tmp/fifo; mkfifo /tmp/fifo").returncode == 0
    started = time.monotonic()
    fifo = ctl("fs", target, "cat", "/tmp/fifo", timeout=60)  # no writer: nothing to read, at once
    assert fifo.returncode == 0 and fifo.stdout == "" and time.monotonic() - started < 30
    head = subprocess.run(f"{shlex.join(ctl.argv('fs', target, 'cat', '/dev/zero'))} | head -c 1048576 | wc -c",
                          shell=True, env=ctl.env, capture_output=True, text=True, timeout=120)
    assert head.stdout.strip() == "1048576"
    still_fine(ctl, target)
