"""The audit chain on a real QEMU guest: up, exec, cp both ways, fs rm, an SDK call and down
each leave one signed record with the right actor, and `--receipt` names it; 32 concurrent
execs and appends from other processes at the same moment leave a chain that verifies."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mvm.core.state import MvmHome
from mvm.security import audit
from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

WORKLOAD = """
    name = "aud"
    [entrypoint]
    command = ["/bin/sh", "-c", "while true; do sleep 1; done"]
"""
SECRET = "42-s3cr3t-42"  # what the command prints; its argv spells it differently


# The module's VM has an allow-list (one entry, never connected to) so that its list can change.
NETWORK = """
    [network]
    mode = "allow-list"
    allow = ["127.0.0.1:9"]
"""


@pytest.fixture(scope="module")
def vm(mvmctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("aud")
    (directory / "mvm.toml").write_text(WORKLOAD + NETWORK)
    proc = mvmctl("up", "--hypervisor", "qemu", "--receipt", "--json", str(directory), check=True)
    yield "aud", json.loads(proc.stdout)["receipt"], directory
    mvmctl("down", "--force", "aud")


def receipt_of(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("mvmctl: receipt ")]
    assert len(lines) >= 1, stderr
    return lines[-1].removeprefix("mvmctl: receipt ")


def show(mvmctl: Mvmctl, record_id: str) -> dict:
    proc = mvmctl("receipt", "show", "--json", record_id, check=True)
    shown = json.loads(proc.stdout)
    assert shown["verifies"], shown["status"]
    return shown["record"]


def test_up_has_a_receipt_that_verifies(mvmctl: Mvmctl, vm) -> None:
    name, receipt, _ = vm
    entry = show(mvmctl, receipt)
    assert entry["operation"] == "up" and entry["vm"] == name and entry["result"] == "ok"
    assert entry["backend"] == "qemu" and entry["isolation"] and entry["artifact"]
    assert entry["actor"]["surface"] == "cli" and entry["actor"]["uid"] >= 0
    builds = [e for e in json.loads(mvmctl("audit", "ls", "--json", check=True).stdout) if e["operation"] == "build"]
    assert builds and builds[-1]["artifact"] == entry["artifact"] and builds[-1]["result"] == "ok"


def test_a_refused_console_on_a_sealed_vm_is_recorded(mvmctl: Mvmctl, vm) -> None:
    name, _, _ = vm
    proc = mvmctl("console", name)
    assert proc.returncode == 2 and "sealed image, which has no console" in proc.stderr
    entry = last_of(mvmctl, "console", name)
    assert entry["result"] == "error" and entry["detail"]["refused"] == "sealed"
    assert mvmctl("audit", "verify").returncode == 0


def test_exec_is_recorded_by_the_supervisor_without_its_output(mvmctl: Mvmctl, vm) -> None:
    name, _, _ = vm
    printed = "echo $((6*7))-s3cr3t-$((6*7))"
    proc = mvmctl("exec", "--receipt", name, "--", "/bin/sh", "-c", f"{printed}; {printed} >&2; exit 7")
    assert proc.returncode == 7 and proc.stdout == f"{SECRET}\n"
    entry = show(mvmctl, receipt_of(proc.stderr))
    assert entry["operation"] == "exec" and entry["argv"][:2] == ["/bin/sh", "-c"]
    assert entry["exit_status"] == 7 and entry["result"] == "ok"
    assert entry["detail"]["stdout_bytes"] == len(SECRET) + 1 == entry["detail"]["stderr_bytes"]
    assert entry["actor"]["surface"] == "cli" and entry["actor"]["process"].startswith("python")
    assert entry["duration_ms"] > 0
    logged = b"".join(p.read_bytes() for p in (mvmctl.home / "audit").glob("audit*.jsonl"))
    assert SECRET.encode() not in logged and b"s3cr3t" in logged  # the argv is logged, never the output


def test_cp_both_ways_and_rm_are_recorded_with_sizes_and_hashes(mvmctl: Mvmctl, vm, tmp_path: Path) -> None:
    import hashlib

    name, _, _ = vm
    source = tmp_path / "in.bin"
    source.write_bytes(b"payload\n" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    proc = mvmctl("cp", "--receipt", str(source), f"{name}:/tmp/in.bin", check=True)
    wrote = show(mvmctl, receipt_of(proc.stderr))
    assert wrote["operation"] == "write" and wrote["paths"] == ["/tmp/in.bin"]
    assert wrote["detail"] == {"write_bytes": 8000, "sha256": digest}
    proc = mvmctl("cp", "--receipt", f"{name}:/tmp/in.bin", str(tmp_path / "out.bin"), check=True)
    read = show(mvmctl, receipt_of(proc.stderr))
    assert read["operation"] == "read" and read["detail"]["sha256"] == digest
    mvmctl("fs", name, "rm", "/tmp/in.bin", check=True)
    removed = [e for e in json.loads(mvmctl("audit", "ls", "--json", "--vm", name, check=True).stdout)
               if e["operation"] == "remove"]
    assert removed[-1]["paths"] == ["/tmp/in.bin"] and removed[-1]["result"] == "ok"


def test_the_sdk_gets_a_receipt_id_and_is_named_as_the_sdk(mvmctl: Mvmctl, vm) -> None:
    name, _, _ = vm
    code = (f"import mvm; r = mvm.Sandbox.connect({name!r}).commands.run('exit 3'); "
            "print(r.exit_code, r.receipt_id)")
    proc = subprocess.run([sys.executable, "-c", code], env=mvmctl.env, capture_output=True, text=True, timeout=120,
                          check=True)
    code_text, receipt = proc.stdout.split()
    assert code_text == "3"
    entry = show(mvmctl, receipt)
    assert entry["actor"]["surface"] == "sdk" and entry["exit_status"] == 3


def test_doctor_shows_the_security_section_with_the_running_vms_seccomp(mvmctl: Mvmctl, vm) -> None:
    name, _, _ = vm
    assert mvmctl("audit", "verify").returncode == 0
    security = json.loads(mvmctl("doctor", "--no-probe", "--json").stdout)["security"]
    assert security["isolation"]["qemu"] == "microvm" and security["isolation"]["docker"] == "container"
    assert security["qemu_seccomp_in_argv"] is True
    mine = next(r for r in security["qemu_seccomp_running"] if r["vm"] == name)
    assert mine["seccomp"] is True  # the kernel says QEMU runs under a seccomp filter
    assert security["key"]["ok"] and security["key"]["mode"] == "600"
    assert security["audit"]["head_signed"] is True and security["audit"]["last_verify"]["ok"] is True
    assert security["policy"] == {"files": [], "rules": []}
    human = mvmctl("doctor", "--no-probe").stdout
    assert "QEMU seccomp" in human and "audit chain" in human and "Security" in human


def test_an_sdk_sandbox_records_its_build_start_and_kill_as_the_sdk(mvmctl: Mvmctl, tmp_path: Path) -> None:
    project = tmp_path / "sdkproj"
    project.mkdir()
    (project / "mvm.toml").write_text(WORKLOAD.replace('"aud"', '"aud-sdk"'))
    code = (f"import mvm; s = mvm.Sandbox.create({str(project)!r}, name='aud-sdk', timeout=300); "
            "print(s.commands.run('true').receipt_id); s.files.write('/tmp/x', 'y'); print(*s.receipts); s.kill()")
    proc = subprocess.run([sys.executable, "-c", code], env=mvmctl.env, capture_output=True, text=True, timeout=600,
                          check=True)
    mine = [e for e in json.loads(mvmctl("audit", "ls", "--json", check=True).stdout)
            if e.get("vm") == "aud-sdk" or str(project) in (e.get("paths") or [])]
    assert [(e["operation"], e["actor"]["surface"]) for e in mine] == [
        ("build", "sdk"), ("plan", "sdk"), ("up", "sdk"), ("exec", "sdk"), ("write", "sdk"), ("down", "sdk")]
    exec_id, receipts = proc.stdout.splitlines()
    assert mine[3]["id"] == exec_id
    # the sandbox's receipts: its start, the command, the file write (each verifies)
    started, ran, wrote = receipts.split()
    assert (started, ran, wrote) == (mine[2]["id"], exec_id, mine[4]["id"])


def records(mvmctl: Mvmctl, vm: str | None = None) -> list[dict]:
    return json.loads(mvmctl("audit", "ls", "--json", *(["--vm", vm] if vm else []), check=True).stdout)


def last_of(mvmctl: Mvmctl, operation: str, vm: str | None = None) -> dict:
    found = [e for e in records(mvmctl, vm) if e["operation"] == operation]
    assert found, f"no {operation} record"
    return found[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_forwards_network_changes_pause_and_fs_changes_are_recorded(mvmctl: Mvmctl, vm) -> None:
    name, _, _ = vm
    port = free_port()
    mvmctl("forward", name, "-p", f"127.0.0.1:{port}:8080", check=True)
    added = last_of(mvmctl, "forward", name)
    assert added["result"] == "ok" and added["detail"]["host_port"] == port and added["detail"]["guest_port"] == 8080
    assert added["actor"]["surface"] == "cli" and added["backend"] == "qemu"
    mvmctl("forward", "rm", name, str(port), check=True)
    removed = last_of(mvmctl, "forward-remove", name)
    assert removed["result"] == "ok" and removed["detail"]["host_port"] == port and removed["seq"] > added["seq"]

    mvmctl("network", name, "--allow", "127.0.0.1:7", check=True)
    change = last_of(mvmctl, "network", name)
    assert change["result"] == "ok" and change["detail"] == {"allow": ["127.0.0.1:7"], "deny": []}
    mvmctl("network", name, "--deny", "127.0.0.1:7", check=True)
    assert last_of(mvmctl, "network", name)["detail"] == {"allow": [], "deny": ["127.0.0.1:7"]}

    for verb in ("pause", "resume"):
        mvmctl(verb, name, check=True)
        entry = last_of(mvmctl, verb, name)
        assert entry["result"] == "ok" and entry["actor"]["surface"] == "cli" and entry["actor"]["uid"] >= 0

    mvmctl("fs", name, "mkdir", "/tmp/audited", check=True)
    made = last_of(mvmctl, "mkdir", name)
    assert made["paths"] == ["/tmp/audited"] and made["result"] == "ok"
    code = f"import mvm; mvm.Sandbox.connect({name!r}).files.rename('/tmp/audited', '/tmp/renamed')"
    subprocess.run([sys.executable, "-c", code], env=mvmctl.env, timeout=120, check=True)
    renamed = last_of(mvmctl, "rename", name)
    assert renamed["paths"] == ["/tmp/audited", "/tmp/renamed"] and renamed["actor"]["surface"] == "sdk"
    assert mvmctl("audit", "verify").returncode == 0


def test_a_policy_holds_a_running_vms_list_and_its_refusal_is_recorded(mvmctl: Mvmctl, vm) -> None:
    name, _, _ = vm
    policy = mvmctl.home / "policy.toml"
    policy.write_text('# loopback only\n[network]\nallow_patterns = ["127.0.0.1:*"]\n')
    try:
        refused = mvmctl("network", name, "--allow", "192.0.2.1:80")  # (a name on the list; never connected to)
        assert refused.returncode == 4, refused.stderr
        assert f"refused by policy rule network.allow_patterns ({policy}:3)" in refused.stderr
        assert "192.0.2.1:80" in refused.stderr and refused.stderr.count("\n") == 1
        assert "192.0.2.1:80" not in json.loads(mvmctl("network", name, "--json", check=True).stdout)["allow"]
        entry = last_of(mvmctl, "network", name)
        assert entry["result"] == "refused" and entry["detail"]["rule"] == "network.allow_patterns"
        assert entry["detail"]["where"] == f"{policy}:3" and entry["detail"]["allow"] == ["192.0.2.1:80"]
        assert mvmctl("network", name, "--allow", "127.0.0.1:13", check=True).returncode == 0  # (what it admits)
        mvmctl("network", name, "--deny", "127.0.0.1:13", check=True)
    finally:
        policy.unlink()


def test_snapshot_create_clone_and_rm_are_recorded(mvmctl: Mvmctl, vm) -> None:
    name, _, _ = vm
    mvmctl("snapshot", "create", name, "--tag", "aud-snap", check=True, timeout=600)
    created = last_of(mvmctl, "snapshot-create", name)
    assert created["result"] == "ok" and created["detail"]["tag"] == "aud-snap" and created["detail"]["files"]
    mvmctl("up", "--snapshot", "aud-snap", "--name", "aud-clone", check=True, timeout=600)
    try:
        clone = last_of(mvmctl, "clone", "aud-clone")
        assert clone["result"] == "ok" and clone["artifact"] == created["artifact"]
    finally:
        mvmctl("down", "--force", "aud-clone", check=True)
    mvmctl("snapshot", "rm", "aud-snap", check=True)
    removed = last_of(mvmctl, "snapshot-rm")
    assert removed["result"] == "ok" and removed["detail"] == {"tag": "aud-snap", "sealed": True}


def test_run_has_a_receipt_and_a_declarations_dry_run_is_a_plan_record(mvmctl: Mvmctl, vm, tmp_path: Path) -> None:
    _, _, directory = vm
    proc = mvmctl("run", "--attached", "--receipt", "--name", "aud-run", str(directory), "--", "/bin/sh", "-c",
                  "exit 3", timeout=600)
    assert proc.returncode == 3, proc.stderr
    entry = show(mvmctl, receipt_of(proc.stderr))
    assert entry["operation"] == "run" and entry["vm"] == "aud-run" and entry["argv"] == ["/bin/sh", "-c", "exit 3"]
    assert entry["detail"] == {"mode": "attached"} and entry["result"] == "ok"
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import mvm

        @mvm.app(name="aud-app", entrypoint=mvm.command(["/bin/sh", "-c", "sleep 1"]))
        def app():
            raise SystemExit("not called")
    """))
    plan = json.loads(mvmctl("run", "--dry-run", "--json", str(app), check=True).stdout)
    assert plan["admission"]["admitted"] and plan["artifact"]["built"] is False
    recorded = show(mvmctl, plan["admission"]["receipt"])
    assert recorded["operation"] == "plan" and recorded["result"] == "admitted" and recorded["detail"]["dry_run"]
    assert recorded["vm"] == "aud-app" and not (mvmctl.home / "vms" / "aud-app").exists()


