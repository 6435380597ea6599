"""Record mode and plans: a script's sandbox calls become a plan and nothing boots; a plan is
checked as hostile input; `mvmctl plan run` carries a reviewed plan out on a real VM."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvm.errors import ModeError
from mvm.sdk.replay import load_plan
from tests.conftest import Mvmctl
from tests.integration.test_boot import qemu_processes_using

SCRIPT = textwrap.dedent("""
    import mvm
    from mvm.errors import ModeError
    with mvm.Sandbox.create("base", timeout=120, env={"A": "1"}) as sbx:
        sbx.files.make_dir("/tmp/job")
        sbx.files.write("/tmp/job/input.txt", b"forty-two\\n")
        sbx.files.write("/tmp/job/draft", b"final\\n")
        sbx.files.rename("/tmp/job/draft", "/tmp/job/final")
        sbx.commands.start(["cat", "/tmp/job/input.txt", "/tmp/job/final"])
        sbx.commands.start("echo done >&2; exit 3")
        for call in (lambda: sbx.commands.run("true"), lambda: sbx.files.read("/etc/hostname"), sbx.info,
                     lambda: sbx.commands.start("true").wait(), sbx.logs, sbx.pause, lambda: sbx.set_timeout(5),
                     lambda: sbx.ports.forward(80), lambda: sbx.files.copy_in("/etc/hostname", "/tmp/h"),
                     lambda: mvm.Sandbox.connect(sbx.name)):
            try:
                call()
            except ModeError as err:
                print("refused:", err)
            else:
                raise SystemExit("a live call was allowed in record mode")
""")


def record(tmp_path: Path, home: Path, script: str = SCRIPT) -> subprocess.CompletedProcess:
    (tmp_path / "job.py").write_text(script)
    return subprocess.run([sys.executable, "-m", "mvm.cli.main", "plan", "record", str(tmp_path / "job.py")],
                          env={**os.environ, "MVM_HOME": str(home)}, capture_output=True, text=True, timeout=120)


def test_record_mode_writes_the_plan_and_boots_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = record(tmp_path, home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("refused:") == 10 and "logs() on sandbox" in proc.stderr
    assert "a plan cannot carry a host tree" in proc.stderr and "Sandbox.connect(" in proc.stderr
    plan = json.loads(proc.stdout)
    ops = [c["op"] for c in plan["calls"]]
    assert ops == ["create", "make_dir", "write", "write", "rename", "start", "start", "start", "kill"]
    assert plan["calls"][4] == {"op": "rename", "sandbox": plan["calls"][0]["sandbox"], "src": "/tmp/job/draft",
                                "dst": "/tmp/job/final"}
    create, write = plan["calls"][0], plan["calls"][2]
    assert create["template"] == "base" and create["timeout"] == 120 and create["env"] == {"A": "1"}
    assert write["size"] == 10 and write["sha256"] == hashlib.sha256(b"forty-two\n").hexdigest()
    assert base64.b64decode(write["data"]) == b"forty-two\n"
    assert not home.exists() or not (home / "vms").exists()  # nothing was registered, built or booted
    assert not qemu_processes_using(home)
    assert load_plan(proc.stdout) == plan["calls"]
    via_run = subprocess.run([sys.executable, "-m", "mvm.cli.main", "run", "--mode", "plan", str(tmp_path / "job.py")],
                             env={**os.environ, "MVM_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert via_run.returncode == 0 and json.loads(via_run.stdout)["calls"][0]["op"] == "create"


def test_record_mode_writes_network_and_its_changes(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import mvm
        from mvm.errors import UsageError
        with mvm.Sandbox.create("base", timeout=60, network="allow-list", allow=["127.0.0.1:5432"]) as sbx:
            sbx.network.allow("api.example.com:443", "*.example.org:443")
            sbx.network.deny("127.0.0.1:5432")
            try:
                sbx.network.allow("no port here")
            except UsageError as err:
                print("refused:", err)
    """)
    home = tmp_path / "home"
    proc = record(tmp_path, home, script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("refused:") == 1 and "no port here" in proc.stderr
    calls = json.loads(proc.stdout)["calls"]
    assert [c["op"] for c in calls] == ["create", "network", "network", "kill"]
    assert calls[0]["network"] == "allow-list" and calls[0]["allow"] == ["127.0.0.1:5432"]
    assert calls[1]["allow"] == ["api.example.com:443", "*.example.org:443"] and "deny" not in calls[1]
    assert calls[2]["deny"] == ["127.0.0.1:5432"]
    assert load_plan(proc.stdout) == calls  # a plan replay accepts
    assert not (home / "vms").exists()


def test_connect_in_record_mode_is_refused_before_any_lookup(tmp_path: Path) -> None:
    """A connected sandbox is a live one: in record mode its start or kill would act at once.
    The refusal comes before the lookup, so it is the same whether or not the VM exists."""
    program = textwrap.dedent("""
        import mvm
        from mvm.errors import ModeError, SandboxNotFound
        for how in ({}, {"mode": "record"}):
            try:
                mvm.Sandbox.connect("some-vm", **how)
            except ModeError as err:
                print("refused:", err)
            except SandboxNotFound:
                print("looked up live")
    """)
    for env in ({"MVM_SDK_MODE": "record"}, {}):
        proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "MVM_HOME": str(tmp_path), **env})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("refused: Sandbox.connect('some-vm')") == (2 if env else 1), proc.stdout
        assert proc.stdout.count("looked up live") == (0 if env else 1)  # live mode (the default) looks it up
    assert not (tmp_path / "vms").exists()


