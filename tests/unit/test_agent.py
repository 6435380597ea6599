"""The guest agent, run for real on the host: a subprocess spoken to with real frames.

Each test starts the agent as /init does, ``python3 -E -s -S -c "$AGENT_MAIN"`` from a copy of the
guest's /usr/lib/mvm that the builder lays out, over a socketpair (``--fd``) or, where a host
has to come and go, over a unix socket it connects to (``--port``). Tests run as root here, so
the agent gets its test-only ``--allow-root-for-tests``; the fuzz test runs it as nobody.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import resource
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvm.build.rootfs import GUEST_DIR, write_agent
from mvm.core import protocol
from mvm.guest import guest_file

WAIT = 10.0  # seconds any single reply may take
# The guest runs Debian 12's python3.11; where the host has that same interpreter, use it.
PYTHON = "/usr/bin/python3.11" if os.access("/usr/bin/python3.11", os.X_OK) else sys.executable
# As /init runs it, in the directory Guest.lib: the -c program is read from /init itself.
AGENT_MAIN = re.search(r"^AGENT_MAIN='([^']*)'$", guest_file("init").decode(), re.MULTILINE).group(1)  # type: ignore[union-attr]
AGENT = [PYTHON, "-E", "-s", "-S", "-c", AGENT_MAIN]
NOBODY = 65534


class Client:
    """One connection to the agent. A reader thread sorts replies into a queue per id and
    keeps the arrival order of everything, so tests can check interleaving."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queues: dict[int | None, Queue[protocol.Frame | None]] = collections.defaultdict(Queue)
        self.lock = threading.Lock()
        self.log: list[tuple[int | None, str]] = []
        self.next_id = 1
        self.opening: protocol.Frame | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _queue(self, request_id: int | None) -> Queue[protocol.Frame | None]:
        with self.lock:
            return self.queues[request_id]

    def _read(self) -> None:
        decoder = protocol.Decoder()
        try:
            while data := self.sock.recv(1 << 20):
                for frame in decoder.feed(data):  # the agent must only send good frames
                    self.log.append((frame.id, frame.type))
                    self._queue(frame.id).put(frame)
        except OSError:
            pass
        finally:
            with self.lock:
                for q in self.queues.values():
                    q.put(None)

    def close(self) -> None:
        """Hang up. shutdown() first: a close alone would not wake the blocked reader, whose
        recv keeps the socket open, so the agent would never see EOF."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.reader.join(WAIT)

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.sock.sendall(protocol.encode(header, body))

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def next(self, request_id: int | None, timeout: float = WAIT) -> protocol.Frame:
        try:
            frame = self._queue(request_id).get(timeout=timeout)
        except Empty:
            raise AssertionError(f"no reply for id {request_id} within {timeout} s") from None
        assert frame is not None, f"the agent closed the channel while id {request_id} waited"
        return frame

    def pending(self, request_id: int | None) -> list[protocol.Frame]:
        q = self._queue(request_id)
        frames = []
        while not q.empty():
            frame = q.get_nowait()
            if frame is not None:
                frames.append(frame)
        return frames

    def call(self, kind: str, body: bytes = b"", **fields: Any) -> protocol.Frame:
        request_id = self.new_id()
        self.send({"type": kind, "id": request_id, **fields}, body)
        return self.next(request_id)

    def take_opening_hello(self) -> protocol.Frame:
        """The agent speaks first on every connection (a host connected before it started learns
        of it this way); its hello comes before any request is read."""
        opening = self.next(None)
        assert opening.type == "hello" and "id" not in opening.header, opening.header
        self.opening = opening
        return opening

    def hello(self) -> protocol.Frame:
        self.send({"type": "hello", "version": protocol.PROTOCOL_VERSION, "role": "host"})
        reply = self.next(None)
        assert reply.type == "hello", reply.header
        return reply

    def ping(self) -> None:
        assert self.call("ping").type == "pong"

    def start(self, argv: list[str], **fields: Any) -> tuple[int, int]:
        """(id, pid) of a started exec."""
        request_id = self.new_id()
        self.send({"type": "exec", "id": request_id, "argv": argv, **fields})
        started = self.next(request_id)
        assert started.type == "started", started.header
        return request_id, started.header["pid"]

    def collect(self, request_id: int, timeout: float = WAIT) -> Run:
        """Output frames up to and including exit."""
        run = Run(request_id)
        while True:
            frame = self.next(request_id, timeout)
            if frame.type == "exit":
                run.exit = frame.header
                return run
            assert frame.type in ("stdout", "stderr"), frame.header
            assert 0 < len(frame.body) <= protocol.CHUNK
            run.frames.append((frame.type, frame.body))

    def run(self, argv: list[str], stdin: bytes | None = None, **fields: Any) -> Run:
        request_id, _ = self.start(argv, stdin=stdin is not None, **fields)
        if stdin is not None:
            self.send({"type": "stdin", "id": request_id, "eof": True}, stdin)
        return self.collect(request_id)


@dataclass
class Run:
    id: int
    frames: list[tuple[str, bytes]] = field(default_factory=list)
    exit: dict[str, Any] = field(default_factory=dict)

    def out(self, stream: str = "stdout") -> bytes:
        return b"".join(body for kind, body in self.frames if kind == stream)


@dataclass
class Guest:
    """Where the tests point the agent's guest paths."""

    root: Path
    lib: Path  # the guest's /usr/lib/mvm: the agent package and mvm/core/protocol.py

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"],
                "MVM_AGENT_ARTIFACT_JSON": str(self.root / "artifact.json"),
                "MVM_AGENT_ENTRYPOINT_PID": str(self.root / "entrypoint.pid"),
                "MVM_AGENT_CONTROL": str(self.root / "control"),
                "MVM_AGENT_IDENTITY_STATUS": str(self.root / "identity"),
                "MVM_AGENT_IDENTITY_REQUEST": str(self.root / "identity-request")}


