"""The runtime SDK against real VMs (qemu under TCG): what a program does with mvm.Sandbox and
mvm.AsyncSandbox, and that sandboxes never outlive what they should."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import mvm
from mvm.errors import CommandFailed, CommandTimeout, SandboxNotFound, SandboxStopped, Unsupported, UsageError
from mvm.runtime.client import AgentError
from mvm.sdk.network import NetworkInfo
from tests.conftest import default_signals
from tests.integration.test_network import LoopbackServer

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", autouse=True)
def home(mvm_home: Path) -> None:
    """The session's MVM_HOME (warm package cache) for this process's SDK calls."""
    os.environ["MVM_HOME"] = str(mvm_home)
    os.environ["MVM_ACCEL"] = os.environ.get("MVM_ACCEL", "tcg")


@pytest.fixture(scope="module")
def sandbox():
    with mvm.Sandbox.create("base", timeout=900, env={"GREETING": "hi"}, workload_id="sdk-tests") as sbx:
        yield sbx


def gone(name: str, within: float = 60) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if name not in {info.name for info in mvm.Sandbox.list()}:
            return True
        time.sleep(0.5)
    return False


def test_commands_run_strings_and_argv_with_env_cwd_and_stdin(sandbox: mvm.Sandbox) -> None:
    result = sandbox.commands.run('echo "$GREETING from $(pwd) as $(id -u)"; echo oops >&2; exit 3', cwd="/tmp")
    assert (result.stdout, result.stderr, result.exit_code) == ("hi from /tmp as 1000\n", "oops\n", 3)
    assert result.duration > 0
    assert sandbox.commands.run(["wc", "-c"], stdin=b"x" * 1000).stdout.strip() == "1000"
    seen: list[str] = []
    sandbox.commands.run("echo streamed", on_stdout=seen.append)
    assert "".join(seen) == "streamed\n"


def test_a_failing_or_endless_command(sandbox: mvm.Sandbox) -> None:
    with pytest.raises(CommandFailed) as failed:
        sandbox.commands.run("exit 4", check=True)
    assert failed.value.result.exit_code == 4
    with pytest.raises(CommandTimeout) as timeout:
        sandbox.commands.run("echo before; sleep 30", timeout=2)
    assert timeout.value.stdout == b"before\n"


def test_files(sandbox: mvm.Sandbox, tmp_path: Path) -> None:
    files = sandbox.files
    files.make_dir("/tmp/sdk")
    assert files.write("/tmp/sdk/a.txt", "hello") == 5
    files.write_many({"/tmp/sdk/b.bin": b"\x00\xff", "/tmp/sdk/c.txt": "c"})
    assert files.read("/tmp/sdk/a.txt") == "hello" and files.read("/tmp/sdk/b.bin", format="bytes") == b"\x00\xff"
    assert sorted(e["name"] for e in files.list("/tmp/sdk")) == ["a.txt", "b.bin", "c.txt"]
    assert files.info("/tmp/sdk/a.txt")["uid"] == 1000  # the user commands run as
    assert sandbox.commands.run("cat /tmp/sdk/a.txt >> /tmp/sdk/c.txt && cat /tmp/sdk/c.txt").stdout == "chello"
    files.rename("/tmp/sdk/c.txt", "/tmp/sdk/d.txt")
    files.remove("/tmp/sdk/a.txt")
    assert not files.exists("/tmp/sdk/a.txt") and files.exists("/tmp/sdk/d.txt")
    assert files.copy_out("/tmp/sdk", tmp_path / "out") == []
    assert (tmp_path / "out" / "b.bin").read_bytes() == b"\x00\xff"


def test_read_as_a_stream_and_list_to_a_depth(sandbox: mvm.Sandbox) -> None:
    data = os.urandom(3 << 20)  # several protocol chunks
    sandbox.files.write("/tmp/big.bin", data)
    stream = sandbox.files.read("/tmp/big.bin", format="stream")
    chunks = list(stream)
    assert len(chunks) > 1 and all(isinstance(c, bytes) for c in chunks) and b"".join(chunks) == data
    half_read = sandbox.files.read("/tmp/big.bin", format="stream")
    assert len(next(half_read)) > 0
    half_read.close()  # (its connection goes; the sandbox serves on)
    with pytest.raises(AgentError, match="No such file"):  # at the call, before any chunk is asked for
        sandbox.files.read("/tmp/not-there", format="stream")
    with pytest.raises(UsageError, match="not a format"):
        sandbox.files.read("/tmp/big.bin", format="lines")  # type: ignore[call-overload]

    sandbox.commands.run("mkdir -p /tmp/tree/a/b/c && echo x > /tmp/tree/a/b/f && echo y > /tmp/tree/top", check=True)
    paths = {d: [e["path"] for e in sandbox.files.list("/tmp/tree", depth=d)] for d in (1, 2, 3, 4)}
    assert paths[1] == ["/tmp/tree/a", "/tmp/tree/top"]
    assert paths[2] == ["/tmp/tree/a", "/tmp/tree/a/b", "/tmp/tree/top"]
    assert paths[3] == ["/tmp/tree/a", "/tmp/tree/a/b", "/tmp/tree/a/b/c", "/tmp/tree/a/b/f", "/tmp/tree/top"]
    assert paths[4] == paths[3]
    assert [e["name"] for e in sandbox.files.list("/tmp/tree/", depth=3)][2:4] == ["c", "f"]
    for bad in (0, 33, True, 1.5):
        with pytest.raises(UsageError, match="depth is a whole number"):
            sandbox.files.list("/tmp/tree", depth=bad)  # type: ignore[arg-type]


def test_forward_to_a_free_host_port(sandbox: mvm.Sandbox) -> None:
    sandbox.files.make_dir("/tmp/www")
    sandbox.files.write("/tmp/www/name", sandbox.name)
    server = sandbox.commands.start("cd /tmp/www && exec python3 -m http.server 8123 --bind 127.0.0.1")
    try:
        address = sandbox.ports.forward(8123)
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert (host, int(port), 8123) in {(p.host_addr, p.host_port, p.guest_port) for p in sandbox.ports.list()}
        deadline = time.monotonic() + 60
        while True:  # (until the guest's server listens)
            try:
                with urllib.request.urlopen(f"http://{address}/name", timeout=10) as reply:
                    assert reply.read().decode().strip() == sandbox.name
                break
            except (urllib.error.URLError, ConnectionError) as err:
                assert not isinstance(err, urllib.error.HTTPError), err
                assert time.monotonic() < deadline, "the forward never reached the guest's server"
                time.sleep(0.3)
        other = sandbox.ports.forward(8124)
        assert other != address
        sandbox.ports.remove(int(port))
        sandbox.ports.remove(int(other.rsplit(":", 1)[1]))
        assert sandbox.ports.list() == []
    finally:
        server.close()


def test_copy_in_a_tree_and_write_from_a_file_object(sandbox: mvm.Sandbox, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "sub" / "deep.bin").write_bytes(b"\x00deep\xff")
    sandbox.files.copy_in(tree, "/tmp/copied")
    assert [e["path"] for e in sandbox.files.list("/tmp/copied", depth=2)] == [
        "/tmp/copied/sub", "/tmp/copied/sub/deep.bin", "/tmp/copied/top.txt"]
    assert sandbox.files.read("/tmp/copied/sub/deep.bin", format="bytes") == b"\x00deep\xff"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 2)
    with big.open("rb") as source:
        assert sandbox.files.write("/tmp/from-file.bin", source) == 2 << 20
    assert sandbox.files.read("/tmp/from-file.bin", format="bytes") == big.read_bytes()


def test_run_with_its_own_env_and_stderr_callback(sandbox: mvm.Sandbox) -> None:
    errors: list[str] = []
    result = sandbox.commands.run('echo "$GREETING $EXTRA" >&2; echo out', env={"EXTRA": "there", "GREETING": "hello"},
                                  on_stderr=errors.append)
    assert "".join(errors) == "hello there\n" == result.stderr and result.stdout == "out\n"
    assert sandbox.commands.run('echo "$GREETING${EXTRA:-}"').stdout == "hi\n"  # (the sandbox's own env again)


def test_run_keeps_what_max_output_allows_and_counts_the_rest(sandbox: mvm.Sandbox) -> None:
    result = sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\000' a; echo oops >&2", max_output=10)
    assert (result.stdout, result.stdout_dropped) == ("a" * 10, 3_000_000 - 10)
    assert (result.stderr, result.stderr_dropped) == ("oops\n", 0)


def test_a_directory_template_and_its_console_in_logs(tmp_path: Path) -> None:
    """The base template's entrypoint prints nothing (and its kernel is quiet): a directory
    template whose entrypoint says something, read back through logs()."""
    (tmp_path / "mvm.toml").write_text('name = "sdk-logs"\n[entrypoint]\ncommand = ["/bin/sh", "-c", '
                                       '"echo hello from the entrypoint; while :; do sleep 3600; done"]\n')
    with mvm.Sandbox.create(str(tmp_path), timeout=600) as sbx:
        deadline = time.monotonic() + 60
        while "hello from the entrypoint" not in sbx.logs():
            assert time.monotonic() < deadline, sbx.logs()[-2000:]
            time.sleep(0.2)
        assert sbx.commands.run("hostname").stdout.strip() == "sdk-logs"


def test_the_python_template_has_debians_python_and_its_standard_library() -> None:
    with mvm.Sandbox.create("python", timeout=600) as sbx:
        result = sbx.commands.run(["python3", "-c", "import sqlite3, ssl, venv, json, sys; "
                                   "print(sqlite3.sqlite_version, sys.version_info[0])"])
        assert result.exit_code == 0 and result.stdout.split()[1] == "3", result
        assert sbx.commands.run("python3 -m json.tool", stdin='{"a": [1]}').stdout == '{\n    "a": [\n        1\n    ]\n}\n'


def test_pause_freezes_it_and_resume_thaws_it(sandbox: mvm.Sandbox) -> None:
    """A guest counter: it advances between two reads a while apart, and not across a pause
    of longer than that."""
    counter = sandbox.commands.start("i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; "
                                     "mv /tmp/count.new /tmp/count; sleep 0.05; done")

    def count() -> int:
        return int(sandbox.files.read("/tmp/count") or 0)

    try:
        deadline = time.monotonic() + 30
        while not sandbox.files.exists("/tmp/count"):
            assert time.monotonic() < deadline
        first = count()
        time.sleep(1.5)
        running = count() - first
        assert running >= 3, f"the counter hardly runs ({running} in 1.5 s)"
        before = count()
        sandbox.pause()
        try:
            assert sandbox.info().state == "paused" and sandbox.is_running()
            time.sleep(3)  # twice as long as the run above
        finally:
            sandbox.resume()
        after = count()
        assert after - before < running / 2, f"it counted {after - before} while paused ({running} running)"
        assert sandbox.info().state == "running"
        deadline = time.monotonic() + 30
        while count() == after:  # and counts on
            assert time.monotonic() < deadline, "the counter stopped after resume"
    finally:
        counter.close()


def test_info_connect_list_and_what_this_version_refuses(sandbox: mvm.Sandbox) -> None:
    info = sandbox.info()
    assert info.state == "running" and info.isolation == "microvm" and info.workload_id == "sdk-tests"
    assert info.deadline is not None and info.deadline > time.time()
    assert mvm.Sandbox.connect(sandbox.name).commands.run("true").exit_code == 0
    assert sandbox.name in {i.name for i in mvm.Sandbox.list()}
    with pytest.raises(UsageError, match="not a network mode"):
        mvm.Sandbox.create(network="closed")
    with pytest.raises(SandboxNotFound):
        mvm.Sandbox.connect("no-such-sandbox")


def test_an_allow_list_sandbox_reaches_what_it_lists_and_nothing_else() -> None:
    """Servers this test runs on the host's 127.0.0.1: the listed one answers inside the guest
    at the same address; the other is refused until ``network.allow`` lists it."""
    listed, other = LoopbackServer(b"listed\n"), LoopbackServer(b"other\n")
    first, second = f"127.0.0.1:{listed.port}", f"127.0.0.1:{other.port}"

    def nc(sbx: mvm.Sandbox, port: int) -> str:
        return sbx.commands.run(f"nc -w 5 127.0.0.1 {port} </dev/null 2>&1").stdout

    try:
        with pytest.raises(UsageError, match="nonsense"):
            mvm.Sandbox.create(network="allow-list", allow=["nonsense"])
        with pytest.raises(UsageError, match="network mode is 'deny'"):
            mvm.Sandbox.create(network="deny", allow=[first])
        with mvm.Sandbox.create("base", network="allow-list", allow=[first], timeout=600) as sbx:
            assert sbx.network.info() == NetworkInfo("allow-list", [first])
            assert nc(sbx, listed.port) == "listed\n"
            assert "other" not in nc(sbx, other.port) and other.connections == 0
            assert sbx.network.allow(second) == [first, second]
            assert nc(sbx, other.port) == "other\n"
            assert sbx.network.deny(first) == [second]
            served = listed.connections
            assert "listed" not in nc(sbx, listed.port) and listed.connections == served
            assert sbx.network.info() == NetworkInfo("allow-list", [second])
    finally:
        listed.sock.close()
        other.sock.close()


def test_a_started_command_streams_takes_stdin_and_can_be_killed(sandbox: mvm.Sandbox) -> None:
    seen: list[str] = []
    with sandbox.commands.start("read line; echo got:$line; echo oops >&2; exit 3", on_stdout=seen.append) as handle:
        assert handle.pid > 1 and handle.exit_code is None
        handle.send_stdin("hello\n")
        handle.close_stdin()
        result = handle.wait()
    assert (result.stdout, result.stderr, result.exit_code) == ("got:hello\n", "oops\n", 3)
    assert "".join(seen) == "got:hello\n"

    ticker = sandbox.commands.start(["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.1; done"])
    chunks = []
    for stream, text in ticker:  # output as it arrives, while the command still runs
        chunks.append((stream, text))
        if "tick3" in "".join(t for _, t in chunks):
            ticker.kill()
    assert ticker.wait().exit_code != 0 and ticker.exit_code is not None
    assert sandbox.commands.run(f"kill -0 {ticker.pid} 2>/dev/null || echo gone").stdout == "gone\n"

    orphan = sandbox.commands.start("sleep 600")
    pid = orphan.pid
    orphan.close()  # letting go of the handle kills what it started
    deadline = time.monotonic() + 30
    while sandbox.commands.run(f"kill -0 {pid} 2>/dev/null && echo alive").stdout:
        assert time.monotonic() < deadline, "a closed handle's command lives on"


def test_a_builtin_is_saved_as_a_template_and_later_sandboxes_clone_it(sandbox: mvm.Sandbox) -> None:
    """The module's sandbox made the template (or cloned one an earlier run made)."""
    with mvm.Sandbox.create("base", timeout=600) as clone:
        assert clone.info().snapshot is not None and clone.info().snapshot.startswith("sdk-base-")
        assert clone.commands.run("hostname").stdout.strip() == clone.name
    with mvm.Sandbox.create("base", timeout=600, cold=True) as booted:
        assert booted.info().snapshot is None