def append_from_another_process(home: str, count: int) -> None:
    for i in range(count):
        audit.append(MvmHome(Path(home)), {"operation": "test-append", "actor": audit.self_actor(), "detail": {"i": i}})


def test_32_concurrent_execs_and_other_writers_leave_a_whole_chain(mvmctl: Mvmctl, vm) -> None:
    name, _, _ = vm
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=append_from_another_process, args=(str(mvmctl.home), 25)) for _ in range(3)]
    for writer in writers:
        writer.start()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        procs = list(pool.map(lambda i: mvmctl("exec", "--receipt", name, "--", "/bin/sh", "-c", f"echo {i}"),
                              range(32)))
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    assert [p.returncode for p in procs] == [0] * 32
    receipts = {receipt_of(p.stderr) for p in procs}
    assert len(receipts) == 32
    verified = mvmctl("audit", "verify", "--json")
    report = json.loads(verified.stdout)
    assert verified.returncode == 0 and report["ok"], report
    entries = json.loads(mvmctl("audit", "ls", "--json", check=True).stdout)
    assert receipts <= {e["id"] for e in entries if e["operation"] == "exec"}
    assert sum(e["operation"] == "test-append" for e in entries) == 75


def test_a_sealed_vm_refuses_what_it_cannot_record(mvmctl: Mvmctl, vm, tmp_path: Path) -> None:
    name, _, directory = vm
    log_dir = mvmctl.home / "audit"
    kept = tmp_path / "kept-audit"
    log_dir.rename(kept)
    try:
        (log_dir / "audit.jsonl").mkdir(parents=True)  # (root ignores modes: a directory cannot be appended to)
        proc = mvmctl("exec", name, "--", "/bin/sh", "-c", "echo ran")
        assert proc.returncode != 0 and proc.stdout == "ran\n"
        assert "could not be written, which a sealed image does not allow" in proc.stderr
        for verb in ("pause", "resume"):  # (done, but the client hears it was not recorded)
            proc = mvmctl(verb, name)
            assert proc.returncode != 0 and f"the {verb} was done but its audit record could not be written" \
                in proc.stderr, proc.stderr
        port = free_port()
        proc = mvmctl("forward", name, "-p", f"127.0.0.1:{port}:8080")
        assert proc.returncode != 0 and "forward refused: its audit record could not be written" in proc.stderr
        assert mvmctl("forward", "ls", name, "--json", check=True).stdout.strip() == "[]"  # taken down again
        proc = mvmctl("network", name, "--allow", "127.0.0.1:7")
        assert proc.returncode != 0 and "network refused: its audit record could not be written" in proc.stderr
        assert json.loads(mvmctl("network", name, "--json", check=True).stdout)["allow"] == ["127.0.0.1:9"]
        refused = mvmctl("up", "--name", "aud-unrecorded", str(directory))
        assert refused.returncode != 0 and "its audit record could not be written" in refused.stderr
        assert not (mvmctl.home / "vms" / "aud-unrecorded").exists()
    finally:
        shutil.rmtree(log_dir)
        kept.rename(log_dir)
    assert mvmctl("audit", "verify").returncode == 0
    assert mvmctl("exec", name, "--", "true").returncode == 0  # (it runs again: the resume was done)