def agent_argv(*where: str) -> list[str]:
    return [*AGENT, *where, "--allow-root-for-tests"]


def check_stderr(path: Path) -> None:
    text = path.read_text(errors="replace")
    assert "Traceback" not in text, text


@contextmanager
def spawn_agent(guest: Guest, **popen: Any) -> Iterator[Client]:
    """The agent on one end of a socketpair, until the test closes the other."""
    ours, theirs = socket.socketpair()
    log = guest.root / "agent.stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(agent_argv("--fd", str(theirs.fileno())), pass_fds=[theirs.fileno()],
                                cwd=guest.lib, env=guest.env, stdin=subprocess.DEVNULL, stderr=stderr, **popen)
    theirs.close()
    client = Client(ours)
    try:
        client.take_opening_hello()
        yield client
    finally:
        client.close()
        try:
            assert proc.wait(WAIT) == 0  # EOF on its channel ends an --fd agent cleanly
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        check_stderr(log)


@pytest.fixture(scope="session")
def guest_lib() -> Iterator[Path]:
    """GUEST_DIR as the builder writes it into every image, where nobody can read it too."""
    top = Path(tempfile.mkdtemp(prefix="mvm-guest-lib-"))
    write_agent(top)
    for directory in [top, *(p for p in top.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)
    yield top / GUEST_DIR.lstrip("/")
    shutil.rmtree(top)


@pytest.fixture
def guest(tmp_path: Path, guest_lib: Path) -> Guest:
    root = tmp_path / "guest"
    root.mkdir()
    (root / "artifact.json").write_text(json.dumps({"sealed": False}))
    return Guest(root, guest_lib)


@pytest.fixture
def agent(guest: Guest) -> Iterator[Client]:
    with spawn_agent(guest) as client:
        client.hello()
        yield client


# -- hello, ping ------------------------------------------------------------------------------


def test_hello_and_ping(guest: Guest) -> None:
    with spawn_agent(guest) as client:
        hello = client.hello()
        assert hello.header["role"] == "agent"
        assert hello.header["version"] == protocol.PROTOCOL_VERSION
        assert hello.header["uid"] == os.getuid()
        assert hello.header["uptime"] > 0
        assert 0 < hello.header["imported"] <= hello.header["uptime"]  # for the boot report
        pong = client.call("ping")
        assert pong.type == "pong" and pong.header["uptime"] >= hello.header["uptime"]
        assert client.hello().header["pid"] == hello.header["pid"]  # every hello is answered
        assert client.opening is not None and client.opening.header["pid"] == hello.header["pid"]  # and it spoke first, unasked


def test_nothing_runs_before_the_hosts_hello(guest: Guest, tmp_path: Path) -> None:
    """What waits on the channel when an agent starts may have been sent to the agent /init
    restarted this one after; the host has failed it already, so it must not run."""
    marker = tmp_path / "ran"
    with spawn_agent(guest) as client:
        early = client.new_id()
        client.send({"type": "exec", "id": early, "argv": ["touch", str(marker)]})
        client.send({"type": "ping", "id": early + 1})
        client.hello()  # answered after both earlier frames were read: they were dropped
        assert client.pending(early) == [] and client.pending(early + 1) == []
        client.ping()
        assert not marker.exists()


def test_refuses_root_without_the_test_flag(guest: Guest) -> None:
    proc = subprocess.run([*AGENT, "--fd", "0"], cwd=guest.lib, env=guest.env, capture_output=True,
                          text=True, timeout=WAIT, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 2 and "root" in proc.stderr


# What the agent imports before it can answer: each module here costs 10-100 ms under TCG, so
# only requests that need one import it (docs/boot.md). Not a timing test: a list of names.
NOT_AT_START = ("json", "re", "enum", "typing", "threading", "socket", "subprocess", "selectors", "argparse",
                "dataclasses", "inspect", "contextlib", "tempfile", "shutil", "traceback", "queue", "signal",
                "collections", "functools", "runpy", "site")


def test_the_agent_starts_without_the_modules_only_some_requests_need(guest: Guest) -> None:
    probe = AGENT_MAIN.replace("sys.exit(main())", "print(' '.join(sys.modules))")
    proc = subprocess.run([PYTHON, "-E", "-s", "-S", "-c", probe], cwd=guest.lib, env=guest.env, check=True,
                          capture_output=True, text=True, timeout=WAIT)
    loaded = set(proc.stdout.split())
    assert "agent.session" in loaded and "mvm.core.protocol" in loaded
    assert sorted(loaded & set(NOT_AT_START)) == []


def test_every_request_kind_still_works_after_a_lazy_start(agent: Client, tmp_path: Path) -> None:
    """The first of each kind imports what it needs (from the reading loop) and answers."""
    assert agent.run(["true"]).exit["code"] == 0
    path = str(tmp_path / "d" / "f")
    assert agent.call("mkdir", path=str(tmp_path / "d")).type == "result"
    assert write_file(agent, path, b"data").type == "done"
    assert read_file(agent, path)[0] == b"data"
    assert agent.call("remove", path=str(tmp_path / "d"), recursive=True).type == "result"
    assert agent.call("telemetry").type == "result"
    refused = agent.call("connect", host="127.0.0.1", port=1)  # nothing listens on port 1
    assert refused.type == "error" and "cannot connect" in refused.header["message"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["--port", "--fd", "--vsock", "--exec-uid", "--allow-root-for-tests", "--help",
                                 "/dev/vport0p1", "3", "1024", "-1", "03", "x", "", "--fd=3", "--exec", "--"]),
                max_size=6))
