"""Reading and checking the audit chain (security/audit.py writes it): `mvmctl audit ls`,
`show`, `verify`, `export` and `receipt show`.

Every line is hostile input here: `verify` reads the segments in order and stops at the first
line that is not what the writer would have written, saying which file and line, which
record, and why: cut off, not a record, edited, signed with another key, deleted, reordered,
inserted, or a whole segment missing. Records removed from the very end are caught by the
signed head (audit/head.json); removing the head as well hides that, which docs/audit.md
says.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mvm.core.state import MvmHome
from mvm.security import audit
from mvm.security.host_key import canonical_json


@dataclass
class Problem:
    """The first bad place in the chain."""

    file: str
    line: int
    why: str
    seq: int | None = None
    record_id: str | None = None

    def text(self) -> str:
        what = f"record {self.seq}" + (f" ({self.record_id})" if self.record_id else "") if self.seq else "a line"
        return f"{self.file}:{self.line}: {what}: {self.why}"


@dataclass
class Report:
    ok: bool
    records: int
    segments: int
    public_key: str
    problem: Problem | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Line:
    file: Path
    number: int
    raw: bytes  # without its newline
    complete: bool  # it ended with a newline


def segment_files(home: MvmHome) -> list[tuple[int | None, Path]]:
    """(segment number or None for the current one, path), oldest first."""
    files: list[tuple[int | None, Path]] = [(n, audit.segment_path(home, n)) for n in audit.rotated_segments(home)]
    current = audit.audit_dir(home) / audit.CURRENT
    if current.exists():
        files.append((None, current))
    return files


def lines(path: Path) -> Iterator[Line]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            yield Line(path, number, raw.rstrip(b"\n"), raw.endswith(b"\n"))


def entries(home: MvmHome) -> Iterator[dict[str, Any]]:
    """Every readable record's entry, oldest first, unchecked (`verify` checks)."""
    for _, path in segment_files(home):
        for line in lines(path):
            try:
                entry = json.loads(line.raw)["entry"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(entry, dict):
                yield entry


def find(home: MvmHome, record_id: str) -> tuple[Line, dict[str, Any]] | None:
    """The line and entry whose id is (or starts with, when at least 8 long) ``record_id``."""
    if len(record_id) < 8:
        return None
    for _, path in segment_files(home):
        for line in lines(path):
            if record_id.encode() not in line.raw:
                continue
            try:
                entry = json.loads(line.raw)["entry"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(entry, dict) and str(entry.get("id", "")).startswith(record_id):
                return line, entry
    return None


class Checker:
    """Walks the chain line by line, as a verifier that knows only the public key would."""

    def __init__(self, public_hex: str) -> None:
        self.public_hex = public_hex
        self.key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        self.key_id = audit.key_id(public_hex)
        self.expected_seq = 1
        self.prev_hash = audit.GENESIS
        self.seen: dict[int, str] = {}  # seq -> hash of its line (for telling copies apart)

    def check(self, line: Line, segment: int) -> Problem | None:
        name = line.file.name
        if not line.complete:
            return Problem(name, line.number, "truncated: the line is cut off (it has no end)")
        try:
            outer = json.loads(line.raw)
            entry, prev, signature = outer["entry"], outer["prev_hash"], outer["signature"]
            seq = entry["seq"]
            if not (isinstance(entry, dict) and isinstance(prev, str) and isinstance(signature, str)
                    and isinstance(seq, int) and set(outer) == {"entry", "prev_hash", "signature"}):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return Problem(name, line.number, "not an audit record (edited or damaged)")
        record_id = str(entry.get("id"))[:40]
        if not self.signed(signature, canonical_json({"entry": entry, "prev_hash": prev})):
            if entry.get("key") != self.key_id:
                why = f"signed with another key ({str(entry.get('key'))[:16]}, not {self.key_id})"
            else:
                why = "edited: its signature does not match its contents"
            return Problem(name, line.number, why, seq, record_id)
        digest = audit.line_hash(line.raw)
        if entry.get("segment") != segment:
            return Problem(name, line.number, f"moved: it was written to segment {entry.get('segment')}, "
                           f"this is segment {segment}", seq, record_id)
        if seq < self.expected_seq:
            if self.seen.get(seq) == digest:
                return Problem(name, line.number, f"inserted: a copy of record {seq}, which came earlier", seq,
                               record_id)
            return Problem(name, line.number, f"reordered: record {seq} comes after record {self.expected_seq - 1}",
                           seq, record_id)
        if seq > self.expected_seq:
            return Problem(name, line.number, f"records {self.expected_seq}..{seq - 1} before it are missing "
                           "(deleted)", seq, record_id)  # (the caller tells a swap from this)
        if prev != self.prev_hash:
            return Problem(name, line.number, "its prev_hash is not the hash of the line before it "
                           "(that line was replaced)", seq, record_id)
        self.seen[seq] = digest
        self.expected_seq, self.prev_hash = seq + 1, digest
        return None

    def signed(self, signature: str, data: bytes) -> bool:
        try:
            self.key.verify(base64.b64decode(signature, validate=True), data)
        except (ValueError, InvalidSignature, TypeError):
            return False
        return True


def verify(home: MvmHome, public_hex: str | None = None) -> Report:
    """Check the whole chain against ``public_hex`` (default: this home's key)."""
    from mvm.security.host_key import KEY_FILE

    key_existed = (home.keys / KEY_FILE).exists()  # (before host_key() makes one)
    public_hex = public_hex or audit.host_key(home).public_hex
    checker = Checker(public_hex)
    files = segment_files(home)
    report = Report(ok=True, records=0, segments=len(files), public_key=public_hex)
    expected_segment = 1
    for number, path in files:
        segment = number if number is not None else expected_segment
        if number is not None and number != expected_segment or (number is None and _starts_late(path, segment)):
            missing = expected_segment if number is not None else segment
            report.problem = Problem(path.name, 1, f"segment {audit.segment_path(home, missing).name} is missing "
                                     "(removed)")
            break
        for line in lines(path):
            problem = checker.check(line, segment)
            if problem is not None:
                if problem.why.endswith("(deleted)") and _appears_later(files, path, line.number,
                                                                         checker.expected_seq):
                    problem.why = (f"reordered: record {problem.seq} comes where record {checker.expected_seq} "
                                   "belongs, which is further on")
                report.problem = problem
                break
            report.records += 1
        if report.problem is not None:
            break
        expected_segment = segment + 1
    if report.problem is None:
        _check_head(home, checker, files, report)
        if report.records == 0:
            _warn_of_a_vanished_chain(home, key_existed, report)
    report.ok = report.problem is None
    return report


def _warn_of_a_vanished_chain(home: MvmHome, key_existed: bool, report: Report) -> None:
    """No records at all is a whole (empty) chain, but not when there are signs that one existed:
    an earlier verify counted records, or the home has a host key (made by the first append,
    or by a snapshot: a warning, since which cannot be told)."""
    earlier = audit.last_verify(home)
    counted = earlier.get("records") if earlier else None
    if isinstance(counted, int) and counted > 0:
        report.warnings.append(f"there are no audit records, but the verify of {str(earlier.get('time'))[:30]} "
                               f"counted {counted}: the log ({audit.audit_dir(home)}) was removed or emptied")
    elif key_existed:
        report.warnings.append(f"there are no audit records, but this home has a host key ({home.keys}): if "
                               "actions were recorded, the log was removed (the key is also made by snapshots)")


def _starts_late(path: Path, segment: int) -> bool:
    """The current segment claims a later number than the rotated ones allow (one was removed)."""
    for line in lines(path):
        try:
            return int(json.loads(line.raw)["entry"]["segment"]) > segment
        except (ValueError, KeyError, TypeError):
            return False
    return False


def _appears_later(files: list[tuple[int | None, Path]], path: Path, after: int, seq: int) -> bool:
    """Whether record ``seq`` is somewhere after line ``after`` of ``path`` (a swap, not a deletion)."""
    started = False
    needle = f'"seq":{seq},'.encode()
    for _, candidate in files:
        started = started or candidate == path
        if not started:
            continue
        for line in lines(candidate):
            if (candidate != path or line.number > after) and needle in line.raw:
                return True
    return False


def _check_head(home: MvmHome, checker: Checker, files: list[tuple[int | None, Path]], report: Report) -> None:
    """Records cut off the end leave a whole chain; the signed head still counts them."""
    raw_head = audit.audit_dir(home) / audit.HEAD
    if not raw_head.exists():
        if files:
            report.warnings.append("there is no head (audit/head.json): records removed from the end would not show")
        return
    head = audit.read_head(home)
    if head is None or not checker.signed(_head_signature(home), canonical_json(head)):
        report.warnings.append("the head (audit/head.json) is damaged or not signed by this key: "
                               "records removed from the end would not show")
        return
    last = report.records
    where = files[-1][1].name if files else audit.CURRENT
    if head["count"] > last:
        report.problem = Problem(where, last + 1, f"truncated: the chain ends at record {last} but the head "
                                 f"counts {head['count']} (records {last + 1}..{head['count']} were removed)")
    elif head["count"] == last and head["last_hash"] != checker.prev_hash:
        report.problem = Problem(where, last, "the last record is not the one the head names (replaced)", last)
    elif head["count"] < last:
        report.warnings.append(f"the head counts {head['count']} records, the chain has {last}: a writer "
                               "died before updating it")


def _head_signature(home: MvmHome) -> str:
    try:
        return str(json.loads((audit.audit_dir(home) / audit.HEAD).read_bytes()[:4096]).get("signature"))
    except (OSError, ValueError, AttributeError):
        return ""


def export(home: MvmHome, out: Path) -> int:
    """Write the public key and every line, in order, to ``out``; returns the record count."""
    public_hex = audit.host_key(home).public_hex
    count = 0
    with out.open("wb") as f:
        f.write(canonical_json({"mvm_audit_export": 1, "public_key": public_hex,
                                "key_id": audit.key_id(public_hex)}) + b"\n")
        for _, path in segment_files(home):
            for line in lines(path):
                f.write(line.raw + b"\n")
                count += 1
    return count


def receipt_status(home: MvmHome, record_id: str) -> tuple[dict[str, Any], str] | None:
    """A record and whether it verifies: its own signature, and the links to its neighbours."""
    found = find(home, record_id)
    if found is None:
        return None
    line, entry = found
    checker = Checker(audit.host_key(home).public_hex)
    outer = json.loads(line.raw)
    if not checker.signed(str(outer.get("signature")), canonical_json({"entry": entry,
                                                                       "prev_hash": outer.get("prev_hash")})):
        return entry, "does not verify: its signature is not this host key's over its contents"
    digest = audit.line_hash(line.raw)
    following = _next_line(home, line)
    if following is not None:
        try:
            if json.loads(following)["prev_hash"] != digest:
                return entry, "signed, but the record after it does not link to it (the chain was changed there)"
        except (ValueError, KeyError, TypeError):
            return entry, "signed, but the line after it is not a record"
    return entry, "verifies: signed by this host's key and linked into the chain"


def _next_line(home: MvmHome, line: Line) -> bytes | None:
    found = False
    for _, path in segment_files(home):
        for candidate in lines(path):
            if found:
                return candidate.raw
            found = candidate.file == line.file and candidate.number == line.number
    return None
