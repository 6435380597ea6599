"""``mvmctl plan run PLAN.json``: carry out a plan that record mode wrote (sdk/record.py).

A plan is read as hostile input: every call is checked for its fields and their types
before anything starts, a write's bytes must match its recorded size and sha256, and a call
naming a sandbox the plan did not create is refused. Then each call is made live, in order.
A started command runs in the background, as it did in the script (a server started there
may never end on its own): the plan goes on at once, and when its sandbox is killed, or the
plan ends, the command is given GRACE_S seconds to finish, then killed; its step then reports
its output and exit code. Sandboxes the plan did not kill are killed when it ends, as a live
script's would be at its exit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mvm.errors import ModeError
from mvm.sdk.record import PLAN_FORMAT

if TYPE_CHECKING:
    from mvm.sdk.handles import CommandHandle

PLAN_MAX = 64 << 20
GRACE_S = 5.0  # how long a started command may take to end once its sandbox is about to go
_OPTIONAL = (type(None),)
FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "create": {"template": (str,), "cpus": (int, *_OPTIONAL), "memory": (int, *_OPTIONAL),
               "network": (str, *_OPTIONAL), "allow": (list, *_OPTIONAL), "env": (dict, *_OPTIONAL), "timeout": (int, float),
               "backend": (str, *_OPTIONAL), "workload_id": (str, *_OPTIONAL), "cold": (bool, *_OPTIONAL)},
    "start": {"argv": (list,), "env": (dict, *_OPTIONAL), "cwd": (str, *_OPTIONAL),
              "timeout": (int, float, *_OPTIONAL)},
    "write": {"path": (str,), "mode": (int,), "size": (int,), "sha256": (str,), "data": (str,)},
    "make_dir": {"path": (str,)},
    "remove": {"path": (str,), "recursive": (bool, *_OPTIONAL)},
    "rename": {"src": (str,), "dst": (str,)},
    "network": {"allow": (list, *_OPTIONAL), "deny": (list, *_OPTIONAL)},
    "kill": {},
}
REQUIRED = {"create": {"template", "timeout"}, "start": {"argv"}, "write": set(FIELDS["write"]),
            "make_dir": {"path"}, "remove": {"path"}, "rename": {"src", "dst"}, "network": set(), "kill": set()}


@dataclass
class Step:
    index: int
    op: str
    sandbox: str
    ok: bool
    detail: str
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""


@dataclass
class _Started:
    """A replayed ``start``: its handle, and the thread that collects its output."""

    step: Step
    handle: CommandHandle
    outcome: list[Any] = field(default_factory=list)  # its CommandResult, or the error that ended it
    thread: threading.Thread | None = None

    def collect(self) -> None:
        try:
            self.outcome.append(self.handle.wait())
        except Exception as err:  # noqa: BLE001 - reported in its step
            self.outcome.append(err)


def _finish(started: list[_Started], report: Callable[[Step], None]) -> None:
    """Give each command GRACE_S seconds to end, kill those still running, and report each
    step with its output."""
    from mvm.core.errors import MvmError

    deadline = time.monotonic() + GRACE_S
    for run in started:
        assert run.thread is not None
        run.thread.join(max(0.0, deadline - time.monotonic()))
        killed = run.thread.is_alive()
        if killed:
            try:
                run.handle.kill()
            except (MvmError, OSError, AssertionError):  # (it ended, and its handle closed, meanwhile)
                pass
            run.thread.join(GRACE_S)
        step, argv0 = run.step, run.handle.argv[0]
        outcome = run.outcome[0] if run.outcome else None
        if outcome is None:
            step.ok, step.detail = False, f"{argv0} did not answer a kill (it is killed with its sandbox)"
        elif isinstance(outcome, Exception):
            step.ok, step.detail = False, f"{argv0}: {outcome}"
        else:
            step.exit_code, step.stdout, step.stderr = outcome.exit_code, outcome.stdout, outcome.stderr
            step.detail = (f"{argv0} was still running {GRACE_S:g} s after the plan was done with its sandbox: killed"
                           if killed else f"{argv0} exited {outcome.exit_code}")
        report(step)
    started.clear()


def load_plan(text: str | bytes) -> list[dict[str, Any]]:
    """The plan's calls, every one checked; ModeError naming the first bad one."""
    if len(text) > PLAN_MAX:
        raise ModeError(f"the plan is {len(text)} bytes, over the {PLAN_MAX >> 20} MiB limit")
    try:
        plan = json.loads(text)
    except ValueError as err:
        raise ModeError(f"the plan is not JSON ({err})", "pass the file a record-mode run wrote") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("calls"), list):
        raise ModeError(f"the plan is not a format-{PLAN_FORMAT} plan with a list of calls")
    created: set[str] = set()
    for index, call in enumerate(plan["calls"]):
        _check_call(index, call, created)
    return plan["calls"]