def test_snapshot_create_from_it_and_fork(sandbox: mvm.Sandbox) -> None:
    from mvm.core.state import MvmHome
    from mvm.runtime.cloning import remove_snapshot

    sandbox.files.write("/tmp/saved", "before the snapshot")
    assert sandbox.snapshot("sdk-test-snap") == "sdk-test-snap"
    try:
        with mvm.Sandbox.create("sdk-test-snap", timeout=600) as clone:
            assert clone.files.read("/tmp/saved") == "before the snapshot"
            assert clone.info().snapshot == "sdk-test-snap"
            clone.files.write("/tmp/saved", "changed in the clone")
        assert sandbox.files.read("/tmp/saved") == "before the snapshot"
        copies = sandbox.fork(2)
        try:
            assert len(copies) == 2
            names = {c.commands.run("hostname").stdout.strip() for c in copies}
            assert names == {c.name for c in copies}
            assert all(c.files.read("/tmp/saved") == "before the snapshot" for c in copies)
            assert all(c.info().deadline is not None for c in copies)  # they end when it would
        finally:
            for copy in copies:
                copy.kill()
    finally:
        remove_snapshot(MvmHome.default(), "sdk-test-snap")


def test_leaving_the_block_on_an_exception_removes_the_sandbox() -> None:
    with pytest.raises(RuntimeError), mvm.Sandbox.create() as sbx:
        name = sbx.name
        raise RuntimeError("boom")
    assert gone(name, within=5)


