"""`mvmctl exec` without click: what it imports, that it runs a command end to end through a
VM's control socket, and that when it cannot reach the VM, or the words are wrong, it says
exactly what the click path says."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvm.core import protocol, state

# what exec's fast path must not load: each costs more than a guest round trip, or drags in more
HEAVY = ("click", "dataclasses", "typing", "pathlib", "pydantic", "inspect", "tempfile", "contextlib", "shutil",
         "asyncio", "mvm.core.state", "mvm.runtime.lifecycle", "mvm.cli.commands", "mvm.cli.guest")
FAST_ENTRY = "from mvm.cli.main import main; main()"
CLICK_ENTRY = "from mvm.cli.commands import cli; cli(prog_name='mvmctl')"


@pytest.fixture
def mvm_home() -> Iterator[Path]:
    """A home short enough for unix socket paths (pytest's tmp_path can be too long)."""
    root = Path(tempfile.mkdtemp(prefix="mvmx-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run(entry: str, *words: str, home_dir: Path, modules_to: Path | None = None) -> subprocess.CompletedProcess:
    """mvmctl in a fresh interpreter (``python -c entry`` sees ``words`` as its argv[1:])."""
    prelude = ""
    if modules_to is not None:
        prelude = ("import atexit, sys; atexit.register(lambda: open(%r, 'w').write(' '.join(sorted(sys.modules))))\n"
                   % str(modules_to))
    return subprocess.run([sys.executable, "-c", prelude + entry, *words], env={**os.environ, "MVM_HOME": str(home_dir)},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


class StandInSupervisor:
    """A VM's control socket answering one exec the way a supervisor relays the agent's replies."""

    def __init__(self, ctl_socket: Path, stdout: bytes, stderr: bytes, code: int) -> None:
        ctl_socket.parent.mkdir(parents=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(ctl_socket))
        self.server.listen(1)
        self.replies = (stdout, stderr, code)
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        decoder = protocol.Decoder()
        with conn:
            while data := conn.recv(65536):
                for frame in decoder.feed(data):
                    self.requests.append(frame.header)
                    if frame.type == "exec":
                        stdout, stderr, code = self.replies
                        conn.sendall(protocol.encode({"type": "started", "id": frame.id, "pid": 7})
                                     + protocol.encode({"type": "stdout", "id": frame.id}, stdout)
                                     + protocol.encode({"type": "stderr", "id": frame.id}, stderr)
                                     + protocol.encode({"type": "exit", "id": frame.id, "code": code, "signal": None,
                                                        "timed_out": False}))

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=10)


def test_exec_modules_import_nothing_heavy() -> None:
    code = ("import sys, mvm.cli.main, mvm.cli.exec_argv, mvm.cli.exec_run, mvm.cli.failure; "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "mvm.runtime.client" in loaded
    assert sorted(loaded & set(HEAVY)) == []


def test_fast_path_runs_a_command_and_ends_with_its_status(mvm_home: Path, tmp_path: Path) -> None:
    supervisor = StandInSupervisor(mvm_home / "vms" / "fx1" / "ctl.sock", b"out\n", b"err\n", 3)
    modules = tmp_path / "modules"
    try:
        proc = run(FAST_ENTRY, "exec", "--env", "A=1", "fx1", "--cwd=/srv", "--timeout", "9", "--", "echo", "hi",
                   home_dir=mvm_home, modules_to=modules)
    finally:
        supervisor.close()
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    exec_request = next(r for r in supervisor.requests if r["type"] == "exec")
    assert {k: v for k, v in exec_request.items() if k != "id"} == {
        "type": "exec", "argv": ["echo", "hi"], "env": {"A": "1"}, "cwd": "/srv", "timeout": 9.0,
        "stdin": False, "pty": False, "surface": "cli"}  # (the surface goes into its audit record)
    loaded = set(modules.read_text().split())
    assert "mvm.cli.exec_run" in loaded
    assert sorted(loaded & set(HEAVY)) == []


@pytest.mark.parametrize("words", [
    ["exec", "nosuch", "--", "true"],  # no VM: the fast path falls back to the record's error
    ["exec", "Bad/Name", "--", "true"],
    ["exec", "gone", "--", "true"],  # stopped, with a stale socket file left behind
    ["exec", "gone", "--env", "X", "--", "true"],
    ["exec", "gone", "--timeout", "0", "--", "true"],
    ["exec", "gone", "-h"],
    ["exec", "gone", "--bogus=1", "--", "true"],
    ["exec", "gone", "--timeout", "soon", "--", "true"],
], ids=" ".join)
def test_fast_path_says_what_the_click_path_says(mvm_home: Path, words: list[str]) -> None:
    paths = state.MvmHome(mvm_home).vm("gone")
    paths.dir.mkdir(parents=True)
    state.VmRecord(name="gone", artifact_key="k", artifact_name="gone", backend="qemu", accel="tcg", mode="detached",
                   vcpus=1, memory_mib=256, accessible=False, sealed=True, uids={}, state="stopped",
                   stop_reason="the entrypoint exited with code 0").save(paths)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(paths.ctl_socket))
    stale.close()  # the file stays; connecting to it is refused
    fast = run(FAST_ENTRY, *words, home_dir=mvm_home)
    slow = run(CLICK_ENTRY, *words, home_dir=mvm_home)
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
    assert fast.returncode != 0 or words[-1] == "-h"
    assert "Traceback" not in fast.stderr