def _check_call(index: int, call: Any, created: set[str]) -> None:
    where = f"plan call #{index}"
    if not isinstance(call, dict) or call.get("op") not in FIELDS or not isinstance(call.get("sandbox"), str):
        raise ModeError(f"{where} is not an op of {', '.join(FIELDS)} on a named sandbox")
    op, fields = call["op"], FIELDS[call["op"]]
    extra = set(call) - set(fields) - {"op", "sandbox"}
    missing = REQUIRED[op] - set(call)
    if extra or missing:
        raise ModeError(f"{where} ({op}) has {'unknown fields ' + ', '.join(sorted(extra)) if extra else ''}"
                        f"{'missing fields ' + ', '.join(sorted(missing)) if missing else ''}")
    for key, kinds in fields.items():
        value = call.get(key)
        if key in call and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise ModeError(f"{where} ({op}): {key} is {type(value).__name__}, not {'/'.join(k.__name__ for k in kinds)}")
    if op == "create":
        if call["sandbox"] in created:
            raise ModeError(f"{where} creates sandbox {call['sandbox']} a second time")
        created.add(call["sandbox"])
    elif call["sandbox"] not in created:
        raise ModeError(f"{where} ({op}) names sandbox {call['sandbox']!r}, which the plan did not create before")
    if op == "start" and not (call["argv"] and all(isinstance(a, str) for a in call["argv"])):
        raise ModeError(f"{where} (start): argv must be a non-empty list of strings")
    for key in ("env",):
        env = call.get(key)
        if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ModeError(f"{where} ({op}): env must map strings to strings")
    for key in ("allow", "deny"):
        entries = call.get(key)
        if entries is not None and not all(isinstance(e, str) for e in entries):
            raise ModeError(f"{where} ({op}): {key} must be a list of strings")
    if op == "write":
        try:
            data = base64.b64decode(call["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ModeError(f"{where} (write {call['path']}): its data is not base64") from None
        if len(data) != call["size"] or hashlib.sha256(data).hexdigest() != call["sha256"]:
            raise ModeError(f"{where} (write {call['path']}): its bytes do not match the recorded size and sha256")


def replay(calls: list[dict[str, Any]], report: Callable[[Step], None]) -> list[Step]:
    """Make each (checked) call live, in order; stops at the first that fails."""
    from mvm.core.errors import MvmError
    from mvm.sdk.sandbox import Sandbox

    live: dict[str, Sandbox] = {}
    started: dict[str, list[_Started]] = {}  # the commands running in each sandbox
    steps: list[Step] = []
    try:
        for index, call in enumerate(calls):
            op, name = call["op"], call["sandbox"]
            args = {k: v for k, v in call.items() if k not in ("op", "sandbox")}
            step = Step(index, op, name, True, "")
            try:
                if op == "create":
                    live[name] = Sandbox.create(args.pop("template"), mode="live", **args)
                    step.detail = f"created as {live[name].name}"
                elif op == "start":
                    handle = live[name].commands.start(args["argv"], env=args.get("env"), cwd=args.get("cwd"),
                                                       timeout=args.get("timeout"))
                    run = _Started(step, handle)
                    run.thread = threading.Thread(target=run.collect, name=f"plan-{index}", daemon=True)
                    run.thread.start()
                    started.setdefault(name, []).append(run)
                    step.detail = f"started {args['argv'][0]} (pid {handle.pid}); its end is reported later"
                elif op == "write":
                    size = live[name].files.write(args["path"], base64.b64decode(args["data"]), mode=args["mode"])
                    step.detail = f"wrote {args['path']} ({size} bytes)"
                elif op == "make_dir":
                    live[name].files.make_dir(args["path"])
                    step.detail = f"made {args['path']}"
                elif op == "remove":
                    live[name].files.remove(args["path"], recursive=bool(args.get("recursive")))
                    step.detail = f"removed {args['path']}"
                elif op == "rename":
                    live[name].files.rename(args["src"], args["dst"])
                    step.detail = f"renamed {args['src']} to {args['dst']}"
                elif op == "network":
                    entries = live[name].network.allow(*args.get("allow") or ())
                    if args.get("deny"):
                        entries = live[name].network.deny(*args["deny"])
                    step.detail = f"allow-list now {', '.join(entries) or 'empty'}"
                elif op == "kill":
                    _finish(started.pop(name, []), report)
                    live.pop(name).kill()
                    step.detail = "killed"
            except (MvmError, KeyError) as err:
                step.ok, step.detail = False, str(err) if isinstance(err, MvmError) else f"sandbox {name} is gone"
            steps.append(step)
            report(step)
            if not step.ok:
                break
    finally:
        for name, sandbox in live.items():
            try:
                _finish(started.pop(name, []), report)
            finally:
                sandbox.kill()
    return steps