def test_ctrl_c_cleans_up_detach_keeps_and_a_killed_one_says_stopped() -> None:
    """A program interrupted by SIGINT: the sandbox of its with block and the one left to exit
    go; the detached one lives on (until its lifetime ends or it is killed)."""
    program = textwrap.dedent("""
        import mvm, time
        kept = mvm.Sandbox.create(timeout=600)
        kept.detach()
        left = mvm.Sandbox.create(timeout=600)
        with mvm.Sandbox.create(timeout=600) as block:
            print(kept.name, left.name, block.name, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy(), preexec_fn=default_signals)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    kept, left, block = line.split()
    os.kill(proc.pid, signal.SIGINT)
    assert "KeyboardInterrupt" in proc.communicate(timeout=120)[1]
    try:
        assert gone(block, within=5) and gone(left, within=5)  # (already gone when the program ended)
        detached = mvm.Sandbox.connect(kept)
        assert detached.is_running() and detached.commands.run("true").exit_code == 0
        handle = detached.commands.start("sleep 600")
        detached.kill()
        with pytest.raises(SandboxStopped):
            handle.wait()
        assert not detached.is_running()
        for call in (lambda: detached.commands.run("true"), lambda: detached.files.read("/etc/passwd"),
                     detached.info, detached.pause, detached.logs):
            with pytest.raises(SandboxStopped, match="was killed"):
                call()
        assert gone(kept, within=5)
    finally:
        mvm.Sandbox.connect(kept).kill() if kept in {i.name for i in mvm.Sandbox.list()} else None


def test_its_lifetime_ends_it_even_if_the_program_is_killed(tmp_path: Path) -> None:
    program = textwrap.dedent("""
        import mvm, sys, time
        sbx = mvm.Sandbox.create(timeout=600)
        sbx.set_timeout(5)
        print(sbx.name, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy(), preexec_fn=default_signals)
    assert proc.stdout is not None
    name = proc.stdout.readline().strip()
    assert name.startswith("sbx-")
    os.kill(proc.pid, signal.SIGKILL)  # no __exit__, no atexit: only its supervisor's deadline is left
    proc.wait()
    assert gone(name, within=90), f"sandbox {name} outlived its lifetime"


def test_the_async_twin_runs_four_sandboxes_at_once() -> None:
    async def one(i: int) -> str:
        async with await mvm.AsyncSandbox.create(timeout=600) as sbx:
            await sbx.files.write("/tmp/n", str(i))
            return (await sbx.commands.run("cat /tmp/n")).stdout

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(4)))

    assert asyncio.run(main()) == ["0", "1", "2", "3"]
    from mvm.core.state import MvmHome
    from mvm.security import audit_verify

    report = audit_verify.verify(MvmHome.default())  # four VMs' supervisors and this process wrote at once
    assert report.ok, report.problem and report.problem.text()
    surfaces = {(e["operation"], e["actor"]["surface"]) for e in audit_verify.entries(MvmHome.default())}
    assert {("up", "sdk"), ("write", "sdk"), ("exec", "sdk"), ("down", "sdk")} <= surfaces