def test_quick_argv_parser_agrees_with_argparse(argv: list[str]) -> None:
    """/init's argv skips argparse; anything quick_args takes, argparse must read the same way."""
    from mvm.guest.agent.__main__ import parse_args, quick_args

    quick = quick_args(argv)
    if quick is None:
        return
    assert parse_args(argv) == quick


def test_quick_argv_parser_reads_what_init_writes() -> None:
    from mvm.guest.agent.__main__ import Args, quick_args

    assert quick_args(["--exec-uid", "1000", "--port", "/dev/vport0p1"]) == Args(port="/dev/vport0p1", exec_uid=1000)
    assert quick_args(["--exec-uid", "0", "--vsock", "1024"]) == Args(vsock=1024, exec_uid=0)
    assert quick_args(["--fd", "5", "--allow-root-for-tests"]) == Args(fd=5, allow_root_for_tests=True)
    assert quick_args(["--fd", "5", "--port", "x"]) is None and quick_args(["--help"]) is None


def test_a_mistake_in_the_agents_argv_is_a_usage_error(guest: Guest) -> None:
    proc = subprocess.run([*AGENT, "--fd", "5", "--port", "x"], cwd=guest.lib, env=guest.env, capture_output=True,
                          text=True, timeout=WAIT, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr and "Traceback" not in proc.stderr


# -- exec -------------------------------------------------------------------------------------


def test_exec_streams_stdout_stderr_and_exit_code(agent: Client) -> None:
    run = agent.run(["sh", "-c", "echo out; echo err >&2; head -c 3000000 /dev/zero; exit 7"])
    assert run.exit["code"] == 7 and run.exit["signal"] is None and run.exit["timed_out"] is False
    assert run.out() == b"out\n" + bytes(3000000)
    assert run.out("stderr") == b"err\n"
    agent.ping()
    assert agent.pending(run.id) == []  # exactly one exit, nothing after it


def test_exec_env_cwd_and_clean_base_env(agent: Client, tmp_path: Path) -> None:
    run = agent.run(["sh", "-c", "pwd; echo $FOO; echo $PATH; echo $LANG; env | wc -l"],
                    env={"FOO": "bar"}, cwd=str(tmp_path))
    lines = run.out().decode().splitlines()
    assert lines[:4] == [str(tmp_path), "bar", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                         "C.UTF-8"]
    assert int(lines[4]) <= 6  # PATH HOME LANG FOO, plus what sh itself sets (PWD, SHLVL)
    assert agent.run(["pwd"]).out() == b"/\n"


def test_binary_output_round_trips(agent: Client) -> None:
    data = bytes(range(256)) * 4 + bytes(range(255, -1, -1))
    run = agent.run(["cat"], stdin=data)
    assert run.out() == data and run.exit["code"] == 0


def test_stdin_streams_and_eof_closes_it(agent: Client) -> None:
    request_id, _ = agent.start(["sh", "-c", "read line; echo got:$line; exec wc -c"], stdin=True)
    agent.send({"type": "stdin", "id": request_id}, b"first\n")
    got = agent.next(request_id)  # answered before any eof: the stream is live
    assert (got.type, got.body) == ("stdout", b"got:first\n")
    for _ in range(3):
        agent.send({"type": "stdin", "id": request_id}, b"x" * 100000)
    agent.send({"type": "stdin", "id": request_id, "eof": True})
    run = agent.collect(request_id)
    assert run.out().strip() == b"300000" and run.exit["code"] == 0


def test_exec_without_stdin_reads_dev_null(agent: Client) -> None:
    run = agent.run(["sh", "-c", "cat; readlink /proc/self/fd/0"])
    assert run.out() == b"/dev/null\n"


def test_exit_by_signal(agent: Client) -> None:
    run = agent.run(["sh", "-c", "kill -TERM $$"])
    assert run.exit == {"type": "exit", "id": run.id, "code": None, "signal": 15, "timed_out": False}


def test_signal_request_reaches_the_process_group(agent: Client) -> None:
    request_id, _ = agent.start(["sh", "-c", "sleep 30 & echo up; wait"])
    assert agent.next(request_id).body == b"up\n"
    agent.send({"type": "signal", "id": request_id, "signal": 9})
    run = agent.collect(request_id)
    assert run.exit["signal"] == 9 and run.exit["timed_out"] is False
    agent.ping()  # the agent itself is unharmed


def test_timeout_kills_the_group(agent: Client) -> None:
    started = time.monotonic()
    run = agent.run(["sleep", "30"], timeout=0.5)
    assert run.exit["timed_out"] is True and run.exit["signal"] == 9 and run.exit["code"] is None
    assert time.monotonic() - started < 5


def test_exit_waits_for_output_but_not_for_a_lingering_background_child(agent: Client) -> None:
    started = time.monotonic()
    run = agent.run(["sh", "-c", "echo a; (sleep 30; echo late) & echo b"])
    assert run.out() == b"a\nb\n" and run.exit["code"] == 0
    assert time.monotonic() - started < 5


def test_long_exec_does_not_block_other_requests(agent: Client, tmp_path: Path) -> None:
    request_id, _ = agent.start(["sleep", "30"])
    started = time.monotonic()
    agent.ping()
    assert agent.call("stat", path=str(tmp_path)).type == "result"
    assert agent.run(["true"]).exit["code"] == 0
    assert time.monotonic() - started < 5
    agent.send({"type": "signal", "id": request_id, "signal": 15})
    assert agent.collect(request_id).exit["signal"] == 15


def test_many_concurrent_execs_interleave_by_id(agent: Client) -> None:
    script = "for i in 1 2 3 4 5; do echo $N-$i; echo e$N-$i >&2; sleep 0.05; done; exit $N"
    ids = {agent.start(["sh", "-c", script], env={"N": str(n)})[0]: n for n in range(20)}
    for request_id, n in ids.items():
        run = agent.collect(request_id)
        assert run.out() == "".join(f"{n}-{i}\n" for i in range(1, 6)).encode()
        assert run.out("stderr") == "".join(f"e{n}-{i}\n" for i in range(1, 6)).encode()
        assert run.exit["code"] == n
    order = [request_id for request_id, kind in agent.log if request_id in ids and kind != "started"]
    first_exit = next(i for i, (rid, kind) in enumerate(agent.log) if kind == "exit")
    assert len({rid for rid, _ in agent.log[:first_exit] if rid in ids}) > 1, order  # really interleaved


def test_pty_exec(agent: Client) -> None:
    run = agent.run(["sh", "-c", "tty; stty size; echo err >&2"], pty=True, rows=33, cols=101)
    lines = run.out().decode().splitlines()
    assert re.fullmatch(r"/dev/pts/\d+", lines[0]), lines
    assert lines[1:] == ["33 101", "err"]  # a pty's output is all stdout
    assert {kind for kind, _ in run.frames} == {"stdout"}


def test_pty_resize_and_controlling_terminal(agent: Client) -> None:
    request_id, _ = agent.start(["sh", "-c", "stty -echo; echo ready; read x; stty size; exec cat /proc/self/stat"],
                                pty=True)
    assert b"ready" in agent.next(request_id).body
    agent.send({"type": "resize", "id": request_id, "rows": 40, "cols": 120})
    agent.send({"type": "stdin", "id": request_id}, b"\n")
    run = agent.collect(request_id)
    out = run.out().decode()
    assert "40 120" in out
    fields = out.split(")")[-1].split()
    assert fields[4] != "0"  # tty_nr: the pty is its controlling terminal


def test_pty_eof_is_end_of_input(agent: Client) -> None:
    request_id, _ = agent.start(["sh", "-c", "stty -echo; echo ready; exec wc -l"], pty=True)
    assert b"ready" in agent.next(request_id).body
    agent.send({"type": "stdin", "id": request_id, "eof": True}, b"a\nb\n")
    run = agent.collect(request_id)
    assert run.out().split() == [b"2"] and run.exit["code"] == 0


def test_children_start_with_default_sigint(guest: Guest) -> None:
    """/init starts the agent as an ash background job, which ignores SIGINT and SIGQUIT."""
    def ignore() -> None:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)

    with spawn_agent(guest, preexec_fn=ignore) as client:
        client.hello()
        status = client.run(["cat", "/proc/self/status"]).out().decode()
        ignored = int(re.search(r"SigIgn:\s*([0-9a-f]+)", status).group(1), 16)
        assert not ignored & (1 << 1 | 1 << 2)  # bits of SIGINT (2) and SIGQUIT (3)


