"""The audit chain as written by the real writer: it verifies whole, and `verify` names the first
bad line for each way of tampering with it (edit, delete, swap, insert, re-sign, truncate,
remove a segment). Appends from many processes at once leave a chain that verifies."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mvm.core.state import MvmHome
from mvm.security import audit, audit_verify
from mvm.security.host_key import canonical_json


def write_chain(home: MvmHome, count: int, segment_bytes: int = audit.SEGMENT_BYTES) -> list[str]:
    return [audit.append(home, {"operation": "exec", "vm": f"vm{i % 3}", "argv": ["true", str(i)],
                                "actor": audit.self_actor(), "result": "ok", "exit_status": 0},
                         segment_bytes=segment_bytes) for i in range(count)]


@pytest.fixture
def home(tmp_path: Path) -> MvmHome:
    return MvmHome(tmp_path / "home")


def current(home: MvmHome) -> Path:
    return audit.audit_dir(home) / audit.CURRENT


def rewrite(path: Path, change) -> None:
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"".join(line + b"\n" for line in change(lines)))


def test_a_whole_chain_verifies_and_lists(home: MvmHome) -> None:
    ids = write_chain(home, 5)
    report = audit_verify.verify(home)
    assert report.ok and report.records == 5 and report.problem is None and not report.warnings
    listed = list(audit_verify.entries(home))
    assert [e["id"] for e in listed] == ids
    assert [e["seq"] for e in listed] == [1, 2, 3, 4, 5]
    line = json.loads(current(home).read_bytes().split(b"\n")[1])
    assert set(line) == {"entry", "prev_hash", "signature"}
    assert line["prev_hash"] == audit.line_hash(current(home).read_bytes().split(b"\n")[0])
    assert oct(current(home).stat().st_mode & 0o777) == "0o600"


def test_segments_rotate_and_chain_across_files(home: MvmHome) -> None:
    write_chain(home, 20, segment_bytes=1500)
    assert audit.rotated_segments(home)[:2] == [1, 2]
    report = audit_verify.verify(home)
    assert report.ok and report.records == 20 and report.segments > 2
    first_of_second = json.loads(audit.segment_path(home, 2).read_bytes().split(b"\n")[0])
    assert first_of_second["prev_hash"] == audit.line_hash(audit.last_line(audit.segment_path(home, 1)))


def test_the_writer_goes_on_without_its_head(home: MvmHome) -> None:
    write_chain(home, 3)
    (audit.audit_dir(home) / audit.HEAD).unlink()
    write_chain(home, 2)
    assert audit_verify.verify(home).ok


def expect(home: MvmHome, line: int, *words: str) -> audit_verify.Problem:
    report = audit_verify.verify(home)
    assert not report.ok
    assert report.problem is not None
    assert report.problem.line == line, report.problem.text()
    for word in words:
        assert word in report.problem.why, report.problem.text()
    return report.problem


def test_an_edited_field_is_caught(home: MvmHome) -> None:
    write_chain(home, 5)
    rewrite(current(home), lambda ls: [ls[0], ls[1], ls[2].replace(b'"vm":"vm2"', b'"vm":"vmX"'), *ls[3:]])
    problem = expect(home, 3, "edited")
    assert problem.seq == 3


def test_a_deleted_line_is_caught(home: MvmHome) -> None:
    write_chain(home, 5)
    rewrite(current(home), lambda ls: [ls[0], ls[1], *ls[3:]])
    expect(home, 3, "deleted", "records 3..3")


def test_two_swapped_lines_are_caught(home: MvmHome) -> None:
    write_chain(home, 5)
    rewrite(current(home), lambda ls: [ls[0], ls[2], ls[1], *ls[3:]])
    expect(home, 2, "reordered")


def test_a_line_signed_with_another_key_is_caught(home: MvmHome) -> None:
    write_chain(home, 4)
    other = Ed25519PrivateKey.generate()
    import base64

    from cryptography.hazmat.primitives import serialization

    other_hex = other.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    def insert(ls: list[bytes]) -> list[bytes]:
        entry = {**json.loads(ls[1])["entry"], "argv": ["rm", "-rf", "/"], "key": audit.key_id(other_hex)}
        signed = {"entry": entry, "prev_hash": audit.line_hash(ls[1])}
        forged = canonical_json({**signed, "signature": base64.b64encode(other.sign(canonical_json(signed))).decode()})
        return [ls[0], ls[1], forged, *ls[2:]]

    rewrite(current(home), insert)
    expect(home, 3, "another key")


def test_a_copied_line_is_caught_as_inserted(home: MvmHome) -> None:
    write_chain(home, 4)
    rewrite(current(home), lambda ls: [ls[0], ls[1], ls[2], ls[1], ls[3]])
    expect(home, 4, "inserted", "copy of record 2")


def test_a_cut_off_last_line_is_caught(home: MvmHome) -> None:
    write_chain(home, 4)
    data = current(home).read_bytes()
    current(home).write_bytes(data[:-30])
    expect(home, 4, "truncated", "cut off")


def test_whole_lines_cut_off_the_end_are_caught_by_the_head(home: MvmHome) -> None:
    write_chain(home, 4)
    rewrite(current(home), lambda ls: ls[:2])
    expect(home, 3, "truncated", "records 3..4")


def test_a_removed_segment_is_caught(home: MvmHome) -> None:
    write_chain(home, 20, segment_bytes=1500)
    audit.segment_path(home, 2).unlink()
    problem = expect(home, 1, "missing", "audit.000002.jsonl")
    assert problem.file == "audit.000003.jsonl"


def test_a_removed_first_or_last_rotated_segment_is_caught(home: MvmHome, tmp_path: Path) -> None:
    write_chain(home, 20, segment_bytes=1500)
    backup = tmp_path / "backup"
    shutil.copytree(audit.audit_dir(home), backup)
    audit.segment_path(home, 1).unlink()
    expect(home, 1, "missing", "audit.000001.jsonl")
    shutil.rmtree(audit.audit_dir(home))
    shutil.copytree(backup, audit.audit_dir(home))
    last = audit.rotated_segments(home)[-1]
    audit.segment_path(home, last).unlink()
    expect(home, 1, "missing", f"audit.{last:06d}.jsonl")


def test_garbage_and_a_chain_signed_by_a_new_key_are_named(home: MvmHome) -> None:
    write_chain(home, 3)
    with current(home).open("ab") as f:
        f.write(b"\x00\xffnot json\n")
    expect(home, 4, "not an audit record")
    rewrite(current(home), lambda ls: ls[:3])
    shutil.rmtree(home.keys)  # a new key: every old line fails against it
    expect(home, 1, "another key")


def test_ids_are_found_and_receipts_say_whether_they_verify(home: MvmHome) -> None:
    ids = write_chain(home, 3)
    entry, status = audit_verify.receipt_status(home, ids[1])
    assert entry["id"] == ids[1] and status.startswith("verifies")
    assert audit_verify.receipt_status(home, ids[1][:10])[0]["id"] == ids[1]
    assert audit_verify.receipt_status(home, "0" * 32) is None
    rewrite(current(home), lambda ls: [ls[0], ls[1].replace(b'"argv":["true","1"]', b'"argv":["true","9"]'), ls[2]])
    assert audit_verify.receipt_status(home, ids[1])[1].startswith("does not verify")


def test_the_export_verifies_with_the_documented_recipe(home: MvmHome, tmp_path: Path) -> None:
    write_chain(home, 7, segment_bytes=1500)
    out = tmp_path / "export.jsonl"
    assert audit_verify.export(home, out) == 7
    recipe = extract_recipe(Path(__file__).resolve().parents[2] / "docs" / "audit.md")
    namespace: dict = {}
    exec(compile(recipe, "docs/audit.md", "exec"), namespace)  # noqa: S102 - the documented code, run as is
    assert namespace["verify_export"](str(out)) == 7
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join([lines[0], lines[1], lines[3], *lines[4:]]))
    with pytest.raises(ValueError):
        namespace["verify_export"](str(out))


def extract_recipe(doc: Path) -> str:
    text = doc.read_text()
    start = text.index("```python\n", text.index("## Verifying an export without mvm")) + len("```python\n")
    return text[start:text.index("```", start)]


def append_many(home_root: str, count: int) -> None:
    home = MvmHome(Path(home_root))
    for i in range(count):
        audit.append(home, {"operation": "exec", "argv": [str(os.getpid()), str(i)], "actor": audit.self_actor()},
                     segment_bytes=20_000)


def test_appends_from_many_processes_at_once_keep_one_chain(home: MvmHome) -> None:
    audit.append(home, {"operation": "up", "actor": audit.self_actor()})  # (the key exists before they race)
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=append_many, args=(str(home.root), 40)) for _ in range(6)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    report = audit_verify.verify(home)
    assert report.ok, report.problem and report.problem.text()
    assert report.records == 241 and report.segments > 1


def test_doctor_reports_key_permissions_chain_health_and_a_bad_policy(home: MvmHome) -> None:
    from mvm.security.host_key import KEY_FILE
    from mvm.security.posture import security_state

    write_chain(home, 2)
    state = security_state(home, [])
    assert state.key["ok"] and state.key["mode"] == "600"
    assert state.audit["records"] == 2 and state.audit["head_signed"] is True and state.audit["last_verify"] is None
    assert state.policy == {"files": [], "rules": []}
    (home.keys / KEY_FILE).chmod(0o644)
    (home.root / "policy.toml").write_text("[image]\naccessible = false\n[nonsense]\n")
    audit.save_last_verify(home, {"ok": False, "records": 1, "problem": "audit.jsonl:2: edited"})
    state = security_state(home, [])
    assert not state.key["ok"] and state.key["mode"] == "644"
    assert ":3: unknown policy table [nonsense]" in state.policy["error"]
    assert state.audit["last_verify"]["ok"] is False and state.audit["last_verify"]["time"]


def mvmctl(home: MvmHome, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mvm.cli.main", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MVM_HOME": str(home.root)}, stdin=subprocess.DEVNULL, check=False)


def test_the_cli_lists_filters_shows_verifies_and_exports(home: MvmHome, tmp_path: Path) -> None:
    ids = write_chain(home, 4)
    listed = json.loads(mvmctl(home, "audit", "ls", "--json", "--vm", "vm1").stdout)
    assert [e["id"] for e in listed] == [ids[1]]
    assert len(json.loads(mvmctl(home, "audit", "ls", "--json", "--since", "1h").stdout)) == 4
    assert json.loads(mvmctl(home, "audit", "ls", "--json", "--since", "2999-01-01").stdout) == []
    bad = mvmctl(home, "audit", "ls", "--since", "yesterday")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--since 'yesterday'" in bad.stderr
    assert ids[2][:12] in mvmctl(home, "audit", "ls").stdout
    assert json.loads(mvmctl(home, "audit", "show", ids[2][:10]).stdout)["id"] == ids[2]
    assert mvmctl(home, "audit", "show", "nope").returncode == 2
    assert "4 records" in mvmctl(home, "audit", "verify").stdout
    assert mvmctl(home, "audit", "export", "--out", str(tmp_path / "x.jsonl")).returncode == 0
    rewrite(current(home), lambda ls: [ls[0], ls[2], ls[1], ls[3]])
    broken = mvmctl(home, "audit", "verify")
    assert broken.returncode == 3 and "audit.jsonl:2: record 3" in broken.stderr and "reordered" in broken.stderr
    report = mvmctl(home, "audit", "verify", "--json")
    assert report.returncode == 3 and json.loads(report.stdout)["problem"]["line"] == 2
    shown = mvmctl(home, "receipt", "show", "--json", ids[3])
    assert shown.returncode == 0 and json.loads(shown.stdout)["verifies"]
    moved = mvmctl(home, "receipt", "show", "--json", ids[0])  # the line after it is no longer its successor
    assert moved.returncode == 3 and "does not link to it" in json.loads(moved.stdout)["status"]


def test_plan_run_is_recorded_with_the_plans_hash_steps_and_result(home: MvmHome, tmp_path: Path) -> None:
    import hashlib

    plan = tmp_path / "plan.json"  # (a template that is not there: the first step fails, nothing boots)
    plan.write_text(json.dumps({"format": 1, "calls": [
        {"op": "create", "sandbox": "s", "template": str(tmp_path / "nothing-here"), "timeout": 10},
        {"op": "kill", "sandbox": "s"}]}))
    ran = mvmctl(home, "plan", "run", str(plan))
    assert ran.returncode == 1 and "FAIL #0 create" in ran.stdout
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{}")
    assert mvmctl(home, "plan", "run", str(garbage)).returncode == 2
    runs = [e for e in audit_verify.entries(home) if e["operation"] == "plan-run"]
    assert [(e["result"], e["actor"]["surface"]) for e in runs] == [("failed", "cli"), ("error", "cli")]
    assert runs[0]["detail"]["sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert runs[0]["paths"] == [str(plan)] and runs[0]["detail"]["steps"] == 2
    assert runs[0]["detail"]["steps_run"] == 1 and runs[0]["detail"]["failed_op"] == "create"
    assert "not a format-1 plan" in runs[1]["detail"]["error"]
    assert mvmctl(home, "audit", "verify").returncode == 0


def test_verify_warns_when_the_log_is_gone_but_a_chain_existed(home: MvmHome) -> None:
    assert audit_verify.verify(home).warnings == []  # a new home: nothing to miss
    shutil.rmtree(home.root)
    write_chain(home, 3)
    assert "3 records" in mvmctl(home, "audit", "verify").stdout  # (saves last-verify.json)
    for path in audit.audit_dir(home).glob("*.jsonl"):
        path.unlink()
    (audit.audit_dir(home) / audit.HEAD).unlink()
    emptied = mvmctl(home, "audit", "verify")
    assert emptied.returncode == 0 and "counted 3: the log" in emptied.stderr, emptied.stderr
    shutil.rmtree(audit.audit_dir(home))
    gone = mvmctl(home, "audit", "verify")
    assert gone.returncode == 0 and "this home has a host key" in gone.stderr, gone.stderr