def test_the_async_twin_awaits_a_started_command_and_a_stream_without_blocking_the_loop(sandbox: mvm.Sandbox) -> None:
    """While the guest's command runs, other coroutines run: the handle waits in a worker thread."""
    async def main() -> tuple[list[tuple[str, str]], int, int, bytes]:
        sbx = await mvm.AsyncSandbox.connect(sandbox.name)
        beats = 0

        async def heartbeat() -> None:
            nonlocal beats
            while True:
                beats += 1
                await asyncio.sleep(0.02)

        beating = asyncio.create_task(heartbeat())
        try:
            async with await sbx.commands.start("read x; echo got $x; sleep 1; echo late >&2; exit 5") as handle:
                assert isinstance(handle, mvm.AsyncCommandHandle) and handle.pid > 1
                await handle.send_stdin("it\n")
                await handle.close_stdin()
                seen = [item async for item in handle]
                before = beats
                result = await handle.wait()
            await asyncio.sleep(0.1)
            assert beats > before  # (the loop ran on)
            await sbx.files.write("/tmp/async.bin", b"z" * (2 << 20))
            stream = await sbx.files.read("/tmp/async.bin", format="stream")
            data = b"".join([chunk async for chunk in stream])
        finally:
            beating.cancel()
        return seen, result.exit_code, beats, data

    seen, code, beats, data = asyncio.run(main())
    assert seen == [("stdout", "got it\n"), ("stderr", "late\n")] and code == 5
    assert beats >= 25  # ~50 a second across the command's second of sleep
    assert data == b"z" * (2 << 20)


