"""`mvmctl plan record SCRIPT` and `mvmctl plan run PLAN.json`: review what a program would
do to its sandboxes before anything of it runs live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import click

from mvm.core.errors import MvmError, UsageError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def plan() -> None:
    """Record a program's sandbox calls as a plan, review it, run it later.

    \b
      mvmctl plan record job.py > plan.json   # (or: mvmctl run --mode plan job.py)
      mvmctl plan run plan.json
    """


def record_script(script: str, args: tuple[str, ...]) -> str:
    """Run SCRIPT with the SDK in record mode; returns the plan it wrote. The script itself
    runs on this host: record mode keeps its sandboxes from booting, not the script from
    doing what it likes, so record only scripts you would run."""
    path = Path(script)
    if not path.is_file():
        raise UsageError(f"no script {script}", "pass a Python file that uses mvm.Sandbox")
    with tempfile.TemporaryDirectory(prefix="mvm-plan-") as tmp:
        out = Path(tmp) / "plan.json"
        env = {**os.environ, "MVM_SDK_MODE": "record", "MVM_SDK_OUT_PATH": str(out)}
        proc = subprocess.run([sys.executable, str(path), *args], env=env, stdin=subprocess.DEVNULL,
                              stdout=sys.stderr, check=False)
        if proc.returncode != 0:
            raise UsageError(f"{script} exited {proc.returncode} while being recorded (its output is above)",
                             "fix the script; calls that need a live guest raise ModeError in record mode")
        if not out.is_file():
            raise UsageError(f"{script} made no sandbox calls: there is no plan", "does it use mvm.Sandbox?")
        return out.read_text()


@plan.command("record")
@click.argument("script", type=click.Path())
@click.argument("args", nargs=-1)
def record(script: str, args: tuple[str, ...]) -> None:
    """Run SCRIPT (Python) with its sandboxes in record mode and print the plan (JSON)."""
    click.echo(record_script(script, args), nl=False)


@plan.command("run")
@click.argument("plan_file", metavar="PLAN.json", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print each step's outcome as JSON.")
def run(plan_file: str, as_json: bool) -> None:
    """Carry out a recorded plan, live: each call in order, stopping at the first failure.

    Every call is checked before anything starts. Sandboxes the plan did not kill are killed
    when it ends. Exits 1 if a step failed.
    """
    import hashlib

    from mvm.sdk.replay import load_plan, replay

    try:
        text = Path(plan_file).read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read plan {plan_file}: {err.strerror}") from None
    started = time.monotonic()
    audited = {"path": str(Path(plan_file).resolve()), "sha256": hashlib.sha256(text).hexdigest()}
    try:
        calls = load_plan(text)
    except MvmError as err:
        record_plan_run(started, audited, error=err)
        raise

    def report(step) -> None:  # type: ignore[no-untyped-def]
        if not as_json:
            mark = "ok  " if step.ok else "FAIL"
            click.echo(f"{mark} #{step.index} {step.op} {step.sandbox}: {step.detail}")
            for stream, text in (("stdout", step.stdout), ("stderr", step.stderr)):
                for line in text.splitlines():
                    click.echo(f"       {stream}: {line}")

    try:
        steps = replay(calls, report)
    except BaseException as err:
        record_plan_run(started, {**audited, "steps": len(calls)}, error=err)
        raise
    failed = next((s for s in steps if not s.ok), None)
    whole = bool(steps) and failed is None and len(steps) == len(calls)
    record_plan_run(started, {**audited, "steps": len(calls), "steps_run": len(steps),
                              **({"failed_step": failed.index, "failed_op": failed.op} if failed else {})},
                    result="ok" if whole else "failed")
    if as_json:
        click.echo(json.dumps([asdict(s) for s in steps], indent=2))
    if not whole:
        raise SystemExit(1)


def record_plan_run(started: float, detail: dict[str, object], *, result: str | None = None,
                    error: BaseException | None = None) -> None:
    """The ``plan-run`` audit record: which plan (path, sha256), how many steps, how it went.
    The calls it replays are recorded on their own as the SDK's (surface ``sdk``), as they
    would be from the program that was recorded; this record is the CLI's."""
    from mvm.core.state import MvmHome
    from mvm.runtime.client import current_surface, set_surface
    from mvm.security import audit

    surface = current_surface()
    set_surface("cli")  # (importing the SDK made this process say "sdk")
    try:
        audit.record(MvmHome.default(), operation="plan-run", paths=[detail["path"]],
                     result="error" if error is not None else result,
                     duration_ms=round((time.monotonic() - started) * 1000, 3),
                     detail={**detail, **({"error": str(error)[:300]} if error is not None else {})})
    finally:
        set_surface(surface)


COMMANDS = [plan]