def test_a_bad_mode_is_one_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import mvm; mvm.Sandbox.create()"], capture_output=True, text=True,
                          env={**os.environ, "MVM_SDK_MODE": "dream", "MVM_HOME": str(tmp_path)}, timeout=60)
    assert proc.returncode != 0 and "MVM_SDK_MODE='dream' is not a mode" in proc.stderr


def _plan(*calls: dict) -> str:
    return json.dumps({"format": 1, "calls": list(calls)})


CREATE = {"op": "create", "sandbox": "s", "template": "base", "timeout": 60}


@pytest.mark.parametrize("plan, message", [
    ("{", "not JSON"),
    (json.dumps({"format": 2, "calls": []}), "format-1 plan"),
    (_plan({"op": "format_disk", "sandbox": "s"}), "is not an op"),
    (_plan({"op": "start", "sandbox": "s", "argv": ["ls"]}), "which the plan did not create before"),
    (_plan(CREATE, CREATE), "a second time"),
    (_plan({**CREATE, "shell": "rm -rf /"}), "unknown fields shell"),
    (_plan({**CREATE, "timeout": "60"}), "timeout is str"),
    (_plan(CREATE, {"op": "start", "sandbox": "s", "argv": []}), "non-empty list of strings"),
    (_plan(CREATE, {"op": "network", "sandbox": "s", "allow": [443]}), "allow must be a list of strings"),
    (_plan(CREATE, {"op": "start", "sandbox": "s", "argv": ["ls"], "env": {"A": 1}}), "env must map strings"),
    (_plan(CREATE, {"op": "write", "sandbox": "s", "path": "/x", "mode": 420, "size": 1,
                    "sha256": hashlib.sha256(b"a").hexdigest(), "data": base64.b64encode(b"b").decode()}),
     "do not match the recorded size and sha256"),
    (_plan(CREATE, {"op": "write", "sandbox": "s", "path": "/x", "mode": 420, "size": 1, "sha256": "0", "data": "!"}),
     "not base64"),
])
def test_a_bad_plan_is_refused_before_anything_runs(plan: str, message: str) -> None:
    with pytest.raises(ModeError, match=message):
        load_plan(plan)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=25))
def test_hostile_plans_raise_mode_error_only(calls) -> None:
    try:
        load_plan(json.dumps({"format": 1, "calls": calls}))
    except ModeError:
        pass


@pytest.mark.vm
def test_plan_run_carries_a_recorded_plan_out_live(tmp_path: Path, mvmctl: Mvmctl) -> None:
    proc = record(tmp_path, mvmctl.home, SCRIPT.split("    for call in")[0])
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "plan.json").write_text(proc.stdout)
    ran = mvmctl("plan", "run", str(tmp_path / "plan.json"), "--json", timeout=600)
    steps = json.loads(ran.stdout)
    assert ran.returncode == 0, ran.stderr  # a command exiting 3 is a result, not a failed step
    assert [s["op"] for s in steps] == ["create", "make_dir", "write", "write", "rename", "start", "start", "kill"]
    assert all(s["ok"] for s in steps), steps
    assert steps[5]["stdout"] == "forty-two\nfinal\n" and steps[5]["exit_code"] == 0
    assert steps[6]["stderr"] == "done\n" and steps[6]["exit_code"] == 3
    assert not [vm for vm in json.loads(mvmctl("ls", "--json").stdout) if vm["state"] == "running"]


@pytest.mark.vm
def test_plan_run_keeps_a_started_server_in_the_background(tmp_path: Path, mvmctl: Mvmctl) -> None:
    """A script starts a server it never waits for: replayed, the plan goes on past it (the
    server answers a later command) and ends, the server killed with its sandbox."""
    script = textwrap.dedent("""
        import mvm
        with mvm.Sandbox.create("base", timeout=600) as sbx:
            sbx.commands.start("echo serving; while :; do date +%s > /tmp/alive; sleep 0.2; done")
            sbx.commands.start("sleep 100000")
            sbx.commands.start("i=0; while [ ! -s /tmp/alive ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
                               "test -s /tmp/alive && echo the server runs")
    """)
    proc = record(tmp_path, mvmctl.home, script)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "plan.json").write_text(proc.stdout)
    started = time.monotonic()
    ran = mvmctl("plan", "run", str(tmp_path / "plan.json"), timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert time.monotonic() - started < 120
    lines = ran.stdout.splitlines()
    assert sum("started" in line for line in lines) == 3, ran.stdout
    assert "stdout: the server runs" in ran.stdout and "stdout: serving" in ran.stdout
    assert sum("still running" in line and ": killed" in line for line in lines) == 2, ran.stdout
    assert any("exited 0" in line for line in lines), ran.stdout
    assert not [vm for vm in json.loads(mvmctl("ls", "--json").stdout) if vm["state"] == "running"]