def test_uid_other_than_own_is_refused(agent: Client) -> None:
    reply = agent.call("exec", argv=["true"], uid=os.getuid() + 1)
    assert reply.type == "error" and f"uid {os.getuid()}" in reply.header["message"]
    assert agent.run(["true"], uid=os.getuid()).exit["code"] == 0


@pytest.mark.parametrize(("fields", "errno_name"), [
    ({"argv": ["/no/such/program"]}, "ENOENT"),
    ({"argv": ["true"], "cwd": "/no/such/dir"}, "ENOENT"),
    ({"argv": ["NOT_EXECUTABLE"]}, "EACCES"),
])
def test_exec_that_cannot_start_is_an_error(agent: Client, fields: dict[str, Any], errno_name: str,
                                            tmp_path: Path) -> None:
    if fields["argv"] == ["NOT_EXECUTABLE"]:
        (tmp_path / "script").write_text("#!/bin/sh\n")
        fields = {"argv": [str(tmp_path / "script")]}
    reply = agent.call("exec", **fields)
    assert reply.type == "error" and reply.header["errno"] == errno_name, reply.header
    assert reply.header["message"].startswith("/")
    agent.ping()
    assert agent.pending(reply.id) == []  # no started, no exit


@pytest.mark.parametrize("fields", [{}, {"argv": []}, {"argv": "true"}, {"argv": ["true"], "timeout": -1},
                                    {"argv": ["true"], "env": {"A": 1}}, {"argv": ["true"], "pty": "yes"},
                                    {"argv": ["tr\0ue"]}])
