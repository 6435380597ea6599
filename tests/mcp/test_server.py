"""`mvmctl mcp` spoken to by the official MCP SDK's own stdio client, with real sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

pytestmark = pytest.mark.vm


def server(home: Path, **limits: str) -> StdioServerParameters:
    env = {**os.environ, "MVM_HOME": str(home), **limits}
    return StdioServerParameters(command=sys.executable, args=["-m", "mvm.cli.main", "mcp"], env=env)


async def tool(client: ClientSession, name: str, **arguments: Any) -> tuple[bool, Any]:
    """(is_error, the structured result or the error's text)."""
    result = await client.call_tool(name, arguments)
    if result.isError:
        return True, " ".join(getattr(c, "text", "") for c in result.content)
    if result.structuredContent is not None:
        content = result.structuredContent
        return False, content.get("result", content) if set(content) == {"result"} else content
    return False, json.loads(result.content[0].text)


def vms(home: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "mvm.cli.main", "ls", "--json"], capture_output=True, text=True,
                         env={**os.environ, "MVM_HOME": str(home)}, check=True).stdout
    return {vm["name"] for vm in json.loads(out) if vm["state"] != "stopped"}


def run_client(home: Path, body, **limits: str) -> Any:
    async def main() -> Any:
        async with stdio_client(server(home, **limits)) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            return await body(client)
    return asyncio.run(main())


