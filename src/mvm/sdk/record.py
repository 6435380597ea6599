"""Record mode: a program's sandbox calls become a plan, and nothing boots.

``Sandbox.create(mode="record")`` (or ``MVM_SDK_MODE=record``) returns a sandbox whose
calls are appended to a plan instead of acted on: its creation with every argument, the
commands it starts, the files it writes (with their bytes, size and sha256), the
directories it makes or removes, the renames, its kill. A call that needs a live guest (a command's
output, a file's contents) raises :class:`~mvm.errors.ModeError`. At exit the plan is
written as JSON to ``MVM_SDK_OUT_PATH``, or to stdout. Someone reviews it, and
``mvmctl plan run PLAN.json`` carries it out later (sdk/replay.py).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from mvm.errors import ModeError

MODE_ENV = "MVM_SDK_MODE"
OUT_ENV = "MVM_SDK_OUT_PATH"
MODES = ("live", "record")
PLAN_FORMAT = 1
WRITE_LIMIT = 1 << 20  # a recorded write carries its bytes: keep plans reviewable


def resolve_mode(mode: str | None) -> str:
    chosen = mode if mode is not None else os.environ.get(MODE_ENV, "live")
    if chosen not in MODES:
        where = f"mode={chosen!r}" if mode is not None else f"{MODE_ENV}={chosen!r}"
        raise ModeError(f"{where} is not a mode", f"use one of {', '.join(MODES)}")
    return chosen


@dataclass
class Plan:
    calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, op: str, sandbox: str, **fields: Any) -> int:
        self.calls.append({"op": op, "sandbox": sandbox, **{k: v for k, v in fields.items() if v is not None}})
        return len(self.calls) - 1

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "calls": self.calls}, indent=2) + "\n"


_PLAN: list[Plan] = []


def plan() -> Plan:
    """This process's plan, written out when it exits."""
    if not _PLAN:
        _PLAN.append(Plan())
        atexit.register(write_out)
    return _PLAN[0]


def write_out() -> None:
    text = _PLAN[0].to_json()
    path = os.environ.get(OUT_ENV)
    if not path:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def file_fields(data: bytes) -> dict[str, Any]:
    if len(data) > WRITE_LIMIT:
        raise ModeError(f"a recorded write of {len(data)} bytes is over the {WRITE_LIMIT}-byte limit of a plan",
                        "write it with copy_in in live mode, or keep plan files small")
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "data": base64.b64encode(data).decode()}


class RecordedCommand:
    """What ``commands.start`` returns in record mode: the plan's entry, nothing to wait on."""

    def __init__(self, index: int, argv: list[str], sandbox: str) -> None:
        self.index = index
        self.argv = argv
        self.sandbox = sandbox
        self.pid = None

    def _live(self, what: str) -> ModeError:
        return ModeError(f"{what} needs a live guest; in record mode `{self.argv[0]}` is only written into the plan",
                         "run the script in live mode, or review the plan and `mvmctl plan run` it")

    def wait(self) -> Any:
        raise self._live("wait()")

    def kill(self, signal: int = 9) -> None:
        raise self._live("kill()")

    def send_stdin(self, data: str | bytes) -> None:
        raise self._live("send_stdin()")

    def close_stdin(self) -> None:
        raise self._live("close_stdin()")

    def __iter__(self) -> Any:
        raise self._live("its output")

    def close(self) -> None:
        return None

    def __enter__(self) -> RecordedCommand:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def needs_live(sandbox: str, what: str) -> ModeError:
    return ModeError(f"{what} on sandbox {sandbox} needs a live guest, and it is in record mode",
                     "run the script in live mode (trusted scripts only), or record only what changes the guest")