def test_bad_exec_requests_are_errors(agent: Client, fields: dict[str, Any]) -> None:
    assert agent.call("exec", **fields).type == "error"
    agent.ping()


# -- console ----------------------------------------------------------------------------------


def test_console_runs_a_login_shell_on_a_pty(agent: Client) -> None:
    request_id = agent.new_id()
    agent.send({"type": "console", "id": request_id, "rows": 30, "cols": 90})
    assert agent.next(request_id).type == "started"
    agent.send({"type": "stdin", "id": request_id}, b"stty size; echo $((6*7)); exit 3\n")
    run = agent.collect(request_id)
    assert b"30 90" in run.out() and b"42" in run.out() and run.exit["code"] == 3


@pytest.mark.parametrize("artifact", ['{"sealed": true}', "{}", "not json", None])
def test_console_refused_on_sealed_image(agent: Client, guest: Guest, artifact: str | None) -> None:
    path = guest.root / "artifact.json"
    if artifact is None:
        path.unlink()  # unreadable metadata: fail closed
    else:
        path.write_text(artifact)
    reply = agent.call("console")
    assert reply.type == "error" and "sealed" in reply.header["message"]
    agent.ping()
    assert agent.pending(reply.id) == []


# -- files ------------------------------------------------------------------------------------


def write_file(agent: Client, path: str, data: bytes, **fields: Any) -> protocol.Frame:
    request_id = agent.new_id()
    chunks = [data[i : i + protocol.CHUNK] for i in range(0, len(data), protocol.CHUNK)] or [b""]
    for n, chunk in enumerate(chunks):
        agent.send({"type": "write", "id": request_id, "path": path, "more": n < len(chunks) - 1, **fields}, chunk)
    return agent.next(request_id)


def read_file(agent: Client, path: str) -> tuple[bytes, dict[str, Any]]:
    request_id = agent.new_id()
    agent.send({"type": "read", "id": request_id, "path": path})
    parts = []
    while (frame := agent.next(request_id)).type == "data":
        assert 0 < len(frame.body) <= protocol.CHUNK
        parts.append(frame.body)
    assert frame.type == "done", frame.header
    return b"".join(parts), frame.header


def test_write_in_chunks_and_read_back(agent: Client, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 12345)
    (tmp_path / "d").mkdir()
    target = tmp_path / "d" / "big.bin"
    done = write_file(agent, str(target), data, mode=0o600)
    assert done.type == "done" and done.header["size"] == len(data)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    back, header = read_file(agent, str(target))
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    assert header["size"] == len(data) and header["mode"] == 0o600
    assert os.listdir(target.parent) == ["big.bin"]  # no temporary file left