def test_tools_run_code_and_reuse_a_session_then_leave_nothing(mvm_home: Path) -> None:
    receipts: list[str] = []

    async def body(client: ClientSession) -> str:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"run", "sandbox_create", "sandbox_exec", "sandbox_read_file", "sandbox_write_file",
                "sandbox_list_files", "sandbox_list", "sandbox_destroy"} <= names
        error, first = await tool(client, "run", code="echo hi; echo err >&2; exit 3")
        assert not error and (first["exit_code"], first["stdout"], first["stderr"]) == (3, "hi\n", "err\n")
        session = first["session"]
        receipts.append(first["receipt"])
        await tool(client, "run", code="echo kept > /tmp/state", session=session)
        error, again = await tool(client, "run", code="cat /tmp/state", session=session)
        assert again["stdout"] == "kept\n" and again["session"] == session
        error, big = await tool(client, "run", code="head -c 100000 /dev/zero | tr '\\000' a", session=session)
        assert big["stdout"].startswith("a" * 1000) and "34464 more bytes truncated" in big["stdout"]
        error, wrote = await tool(client, "sandbox_write_file", sandbox=session, path="/tmp/f.txt", content="x")
        assert not error and wrote["size"] == 1
        assert (await tool(client, "sandbox_read_file", sandbox=session, path="/tmp/f.txt"))[1] == "x"
        error, endless = await tool(client, "sandbox_read_file", sandbox=session, path="/dev/zero")  # (never ends)
        assert not error and endless.endswith("[... truncated at 64 KiB]") and len(endless) < 70_000
        error, entries = await tool(client, "sandbox_list_files", sandbox=session, path="/tmp")
        assert "f.txt" in {e["name"] for e in entries}
        error, nope = await tool(client, "sandbox_exec", sandbox="not-ours", command="true")
        assert error and "no sandbox 'not-ours' of this server" in nope
        assert session in vms(mvm_home)
        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        assert f"sandbox://{session}" in listed and listed[f"sandbox://{session}"].mimeType == "application/json"
        read = await client.read_resource(f"sandbox://{session}")
        info = json.loads(read.contents[0].text)
        assert info["name"] == session and info["state"] == "running" and info["isolation"] == "microvm"
        return session

    session = run_client(mvm_home, body)
    shown = json.loads(subprocess.run([sys.executable, "-m", "mvm.cli.main", "receipt", "show", "--json", receipts[0]],
                                      capture_output=True, text=True, check=True,
                                      env={**os.environ, "MVM_HOME": str(mvm_home)}).stdout)
    assert shown["verifies"] and shown["record"]["actor"]["surface"] == "mcp"  # its audit record says MCP
    assert shown["record"]["exit_status"] == 3 and shown["record"]["vm"] == session
    deadline = time.monotonic() + 30
    while session in vms(mvm_home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert session not in vms(mvm_home)  # the client went away: its sandboxes went too


def test_sandbox_create_with_an_allow_list(mvm_home: Path) -> None:
    """One sandbox that may reach a server this test runs on 127.0.0.1, and nothing else."""
    from tests.integration.test_network import LoopbackServer

    listed, other = LoopbackServer(b"listed\n"), LoopbackServer(b"other\n")

    async def body(client: ClientSession) -> None:
        error, bad = await tool(client, "sandbox_create", network="allow-list", allow=["nonsense"])
        assert error and "nonsense" in bad
        error, made = await tool(client, "sandbox_create", network="allow-list", allow=[f"127.0.0.1:{listed.port}"])
        assert not error and made["network"] == "allow-list", made
        for port, expected in ((listed.port, "listed\n"), (other.port, "")):
            error, ran = await tool(client, "sandbox_exec", sandbox=made["sandbox"],
                                    command=f"nc -w 5 127.0.0.1 {port} </dev/null")
            assert not error and ran["stdout"] == expected
        assert other.connections == 0

    try:
        run_client(mvm_home, body, MVM_MCP_NETWORK="deny,allow-list")
    finally:
        listed.sock.close()
        other.sock.close()


def test_the_operator_decides_which_networks_a_model_may_ask_for(mvm_home: Path) -> None:
    """By default a model gets no network at all: an allow-list could name the host's own services."""
    async def body(client: ClientSession) -> None:
        for network, allow in (("open", None), ("allow-list", ["127.0.0.1:5432"]), (None, ["127.0.0.1:5432"])):
            error, refused = await tool(client, "sandbox_create", network=network, allow=allow)
            assert error and "MVM_MCP_NETWORK=deny" in refused, refused
        assert (await tool(client, "sandbox_list"))[1] == []

    run_client(mvm_home, body)


def test_limits_busy_memory_and_idle(mvm_home: Path) -> None:
    async def body(client: ClientSession) -> None:
        slow = tool(client, "run", code="sleep 3; echo done", close=True)
        fast = tool(client, "run", code="true", close=True)
        results = await asyncio.gather(slow, fast)
        assert sum(1 for error, text in results if error and "busy" in text) == 1
        error, made = await tool(client, "sandbox_create")
        assert not error
        error, refused = await tool(client, "sandbox_create")
        assert error and "MVM_MCP_MEM_CEILING_MIB=400" in refused
        deadline = time.monotonic() + 60
        while (await tool(client, "sandbox_list"))[1] and time.monotonic() < deadline:
            await asyncio.sleep(1)
        assert (await tool(client, "sandbox_list"))[1] == []  # idle past MVM_MCP_SESSION_IDLE: destroyed
        assert made["sandbox"] not in vms(mvm_home)

    run_client(mvm_home, body, MVM_MCP_MAX_INFLIGHT="1", MVM_MCP_MEM_CEILING_MIB="400", MVM_MCP_SESSION_IDLE="4")


def test_a_sandbox_ends_at_the_session_maximum_even_while_used(mvm_home: Path) -> None:
    async def body(client: ClientSession) -> None:
        error, made = await tool(client, "run", code="echo up")
        assert not error
        name = made["session"]
        deadline = time.monotonic() + 90
        while name in vms(mvm_home):  # its supervisor ends it MVM_MCP_SESSION_MAX after its start
            assert time.monotonic() < deadline, "the sandbox outlived MVM_MCP_SESSION_MAX"
            await tool(client, "run", code="true", session=name)  # busy is no excuse
            await asyncio.sleep(1)
        error, why = await tool(client, "run", code="true", session=name)
        assert error

    run_client(mvm_home, body, MVM_MCP_SESSION_MAX="15", MVM_MCP_SESSION_IDLE="600")


def test_a_killed_server_leaves_nothing_past_its_session_maximum(mvm_home: Path) -> None:
    """SIGKILL gives the server no chance to clean up: each sandbox's own supervisor ends it."""
    import psutil

    made: list[str] = []

    async def main() -> None:
        async with stdio_client(server(mvm_home, MVM_MCP_SESSION_MAX="20", MVM_MCP_SESSION_IDLE="600")) as (read, write):
            async with ClientSession(read, write) as client:
                await client.initialize()
                error, result = await tool(client, "run", code="echo up")
                assert not error
                made.append(result["session"])
                ours = [p for p in psutil.Process().children(recursive=True)
                        if "mcp" in p.cmdline() and "mvm.cli.main" in p.cmdline()]
                assert len(ours) == 1, ours
                ours[0].kill()
                ours[0].wait(30)

    try:
        asyncio.run(main())
    except BaseException as err:  # noqa: BLE001 - the client's streams end mid-session: expected
        if isinstance(err, AssertionError):
            raise
    assert made and made[0] in vms(mvm_home)  # the server is gone, its sandbox not yet
    deadline = time.monotonic() + 90
    while made[0] in vms(mvm_home):
        assert time.monotonic() < deadline, "the sandbox outlived its killed server's MVM_MCP_SESSION_MAX"
        time.sleep(0.5)


@pytest.mark.parametrize("limit", ["MVM_MCP_MAX_INFLIGHT", "MVM_MCP_MEM_CEILING_MIB", "MVM_MCP_SESSION_IDLE",
                                   "MVM_MCP_SESSION_MAX"])
@pytest.mark.parametrize("bad", ["0", "-1", "many", "2.5", ""])
def test_a_bad_limit_is_refused_at_start(mvm_home: Path, limit: str, bad: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mvm.cli.main", "mcp"], capture_output=True, text=True,
                          env={**os.environ, "MVM_HOME": str(mvm_home), limit: bad},
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and f"{limit}={bad!r}" in proc.stderr, proc.stderr


def test_timeouts_are_clamped_and_a_timeout_is_a_result_and_python_runs(mvm_home: Path) -> None:
    async def body(client: ClientSession) -> None:
        started = time.monotonic()
        error, quick = await tool(client, "run", code="echo before; sleep 30", timeout_secs=0)
        assert not error and quick["timed_out"] and quick["exit_code"] == 137 and quick["timeout_secs"] == 1, quick
        assert quick["stdout"] == "before\n" and time.monotonic() - started < 30
        session = quick["session"]
        error, ran = await tool(client, "run", code="echo ok", session=session, timeout_secs=10000)
        assert not error and ran["timeout_secs"] == 600 and not ran["timed_out"] and ran["stdout"] == "ok\n"
        error, ran = await tool(client, "sandbox_exec", sandbox=session, command="true", timeout_secs=-5)
        assert not error and ran["timeout_secs"] == 1
        error, py = await tool(client, "run", code="import sys; print(sys.version_info[0]); sys.exit(4)",
                               env="python", close=True)
        assert not error and (py["stdout"], py["exit_code"], py["session"]) == ("3\n", 4, None), py

    run_client(mvm_home, body)


@pytest.mark.parametrize("bad", ["", "deny,mesh", "everything"])
def test_a_bad_network_setting_is_refused_at_start(mvm_home: Path, bad: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mvm.cli.main", "mcp"], stdin=subprocess.DEVNULL, capture_output=True,
                          env={**os.environ, "MVM_HOME": str(mvm_home), "MVM_MCP_NETWORK": bad},
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "MVM_MCP_NETWORK" in proc.stderr


@pytest.mark.parametrize("bad", ["yes", "2", ""])
def test_a_bad_overcommit_setting_is_refused_at_start(mvm_home: Path, bad: str) -> None:
    """Whether sandboxes may ask for more than the host has is the operator's call, said exactly."""
    proc = subprocess.run([sys.executable, "-m", "mvm.cli.main", "mcp"], capture_output=True, text=True,
                          env={**os.environ, "MVM_HOME": str(mvm_home), "MVM_MCP_OVERCOMMIT": bad},
                          stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "MVM_MCP_OVERCOMMIT" in proc.stderr


def test_templates_beyond_the_built_ins_are_the_operators_call(mvm_home: Path, tmp_path: Path) -> None:
    """A snapshot holds a guest's memory and a directory's mvm.toml its volumes: by default a
    model gets neither. Listed in MVM_MCP_TEMPLATES, they work, and a sandbox counts against
    the memory ceiling with its template's own memory."""
    directory = tmp_path / "big"
    directory.mkdir()
    (directory / "mvm.toml").write_text('name = "mcp-big"\nmemory_mib = 400\n\n[entrypoint]\n'
                                        'command = ["/bin/sh", "-c", "while :; do sleep 3600; done"]\n')
    found: dict[str, str] = {}

    async def refused(client: ClientSession) -> None:
        error, made = await tool(client, "sandbox_create")  # (the first one saves the built-in as a template)
        assert not error
        found["tag"] = next(p.name for p in (mvm_home / "snapshots").iterdir() if p.name.startswith("sdk-base-"))
        for template in (str(directory), found["tag"], "/", str(directory / "..")):
            error, why = await tool(client, "sandbox_create", template=template)
            assert error and "MVM_MCP_TEMPLATES" in why, why
            error, why = await tool(client, "run", code="true", env=template)
            assert error and "MVM_MCP_TEMPLATES" in why, why
        assert [s["sandbox"] for s in (await tool(client, "sandbox_list"))[1]] == [made["sandbox"]]

    run_client(mvm_home, refused)

    async def listed(client: ClientSession) -> None:
        error, big = await tool(client, "sandbox_create", template=str(directory))
        assert not error, big
        error, ran = await tool(client, "sandbox_exec", sandbox=big["sandbox"],
                                command="awk '/MemTotal/ {print $2}' /proc/meminfo")
        assert 300 * 1024 < int(ran["stdout"]) <= 400 * 1024, ran  # booted from the directory's mvm.toml
        error, why = await tool(client, "sandbox_create")  # 400 + 256 > 600: its template's 400 MiB counted
        assert error and "would bring this server's sandboxes to 656 MiB" in why, why
        await tool(client, "sandbox_destroy", sandbox=big["sandbox"])
        error, clone = await tool(client, "run", code="hostname", env=found["tag"])
        assert not error and clone["stdout"].strip() == clone["session"], clone

    run_client(mvm_home, listed, MVM_MCP_TEMPLATES=f"{directory}, {found['tag']}", MVM_MCP_MEM_CEILING_MIB="600")


@pytest.mark.parametrize("bad", ["", " , ", "/no/such/dir", "no-such-snapshot", "/"])
def test_a_bad_templates_setting_is_refused_at_start(mvm_home: Path, bad: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mvm.cli.main", "mcp"], capture_output=True, text=True,
                          env={**os.environ, "MVM_HOME": str(mvm_home), "MVM_MCP_TEMPLATES": bad},
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "MVM_MCP_TEMPLATES" in proc.stderr, proc.stderr