def test_the_async_twin_has_every_method_with_its_signature() -> None:
    """Written out, not generated: an IDE shows them. Each has the sync one's parameters."""
    import inspect

    from mvm.sdk import aio, files, network, sandbox

    pairs = [(sandbox.Sandbox, aio.AsyncSandbox), (sandbox.Commands, aio.AsyncCommands),
             (files.Files, aio.AsyncFiles), (network.Ports, aio.AsyncPorts), (network.Network, aio.AsyncNetwork),
             (mvm.CommandHandle, aio.AsyncCommandHandle)]
    for sync_class, async_class in pairs:
        for name, method in inspect.getmembers(sync_class, callable):
            if name.startswith("_") or name in ("start",) and sync_class is mvm.CommandHandle:
                continue
            assert name in async_class.__dict__, f"{async_class.__name__}.{name} is missing"
            twin = getattr(async_class, name)
            assert inspect.signature(twin).parameters.keys() == inspect.signature(method).parameters.keys(), name
            assert name == "detach" or inspect.iscoroutinefunction(twin), f"{async_class.__name__}.{name} is not async"


def test_the_async_twin_forks() -> None:
    async def main() -> list[str]:
        async with await mvm.AsyncSandbox.create(timeout=600) as sbx:
            await sbx.files.write("/tmp/n", "parent")
            copies = await sbx.fork(2)
            try:
                return [(await c.files.read("/tmp/n")) for c in copies]
            finally:
                for copy in copies:
                    await copy.kill()

    assert asyncio.run(main()) == ["parent", "parent"]


