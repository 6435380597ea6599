"""`mvmctl audit ls|show|verify|export` and `mvmctl receipt show`: read and check the audit
chain (security/audit.py, security/audit_verify.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from mvm.core.errors import MvmError, UsageError
from mvm.core.state import MvmHome
from mvm.runtime.transfer import printable
from mvm.security import audit as audit_log
from mvm.security import audit_verify


class AuditTampered(MvmError):
    """`audit verify` found a bad record."""

    exit_code = 3


def parse_since(text: str) -> str:
    """--since: an ISO time (2026-12-01, 2026-12-01T17:00:00) or an age (90s, 10m, 2h, 3d), as
    the entries' own time format so that it compares as text."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        seconds = time.time() - float(text[:-1]) * units[text[-1]]
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    for form in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.strptime(text.rstrip("Z"), form))
        except ValueError:
            continue
    raise UsageError(f"--since {text!r} is neither a UTC time nor an age", "e.g. --since 2026-12-01T17:00 or --since 2h")


@click.group()
def audit() -> None:
    """The signed record of what ran where and as whom (docs/audit.md).

    \b
      mvmctl audit ls --vm web --since 2h
      mvmctl audit show 3f2a9c1e
      mvmctl audit verify            exit 0 when the whole chain is intact
      mvmctl audit export --out audit.jsonl
    """


@audit.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print the records as a JSON list.")
@click.option("--vm", "vm", metavar="NAME", help="Only the records of VM NAME.")
@click.option("--since", metavar="TIME", help="Only records from TIME on: a UTC time, or an age like 2h.")
def ls(as_json: bool, vm: str | None, since: str | None) -> None:
    """List audit records, oldest first (unchecked: `mvmctl audit verify` checks them)."""
    cutoff = parse_since(since) if since else None
    chosen = [e for e in audit_verify.entries(MvmHome.default())
              if (vm is None or e.get("vm") == vm) and (cutoff is None or str(e.get("time", "")) >= cutoff)]
    if as_json:
        click.echo(json.dumps(chosen, indent=2))
        return
    for entry in chosen:
        click.echo(printable(summary(entry)))


def summary(entry: dict[str, Any]) -> str:
    actor = entry.get("actor") if isinstance(entry.get("actor"), dict) else {}
    detail = entry.get("detail") if isinstance(entry.get("detail"), dict) else {}
    what = entry.get("argv") or entry.get("paths") or detail.get("destination") or ""
    if isinstance(what, list):
        what = " ".join(str(w) for w in what)
    status = str(entry.get("result", "?")) + (f" {entry['exit_status']}" if entry.get("exit_status") is not None else "")
    return (f"{str(entry.get('id'))[:12]}  {entry.get('time')}  {entry.get('vm') or '-'!s:<12} "
            f"{entry.get('operation')!s:<8} {status:<8} {actor.get('surface')}/uid {actor.get('uid')}  {what}"[:240])


@audit.command()
@click.argument("record_id")
def show(record_id: str) -> None:
    """Show one record (by its id, or its first 8 or more characters) as JSON."""
    found = audit_verify.find(MvmHome.default(), record_id)
    if found is None:
        raise UsageError(f"there is no audit record {record_id!r}", "`mvmctl audit ls` lists them")
    click.echo(json.dumps(found[1], indent=2))


@audit.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(as_json: bool) -> None:
    """Check every record's signature and its place in the chain; exit 0 when all is whole,
    3 naming the first bad record and why."""
    home = MvmHome.default()
    report = audit_verify.verify(home)
    audit_log.save_last_verify(home, {"ok": report.ok, "records": report.records,
                                  "problem": report.problem.text() if report.problem else None})
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for warning in report.warnings:
            click.echo(f"mvmctl: warning: {warning}", err=True)
        if report.ok:
            click.echo(f"the audit chain is whole: {report.records} records in {report.segments} segment(s), "
                       f"signed by key {report.public_key[:16]}")
    if report.problem is not None:
        if as_json:
            sys.exit(AuditTampered.exit_code)
        raise AuditTampered(f"the audit chain is broken at {report.problem.text()}",
                            "keep the log as evidence; `mvmctl audit show` reads the records around it")


@audit.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The file to write.")
def export(out: str) -> None:
    """Write the chain and the public key to FILE, for checking elsewhere (docs/audit.md has
    a few lines of Python that do it without mvm)."""
    count = audit_verify.export(MvmHome.default(), Path(out))
    click.echo(f"wrote {count} records and the public key to {out}")


@click.group()
def receipt() -> None:
    """Receipts: the audit record of one action (`--receipt` on up, run, exec and cp prints its id)."""


@receipt.command(name="show")
@click.argument("record_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record and its status as JSON.")
def receipt_show(record_id: str, as_json: bool) -> None:
    """Show the record RECORD_ID and whether it verifies (signature, and its link in the chain)."""
    found = audit_verify.receipt_status(MvmHome.default(), record_id)
    if found is None:
        raise UsageError(f"there is no audit record {record_id!r}", "`mvmctl audit ls` lists them")
    entry, status = found
    if as_json:
        click.echo(json.dumps({"record": entry, "status": status, "verifies": status.startswith("verifies")},
                              indent=2))
    else:
        click.echo(json.dumps(entry, indent=2))
        click.echo(status)
    if not status.startswith("verifies"):
        sys.exit(AuditTampered.exit_code)


COMMANDS = [audit, receipt]