def test_a_dev_vm_goes_on_with_a_warning_when_it_cannot_record(mvmctl: Mvmctl, tmp_path: Path) -> None:
    project = tmp_path / "devproj"
    project.mkdir()
    (project / "mvm.toml").write_text(WORKLOAD.replace('"aud"', '"aud-dev"').replace("[entrypoint]",
                                                                                    "dev = true\n[entrypoint]"))
    mvmctl("up", str(project), check=True)
    session = mvmctl("console", "aud-dev", "--command", "echo $((6*7)); exit 4")
    assert session.returncode == 4 and "42" in session.stdout, session.stderr
    console = last_of(mvmctl, "console", "aud-dev")
    assert console["argv"] == ["/bin/sh", "-c", "echo $((6*7)); exit 4"] and console["pty"] is True
    printed = console["detail"].get("stdout_bytes", 0) + console["detail"].get("data_bytes", 0)
    assert console["exit_status"] == 4 and printed >= 3 and console["result"] == "ok"
    # status flags a process whose effective uid the image does not name (its real uid is root's)
    setuid = subprocess.Popen(mvmctl.argv("exec", "aud-dev", "--", "setpriv", "--euid", "4242", "sleep", "60"),
                              env=mvmctl.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline, flagged = time.monotonic() + 60, []
        while not any("(sleep) runs as effective uid 4242, which the image does not name" in line for line in flagged):
            assert setuid.poll() is None and time.monotonic() < deadline, (flagged, setuid.communicate())
            flagged = json.loads(mvmctl("status", "--json", "aud-dev", check=True).stdout)["uid_check"]
    finally:
        setuid.kill()
        setuid.wait()
    # The supervisor records that exec once its command has been stopped, a moment after the
    # client went: wait for the record, or it lands in the moved log's place below.
    deadline = time.monotonic() + 60
    while not any(e["operation"] == "exec" and "setpriv" in (e.get("argv") or []) for e in records(mvmctl, "aud-dev")):
        assert time.monotonic() < deadline, "the killed exec was never recorded"
        time.sleep(0.1)
    log_dir, kept = mvmctl.home / "audit", tmp_path / "kept-audit"
    try:
        log_dir.rename(kept)
        (log_dir / "audit.jsonl").mkdir(parents=True)
        proc = mvmctl("exec", "--receipt", "aud-dev", "--", "/bin/sh", "-c", "echo ran")
        assert proc.returncode == 0 and proc.stdout == "ran\n"
        assert "mvmctl: warning: this command is not in the audit log" in proc.stderr
        assert "mvmctl: receipt none" in proc.stderr
        copied = mvmctl("cp", str(project / "mvm.toml"), "aud-dev:/tmp/m.toml")
        assert copied.returncode == 0 and "this copy is not in the audit log" in copied.stderr
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
        kept.rename(log_dir)
        mvmctl("down", "--force", "aud-dev")
    assert mvmctl("audit", "verify").returncode == 0


def test_down_is_recorded_and_tampering_is_then_named(mvmctl: Mvmctl, vm, tmp_path: Path) -> None:
    name, _, _ = vm
    mvmctl("down", name, check=True)
    last = json.loads(mvmctl("audit", "ls", "--json", "--vm", name, check=True).stdout)[-1]
    assert last["operation"] == "down" and last["result"] == "ok"
    export = tmp_path / "export.jsonl"
    mvmctl("audit", "export", "--out", str(export), check=True)
    assert json.loads(export.read_text().splitlines()[0])["public_key"]
    current = mvmctl.home / "audit" / "audit.jsonl"
    original = current.read_bytes()
    try:
        current.write_bytes(original.replace(b'"operation":"down"', b'"operation":"dawn"'))
        proc = mvmctl("audit", "verify")
        assert proc.returncode == 3 and "edited" in proc.stderr and "audit.jsonl:" in proc.stderr
    finally:
        current.write_bytes(original)
    assert mvmctl("audit", "verify").returncode == 0


def test_a_dry_run_admits_or_refuses_and_starts_nothing(mvmctl: Mvmctl, vm, tmp_path: Path) -> None:
    from tests.integration.test_boot import qemu_processes_using

    _, _, directory = vm
    store = sorted(p.name for p in (mvmctl.home / "store").iterdir())
    plan = json.loads(mvmctl("up", "--dry-run", "--json", "--name", "aud-dry", str(directory), check=True).stdout)
    assert plan["backend"]["isolation"] and plan["artifact"]["sealed"] and plan["admission"]["admitted"]
    assert plan["network"]["mode"] == "allow-list" and plan["entrypoint"]["uid"] == 1000
    unbuilt = tmp_path / "unbuilt"
    unbuilt.mkdir()
    (unbuilt / "mvm.toml").write_text(WORKLOAD.replace('"aud"', '"aud-new"') + "\n[network]\nmode = \"deny\"\n")
    fresh = json.loads(mvmctl("run", "--dry-run", "--json", str(unbuilt), "--", "id", "-u", check=True).stdout)
    assert fresh["artifact"]["built"] is False and fresh["artifact"]["key"] is None
    assert fresh["entrypoint"]["argv"] == ["id", "-u"] and fresh["admission"]["admitted"]
    assert "not built yet" in mvmctl("up", "--dry-run", str(unbuilt), check=True).stdout
    policy = tmp_path / "strict.toml"
    policy.write_text("[resources]\nmax_memory_mib = 128\n")
    refused = mvmctl("up", "--dry-run", "--policy", str(policy), "--name", "aud-dry", str(directory))
    assert refused.returncode == 4
    assert f"refused by policy rule resources.max_memory_mib ({policy}:2)" in refused.stderr
    assert mvmctl("up", "--policy", str(policy), "--name", "aud-dry", str(directory)).returncode == 4
    assert not (mvmctl.home / "vms" / "aud-dry").exists() and not (mvmctl.home / "vms" / "aud-new").exists()
    assert sorted(p.name for p in (mvmctl.home / "store").iterdir()) == store
    assert not qemu_processes_using(mvmctl.home / "vms" / "aud-dry")
    plans = [e for e in json.loads(mvmctl("audit", "ls", "--json", "--vm", "aud-dry", check=True).stdout)]
    assert [(e["operation"], e["result"]) for e in plans] == [("plan", "admitted"), ("plan", "refused"),
                                                              ("plan", "refused"), ("up", "error")]