def test_write_replaces_and_defaults_to_0644(agent: Client, tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    assert write_file(agent, str(target), b"new").header["size"] == 3
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert write_file(agent, str(tmp_path / "empty"), b"").header["size"] == 0


def test_write_that_fails_midway_leaves_no_temporary_file(guest: Guest, tmp_path: Path) -> None:
    """The agent may write files of at most 1.5 MiB: the second of three chunks fails."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 1024 * 1024 // 2,) * 2)

    target = tmp_path / "out" / "f"
    target.parent.mkdir()
    with spawn_agent(guest, preexec_fn=limit) as client:
        client.hello()
        reply = write_file(client, str(target), os.urandom(3 * protocol.CHUNK))
        assert reply.type == "error" and reply.header["errno"] == "EFBIG", reply.header
        assert reply.header["message"].startswith(f"{target}: ")
        client.ping()
        assert client.pending(reply.id) == []  # one error, the later chunks are dropped
        assert os.listdir(target.parent) == []
        # the same id may be used again once its failed write has ended
        assert write_file(client, str(target), b"small").type == "done"
        assert target.read_bytes() == b"small"


def test_write_into_a_missing_directory_is_one_error(agent: Client, tmp_path: Path) -> None:
    reply = write_file(agent, str(tmp_path / "nope" / "f"), os.urandom(2 * protocol.CHUNK + 1))
    assert reply.type == "error" and reply.header["errno"] == "ENOENT"
    agent.ping()
    assert agent.pending(reply.id) == []


def test_file_operations(agent: Client, tmp_path: Path) -> None:
    base = tmp_path / "a"
    assert agent.call("mkdir", path=str(base / "b" / "c"), parents=True).type == "result"
    assert agent.call("mkdir", path=str(base / "b" / "c"), parents=True).type == "result"  # like mkdir -p
    exists = agent.call("mkdir", path=str(base / "b"))
    assert exists.header["errno"] == "EEXIST" and exists.header["message"] == f"{base / 'b'}: File exists"
    assert agent.call("mkdir", path=str(base / "m"), mode=0o700).type == "result"
    assert stat.S_IMODE((base / "m").stat().st_mode) == 0o700
    (base / "f").write_bytes(b"12345")
    (base / "l").symlink_to("f")

    listing = agent.call("list", path=str(base))
    entries = {e["name"]: e for e in listing.header["entries"]}
    assert sorted(entries) == ["b", "f", "l", "m"]
    assert entries["f"]["type"] == "file" and entries["f"]["size"] == 5
    assert entries["b"]["type"] == "dir" and entries["l"]["type"] == "link"
    assert entries["f"]["mtime"] == pytest.approx((base / "f").stat().st_mtime)

    info = agent.call("stat", path=str(base / "f")).header["stat"]
    assert info == {"name": "f", "type": "file", "size": 5, "mode": stat.S_IMODE((base / "f").stat().st_mode),
                    "mtime": pytest.approx((base / "f").stat().st_mtime), "uid": os.getuid(), "gid": os.getgid()}
    assert agent.call("stat", path=str(base / "l")).header["stat"]["type"] == "link"

    assert agent.call("rename", src=str(base / "f"), dst=str(base / "g")).type == "result"
    assert (base / "g").read_bytes() == b"12345" and not (base / "f").exists()

    missing = agent.call("stat", path=str(base / "f"))
    assert missing.type == "error" and missing.header == {
        "type": "error", "id": missing.id, "message": f"{base / 'f'}: No such file or directory", "errno": "ENOENT"}
    assert agent.call("remove", path=str(base / "b")).header["errno"] == "ENOTEMPTY"
    assert agent.call("remove", path=str(base / "b"), recursive=True).type == "result"
    assert agent.call("remove", path=str(base / "l")).type == "result"
    assert (base / "g").exists()  # removing the link left its target alone
    assert agent.call("remove", path=str(base / "g")).type == "result"
    assert sorted(os.listdir(base)) == ["m"]
    assert agent.call("list", path=str(base / "g")).header["errno"] == "ENOENT"


def test_read_errors(agent: Client, tmp_path: Path) -> None:
    assert agent.call("read", path=str(tmp_path / "missing")).header["errno"] == "ENOENT"
    assert agent.call("read", path=str(tmp_path)).header["errno"] == "EISDIR"
    assert agent.call("read").type == "error"  # no path


# -- telemetry, shutdown ----------------------------------------------------------------------


def test_telemetry(agent: Client, guest: Guest) -> None:
    result = agent.call("telemetry").header
    assert result["type"] == "result"
    assert result["uptime"] > 0 and len(result["load"]) == 3 and all(x >= 0 for x in result["load"])
    assert 0 < result["memory"]["available"] <= result["memory"]["total"]
    assert 0 <= result["disk"]["free"] <= result["disk"]["total"]
    assert result["agent"]["uid"] == os.getuid() and result["agent"]["pid"] > 1
    assert result["entrypoint"] is None  # no pid file

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (guest.root / "entrypoint.pid").write_text(f"{sleeper.pid}\n")
        assert agent.call("telemetry").header["entrypoint"] == {"pid": sleeper.pid, "uid": os.getuid()}
    finally:
        sleeper.kill()
    os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)  # dead, but left a zombie
    assert agent.call("telemetry").header["entrypoint"] is None
    sleeper.wait()
    assert agent.call("telemetry").header["entrypoint"] is None


def test_shutdown_asks_the_control_fifo(agent: Client, guest: Guest) -> None:
    missing = agent.call("shutdown")
    assert missing.type == "error" and missing.header["errno"] == "ENOENT"
    fifo = guest.root / "control"
    os.mkfifo(fifo, 0o600)
    nobody_listens = agent.call("shutdown")
    assert nobody_listens.type == "error" and nobody_listens.header["errno"] == "ENXIO"

    listener = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        reply = agent.call("shutdown")
        assert reply.header == {"type": "result", "id": reply.id}
        assert select.select([listener], [], [], WAIT)[0]
        assert os.read(listener, 100) == b"poweroff\n"
    finally:
        os.close(listener)


def _play_init(guest: Guest, lines: list[str], answer) -> threading.Thread:
    """/init's side of a snapshot: the control fifo's "freeze NONCE" starts the helper, which
    says it is ready, then takes one line on the identity fifo and answers it."""
    for fifo in ("control", "identity-request"):
        os.mkfifo(guest.root / fifo, 0o600)
    status = guest.root / "identity"
    # Open before the agent may write, as /init's listener is: a fifo nobody has open refuses
    # the agent's non-blocking write (ENXIO).
    control = os.open(guest.root / "control", os.O_RDWR)
    request = os.open(guest.root / "identity-request", os.O_RDWR)

    def run() -> None:
        line = os.read(control, 4096).decode()
        lines.append(line)
        status.write_text(f"ready {line.split()[1]}\n")
        while True:
            line = os.read(request, 8192).decode()
            lines.append(line)
            status.write_text(answer(line.split()) + "\n")
            if line.split()[0] != "identity" or answer(line.split()).endswith(" ok"):
                break
        os.close(control)
        os.close(request)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_frozen_agent_refuses_work_until_it_has_an_identity(agent: Client, guest: Guest) -> None:
    lines: list[str] = []
    entropy = os.urandom(64).hex()

    def answer(words: list[str]) -> str:
        done = hashlib.sha256(words[4].encode()).hexdigest()[:32]
        return f"{done} ok" if words[4] == entropy else f"{done} failed bad entropy"

    helper = _play_init(guest, lines, answer)
    assert agent.call("freeze").type == "result"
    assert lines[0].startswith("freeze ") and len(lines[0].split()[1]) == 32
    for kind, fields in (("exec", {"argv": ["true"]}), ("telemetry", {}), ("read", {"path": "/etc/hostname"})):
        reply = agent.call(kind, **fields)
        assert reply.type == "error" and "has not been given its own identity" in reply.header["message"], kind
    agent.ping()  # the host may still see it is there
    fields = {"time": time.time(), "hostname": "clone-1", "machine_id": os.urandom(16).hex()}
    for bad in ({"entropy": "zz" * 32}, {"entropy": "ab"}, {"hostname": "Bad Name"}, {"machine_id": "x"},
                {"time": 5}):
        reply = agent.call("identity", **{"entropy": entropy, **fields, **bad})
        assert reply.type == "error" and reply.header["message"].startswith("identity: "), bad
    failed = agent.call("identity", entropy=os.urandom(64).hex(), **fields)
    assert failed.type == "error" and "could not apply it: bad entropy" in failed.header["message"]
    assert agent.call("identity", entropy=entropy, **fields).type == "result"
    helper.join(WAIT)
    assert lines[-1] == f"identity {fields['time']:.6f} clone-1 {fields['machine_id']} {entropy}\n"
    assert agent.run(["true"]).exit["code"] == 0


def test_thaw_lets_the_snapshotted_vm_carry_on(agent: Client, guest: Guest) -> None:
    lines: list[str] = []
    helper = _play_init(guest, lines, lambda words: "thawed")
    assert agent.call("freeze").type == "result"
    assert agent.call("telemetry").type == "error"
    assert agent.call("thaw").type == "result"
    helper.join(WAIT)
    assert lines[-1] == "thaw\n"
    assert agent.call("telemetry").type == "result"


# -- bad frames, reconnects -------------------------------------------------------------------


def test_bad_frames_get_errors_and_the_channel_lives_on(agent: Client) -> None:
    agent.sock.sendall(struct.pack(">II", 4 + 3, 3) + b"{x]")
    assert agent.next(None).type == "error"
    agent.sock.sendall(struct.pack(">I", protocol.MAX_FRAME + 1) + bytes(protocol.MAX_FRAME + 1))
    assert agent.next(None).type == "error"
    assert agent.call("no-such-op").header["message"] == "unknown request type 'no-such-op'"
    agent.send({"type": "stdin", "id": 999999}, b"x")  # for a process that has ended: dropped
    agent.send({"type": "signal", "id": 999999, "signal": "x"})
    agent.ping()
    assert agent.pending(None) == [] and agent.pending(999999) == []


def test_huge_directory_listing_is_an_error_not_a_crash(agent: Client, tmp_path: Path) -> None:
    for n in range(1500):
        (tmp_path / f"file-with-a-longish-name-{n:05}").touch()
    reply = agent.call("list", path=str(tmp_path))
    assert reply.type == "error" and "does not fit" in reply.header["message"]
    agent.ping()


@contextmanager
def port_agent(guest: Guest, **popen: Any) -> Iterator[tuple[socket.socket, subprocess.Popen]]:
    """The agent on --port, a unix socket standing in for virtio-serial: it connects, and
    reconnects whenever the host side hangs up."""
    directory = Path(tempfile.mkdtemp(prefix="mvm-agent-"))
    directory.chmod(0o755)  # reachable for an agent that runs as nobody
    path = directory / "port"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen()
    server.settimeout(WAIT)
    log = guest.root / "agent.stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(agent_argv("--port", str(path)), cwd=guest.lib, env=guest.env,
                                stdin=subprocess.DEVNULL, stderr=stderr, **popen)
    try:
        yield server, proc
    finally:
        proc.kill()
        proc.wait()
        server.close()
        path.unlink()
        directory.rmdir()
        check_stderr(log)


def accept(server: socket.socket) -> Client:
    sock, _ = server.accept()
    sock.settimeout(None)
    client = Client(sock)
    client.take_opening_hello()
    return client


def test_host_disconnect_kills_running_execs_and_the_agent_comes_back(guest: Guest) -> None:
    with port_agent(guest) as (server, proc):
        client = accept(server)
        client.hello()
        _, pid = client.start(["sleep", "30"])
        client.close()
        client = accept(server)  # the agent reopened its port
        client.hello()
        client.ping()
        deadline = time.monotonic() + WAIT
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)  # the agent reaps it asynchronously; nothing to await on our side
        assert not os.path.exists(f"/proc/{pid}")
        assert proc.poll() is None


SAFE_TYPES = ["ping", "hello", "stat", "list", "read", "telemetry", "stdin", "signal", "resize", "exec", "console"]
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=8)
header_keys = st.sampled_from(["id", "path", "src", "dst", "rows", "cols", "signal", "eof", "more", "mode",
                               "timeout", "uid", "env", "cwd", "pty", "stdin", "parents", "recursive"])


@st.composite
def fuzz_frames(draw: st.DrawFn) -> bytes:
    """A well-framed frame whose header is garbage: wrong JSON, or ops with random fields.
    Only ops that change nothing are drawn; exec and console always run `true`."""
    kind = draw(st.sampled_from(["raw", "json", "op"]))
    body = draw(st.binary(max_size=64))
    if kind == "raw":
        header = draw(st.binary(max_size=64))
        header_len = draw(st.integers(0, 200) | st.just(len(header)))
        return struct.pack(">II", 4 + len(header) + len(body), header_len) + header + body
    if kind == "json":
        header = draw(json_values)
    else:
        header = draw(st.dictionaries(header_keys, json_values, max_size=6))
        header["type"] = draw(st.sampled_from(SAFE_TYPES) | st.text(max_size=10))
        if header["type"] in ("exec", "console"):
            header["argv"] = ["true"]
            header.pop("timeout", None)
    raw = json.dumps(header).encode()
    return struct.pack(">II", 4 + len(raw) + len(body), len(raw)) + raw + body


def can_run_as_nobody(guest: Guest) -> bool:
    try:
        subprocess.run([*AGENT, "--help"], user=NOBODY, group=NOBODY, extra_groups=[], cwd=guest.lib,
                       check=True, timeout=WAIT, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def test_fuzzed_frames_never_kill_the_agent(guest: Guest) -> None:
    """As nobody where the interpreter and sources allow it; only harmless ops are drawn."""
    uid = NOBODY if can_run_as_nobody(guest) else os.getuid()
    as_user = {"user": uid, "group": uid, "extra_groups": []} if uid == NOBODY else {}
    guest.root.chmod(0o755)
    guest.root.parent.chmod(0o755)
    with port_agent(guest, **as_user) as (server, proc):

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(fuzz_frames(), max_size=6), st.binary(max_size=300))
        def throw(frames: list[bytes], raw: bytes) -> None:
            client = accept(server)
            try:
                assert client.hello().header["uid"] == uid
                for frame in frames:
                    client.sock.sendall(frame)
                client.ping()  # well-framed garbage leaves the channel in step
                client.sock.sendall(raw)  # random bytes may not: a fresh connection follows
            finally:
                client.close()
            assert proc.poll() is None

        throw()
        client = accept(server)
        client.hello()
        client.ping()
        client.close()


# -- /init's reading of `run -- ARGV` (mvm.argv=, MVM_ARGV) ---------------------------------------

ARGV_WORDS = re.search(r"^ARGV_WORDS='([^']*)'$", guest_file("init").decode(), re.MULTILINE).group(1)  # type: ignore[union-attr]


def argv_through_init(encoded: str) -> list[str] | None:
    """What /init's `eval "set -- $words"` makes of an encoded argv (None: it gives up)."""
    words = subprocess.run([PYTHON, "-I", "-S", "-c", ARGV_WORDS, encoded], capture_output=True,
                           timeout=WAIT, check=False).stdout.decode().rstrip("\n")  # (bytes: a \r stays \r)
    if not words:
        return None
    out = subprocess.run(["sh", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "sh", words], capture_output=True,
                         timeout=WAIT, check=True).stdout  # (as /init: $words expanded, then eval'd)
    return out.decode().split("\0")[:-1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12),
                min_size=1, max_size=5))
