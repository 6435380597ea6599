"""The real per-VM supervisor, run as its own process, with this test playing the guest.

The supervisor is started as the launcher starts it (exec'd, with the VM's process as its
child), except that the "VM" is a `sleep` and this test holds the other ends of its channels:
the console pipe, and QEMU's agent and boot sockets (the test listens on them, as QEMU's
chardevs do). So the test speaks for the agent and for /init, and can do what a hostile guest
would: lie, flood, reconnect, speak another protocol version, or never boot at all.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.core import protocol
from mvm.core.state import VmPaths, VmRecord
from mvm.runtime.client import AgentError, VmClient

WAIT = 20.0


class FakeGuest:
    """The guest's side of one supervised VM: agent socket, boot socket, console pipe."""

    def __init__(self, root: Path, expected_boot_ms: int = 60_000) -> None:
        self.paths = VmPaths(root / "vms" / "t")
        self.paths.dir.mkdir(parents=True, mode=0o700)
        VmRecord(name="t", artifact_key="k" * 64, artifact_name="t", backend="qemu", accel="tcg", mode="detached",
                 vcpus=1, memory_mib=128, accessible=False, sealed=True,
                 uids={"agent": 990, "entrypoint": 1000}).save(self.paths)
        self.agent_listener = self._listen(self.paths.agent_socket)
        self.boot_listener = self._listen(self.paths.boot_socket)
        console_r, self.console_w = os.pipe()
        stdin_r, stdin_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        commit_r, self.commit_w = os.pipe()
        lock = os.open(self.paths.supervisor_lock, os.O_RDWR | os.O_CREAT, 0o600)
        fds = [console_r, stdin_w, stderr_r, commit_r, lock]
        launcher = textwrap.dedent(f"""
            import fcntl, os, subprocess, sys, time
            from mvm.runtime.launchspec import LaunchSpec
            fcntl.flock({lock}, fcntl.LOCK_EX)
            vm = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
            spec = LaunchSpec(vm_dir={str(self.paths.dir)!r}, qemu_pid=vm.pid, qemu_stdin={stdin_w},
                              qemu_stdout={console_r}, qemu_stderr={stderr_r}, spawned=time.monotonic(),
                              commit_fd={commit_r}, lock_fd={lock}, expected_boot_ms={expected_boot_ms})
            os.execv(sys.executable, [sys.executable, "-m", "mvm.runtime.supervisor", spec.to_json()])
        """)
        self.log = (self.paths.supervisor_log).open("wb")
        self.proc = subprocess.Popen([sys.executable, "-c", launcher], pass_fds=fds, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for fd in (console_r, stdin_r, stdin_w, stderr_r, stderr_w, commit_r, lock):
            os.close(fd)
        os.write(self.commit_w, b"k")  # as a successful `up` does
        self.agent = self._accept(self.agent_listener)
        self.boot = self._accept(self.boot_listener)
        self.decoder = protocol.Decoder()
        self.frames: list[protocol.Frame] = []

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.listen(4)
        sock.settimeout(WAIT)
        return sock

    @staticmethod
    def _accept(listener: socket.socket) -> socket.socket:
        conn, _ = listener.accept()
        conn.settimeout(WAIT)
        return conn

    # -- playing the guest ---------------------------------------------------------------------

    def mark(self, line: str) -> None:
        self.boot.sendall(line.encode() + b"\n")

    def hello(self, version: int = protocol.PROTOCOL_VERSION, pid: int = 100) -> None:
        self.agent.sendall(protocol.encode({"type": "hello", "version": version, "role": "agent", "uid": 990,
                                            "pid": pid, "uptime": 1.0}))

    def agent_frame(self) -> protocol.Frame:
        """The next request the supervisor forwarded to the agent (its hello skipped)."""
        while True:
            while not self.frames:
                data = self.agent.recv(1 << 20)
                assert data, "the supervisor closed the agent channel"
                self.frames += self.decoder.feed(data)
            frame = self.frames.pop(0)
            if frame.type != "hello":
                return frame

    def reply(self, header: dict, body: bytes = b"") -> None:
        self.agent.sendall(protocol.encode(header, body))

    def client(self) -> VmClient:
        deadline = time.monotonic() + WAIT
        while not self.paths.ctl_socket.exists():
            assert time.monotonic() < deadline, self.paths.supervisor_log.read_text()
            time.sleep(0.01)
        return VmClient.connect(self.paths)

    def ready(self) -> VmClient:
        self.mark("mvm-boot: init 1.0")
        self.hello()
        client = self.client()
        assert client.call("ready")["state"] == "running"
        return client

    def record(self) -> dict:
        return json.loads(self.paths.record.read_text())

    def stopped(self) -> dict:
        self.proc.wait(WAIT)
        return self.record()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for sock in (self.agent, self.boot, self.agent_listener, self.boot_listener):
            sock.close()
        os.close(self.console_w)
        os.close(self.commit_w)
        self.log.close()


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[FakeGuest]:
    fake = FakeGuest(tmp_path)
    yield fake
    fake.close()


def test_requests_of_many_clients_with_the_same_ids_reach_the_right_client(guest: FakeGuest) -> None:
    first, second = guest.ready(), guest.client()
    a = first.send({"type": "stat", "path": "/a", "id": 5})
    b = second.send({"type": "stat", "path": "/b", "id": 5})  # the same id on the other connection
    seen = [guest.agent_frame(), guest.agent_frame()]
    assert {f.header["path"] for f in seen} == {"/a", "/b"} and len({f.id for f in seen}) == 2
    for frame in reversed(seen):  # answered in the other order
        guest.reply({"type": "result", "id": frame.id, "stat": {"name": frame.header["path"]}})
    assert [f.header["stat"]["name"] for f in second.replies(b)] == ["/b"]
    assert [f.header["stat"]["name"] for f in first.replies(a)] == ["/a"]


def test_a_refused_upload_drops_its_later_chunks_for_that_connection_only(guest: FakeGuest) -> None:
    """Per connection state, never keyed by id(): a new client reusing the id is served."""
    first = guest.ready()
    upload = first.send({"type": "write", "id": 7, "path": "/x", "more": True}, b"1")
    frame = guest.agent_frame()
    guest.reply({"type": "error", "id": frame.id, "message": "EACCES"})
    with pytest.raises(AgentError):
        list(first.replies(upload))
    first.send({"type": "write", "id": 7, "path": "/x", "more": False}, b"2")  # dropped: its upload failed
    first.close()
    second = guest.client()
    second.send({"type": "write", "id": 7, "path": "/y", "more": False}, b"3")
    frame = guest.agent_frame()
    assert (frame.header["path"], frame.body) == ("/y", b"3")


def test_a_restarted_agent_fails_what_the_old_one_had_open(guest: FakeGuest) -> None:
    client = guest.ready()
    request = client.send({"type": "exec", "argv": ["sleep", "9"]})
    guest.agent_frame()
    guest.hello(pid=101)  # another agent: /init restarted it in the guest
    with pytest.raises(AgentError, match="the guest's agent restarted"):
        list(client.replies(request))
    ping = client.send({"type": "ping"})
    frame = guest.agent_frame()  # forwarded to the new agent
    guest.reply({"type": "pong", "id": frame.id, "uptime": 2.0})
    assert [f.type for f in client.replies(ping)] == ["pong"]


def test_the_same_agent_saying_hello_again_changes_nothing(guest: FakeGuest) -> None:
    """The agent speaks first on its channel and answers our hello too: two hellos, one pid."""
    client = guest.ready()
    request = client.send({"type": "exec", "argv": ["true"]})
    frame = guest.agent_frame()
    guest.hello()
    guest.reply({"type": "exit", "id": frame.id, "code": 0})
    assert [f.type for f in client.replies(request)] == ["exit"]


def test_an_agent_of_another_protocol_version_stops_the_vm(guest: FakeGuest) -> None:
    guest.mark("mvm-boot: init 1.0")
    guest.hello(version=99)
    final = guest.stopped()
    assert final["state"] == "stopped" and "protocol v99" in final["stop_reason"]


def test_a_guest_that_never_boots_is_stopped_with_the_reason(tmp_path: Path) -> None:
    guest = FakeGuest(tmp_path, expected_boot_ms=50)  # 20x: given up after a second
    try:
        final = guest.stopped()
        assert "no sign of /init" in final["stop_reason"]
    finally:
        guest.close()


def test_garbage_and_forgeries_on_the_boot_channel_change_nothing_true(guest: FakeGuest) -> None:
    client = guest.ready()
    guest.boot.sendall(b"\xff" * 100_000 + b"\nmvm-boot: service-exit web oops 2\nmvm-boot: exit -3 1\n")
    guest.boot.sendall(os.urandom(200_000))
    os.write(guest.console_w, b"mvm-boot: exit 0 1.0\n" + protocol.encode({"type": "hello", "version": 1}))
    assert client.call("status")["record"]["state"] == "running"  # it still serves
    guest.mark("mvm-boot: exit 4 2.0")
    deadline = time.monotonic() + WAIT
    while not any(m["phase"] == "exit" for m in guest.record()["markers"]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    guest.agent.close()  # the guest powers off
    os.kill(guest.record()["qemu_pid"], 9)
    final = guest.stopped()
    assert final["exit_status"] == 4 and final["services"] == {}
    assert b"mvm-boot: exit 0 1.0" in guest.paths.console_log.read_bytes()  # console bytes are only output


@pytest.mark.parametrize(("imported", "kept"), [
    (1.02, True),  # between agent-started (1.0) and the hello's arrival
    (0.5, False),  # before /init started the agent: a lie
    (1e6, False),  # after the hello arrived
    ("1.02", False), (True, False), (float("nan"), False), (None, False)])
def test_what_the_agent_says_about_its_start_is_kept_only_where_it_can_be_true(guest: FakeGuest, imported: object,
                                                                               kept: bool) -> None:
    """The hello's 'imported' is the agent's word: placed by the guest's clock through /init's
    markers, and dropped unless it lies between agent-started and the hello's arrival."""
    guest.mark("mvm-boot: init 0.9")
    guest.mark("mvm-boot: agent-started 1.0")
    time.sleep(0.1)  # the hello arrives later than /init's markers (the guest's clock moves on)
    hello = {"type": "hello", "version": protocol.PROTOCOL_VERSION, "role": "agent", "uid": 990, "pid": 1,
             "uptime": "garbage", "imported": imported}
    guest.agent.sendall(protocol.encode(hello))  # (json writes NaN as NaN, and reads it back)
    assert guest.client().call("ready")["state"] == "running"
    markers = {m["phase"]: m for m in guest.record()["markers"]}
    assert markers["agent-ready"]["guest_uptime"] is None  # "garbage" is not an uptime
    if kept:
        assert markers["agent-started"]["ms"] <= markers["agent-imported"]["ms"] <= markers["agent-ready"]["ms"] + 10
    else:
        assert "agent-imported" not in markers