def test_two_sandboxes_from_two_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple[str, str]:
        with mvm.Sandbox.create(timeout=600) as sbx:
            sbx.files.write("/tmp/who", f"thread {i}")
            return sbx.name, sbx.commands.run("cat /tmp/who").stdout

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(2)))
    assert [out for _, out in results] == ["thread 0", "thread 1"]
    assert results[0][0] != results[1][0]
    assert all(gone(name, within=30) for name, _ in results)


def test_on_docker_the_same_methods_and_snapshots_refused(docker_mvmctl, dockerd) -> None:
    os.environ["DOCKER_HOST"] = dockerd.host
    try:
        with mvm.Sandbox.create("base", timeout=600, backend="docker") as sbx:
            info = sbx.info()
            assert info.backend == "docker" and info.isolation == "container" and info.snapshot is None
            sbx.files.write("/tmp/d.txt", "on docker")
            assert sbx.commands.run("cat /tmp/d.txt").stdout == "on docker"
            handle = sbx.commands.start("read x; echo got $x")
            handle.send_stdin("it\n")
            handle.close_stdin()
            assert handle.wait().stdout == "got it\n"
            with pytest.raises(Unsupported, match="a container has no memory state"):
                sbx.snapshot("nope")
            with pytest.raises(Unsupported, match="fork"):
                sbx.fork(1)
            name = sbx.name
        assert gone(name, within=30)
    finally:
        os.environ.pop("DOCKER_HOST", None)