def test_init_reads_back_every_argv_the_host_writes(argv: list[str]) -> None:
    from mvm.runtime.backends.base import (
        encoded_argv,  # what qemu, docker and firecracker pass
    )

    assert argv_through_init(encoded_argv(type("Record", (), {"argv": argv})())) == argv  # type: ignore[arg-type]


@pytest.mark.parametrize("encoded", ["", "!!!", "W10=",  # (not base64; "[]")
                                     "WyJhIiwiYiJd", "WyJhIiwgXQ==", "eyJhIjogMX0=", "WyJhIiwgMV0="])
def test_init_gives_up_on_anything_else(encoded: str) -> None:
    """'["a","b"]' (another separator), '["a", ]', an object, a number: not what the host writes."""
    assert argv_through_init(encoded) is None


def test_a_restarted_agent_reads_nothing_before_the_hosts_hello(guest: Guest, tmp_path: Path) -> None:
    """A virtio-serial port outlives the agent reading it: the agent /init restarted may find
    the tail of a frame sent to the one that died, whose body would read as a frame length
    (here 0xffffffff). It skips to the host's hello instead, and serves what follows."""
    marker = tmp_path / "ran"
    with spawn_agent(guest) as client:
        stale = protocol.encode({"type": "exec", "id": 7, "argv": ["touch", str(marker)]}, b"\xff" * 5000)
        client.sock.sendall(stale[len(stale) // 2:])
        client.hello()
        client.ping()
        assert client.pending(None) == [] and not marker.exists()


@pytest.mark.parametrize("cut", range(len(protocol.HOST_HELLO) + 1))
def test_the_hosts_hello_is_found_wherever_reads_split_it(cut: int) -> None:
    from mvm.guest.agent.serve import BeforeHostHello

    before = BeforeHostHello()
    stream = b"\xff" * 3000 + protocol.HOST_HELLO + b"next"
    split = 3000 + cut
    first = before.skip(stream[:split])
    found = first + stream[split:] if first is not None else before.skip(stream[split:])
    assert found == protocol.HOST_HELLO + b"next"
    assert len(before.tail) < len(protocol.HOST_HELLO)
