"""A clone of a RAM-file snapshot, restored by the launcher before the supervisor starts.

A clone's QEMU is ready for its state ~20 ms after its spawn, and loading a RAM-file
snapshot (device state only: the RAM is mapped from the snapshot's file) takes ~15 ms more;
the supervisor's Python is ready only ~100 ms after its exec. So the launcher
(runtime/launcher.py), which spawned QEMU from code already loaded, queues the host's hello
and the clone's identity on the agent's channel, restores the state over QMP and lets the
guest run, and only then execs the supervisor, which starts while the guest takes its
identity. (A stream snapshot, with the guest's RAM inside, can take seconds to load: that
one the supervisor loads itself, qemu_migration.load.) Plain sockets, no asyncio: the
launcher imports this before its exec.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mvm.core.errors import VmError

MIGRATION_TIMEOUT_S = 120.0  # a stream with a whole guest's RAM in it, written to disk
POLL_S = 0.002
RESTORE_TIMEOUT_S = 20.0  # a RAM-file snapshot's restore: device state only, milliseconds when all is well


def restore_ram_file_snapshot(qmp_socket: Path, agent_socket: Path, state: Path, *, expected_version: str,
                              agent_frames: Callable[[], bytes], alive: Callable[[], bool]) -> int:
    """Restore a QEMU just started with ``-incoming defer`` from a RAM-file snapshot's
    ``state`` and run it, once ``agent_frames()`` (made once QEMU has answered: its identity
    carries the time) wait on the agent's channel. Returns that channel's connection (the
    supervisor serves it as the agent's). ``alive()`` says whether QEMU still runs. All
    within RESTORE_TIMEOUT_S, which `up` waits for (lifecycle.SUPERVISOR_START_S)."""
    deadline = time.monotonic() + RESTORE_TIMEOUT_S
    qmp = _dial(qmp_socket, deadline, alive)
    try:
        reader = qmp.makefile("rb")

        def execute(name: str, _fds: list[int] | None = None, **arguments: Any) -> Any:
            qmp.settimeout(max(0.01, deadline - time.monotonic()))
            return qmp_execute(qmp, reader, name, _fds, **arguments)

        qmp.settimeout(max(0.01, deadline - time.monotonic()))
        greeting = _message(reader, "its greeting")
        try:
            check_version(greeting["QMP"]["version"], expected_version)
        except (KeyError, TypeError, AttributeError):
            raise VmError(f"QEMU's QMP greeting is not one: {str(greeting)[:200]}") from None
        try:
            state_fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise VmError(f"cannot read the snapshot's {state.name}: {err.strerror}") from None
        try:
            agent = _dial(agent_socket, deadline, alive)  # (QEMU made it before its QMP socket)
            try:
                agent.sendall(agent_frames())
                execute("qmp_capabilities")
                execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
                execute("getfd", [state_fd], fdname="mvm-migration")
                execute("migrate-incoming", uri="fd:mvm-migration")
                while not migration_done(execute("query-migrate"), time.monotonic() > deadline, RESTORE_TIMEOUT_S):
                    time.sleep(POLL_S)
                # The source was stopped to be saved, and a restore keeps the state it was saved in.
                if (execute("query-status") or {}).get("status") != "running":
                    execute("cont")
                return agent.detach()
            finally:
                agent.close()
        finally:
            os.close(state_fd)  # (QEMU has its own copy)
    except TimeoutError:
        raise VmError(f"QEMU did not restore the snapshot within {RESTORE_TIMEOUT_S:.0f} s") from None
    except OSError as err:
        raise VmError(f"QEMU's QMP or agent socket: {err.strerror or err}") from None
    finally:
        qmp.close()


def migration_done(info: Any, late: bool, limit_s: float = MIGRATION_TIMEOUT_S) -> bool:
    """Whether query-migrate's answer ``info`` says the migration (out or in) has completed;
    its error if it failed, or if it is still going when it is ``late``."""
    status = info.get("status") if isinstance(info, dict) else None
    if status == "completed":
        return True
    if status in ("failed", "cancelled"):
        raise VmError(f"the migration {status}: {str(info.get('error-desc', 'no reason given'))[:300]}")
    if late:
        raise VmError(f"the migration did not finish within {limit_s:.0f} s (status {status})")
    return False


def _dial(path: Path, deadline: float, alive: Any) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    while True:
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if not alive():
                sock.close()
                raise VmError(f"QEMU exited before it opened {path.name}") from None
            if time.monotonic() > deadline:
                sock.close()
                raise VmError(f"QEMU did not open {path.name} within {RESTORE_TIMEOUT_S:.0f} s") from None
            time.sleep(0.001)


def qmp_execute(qmp: socket.socket, reader: Any, name: str, _fds: list[int] | None = None, **arguments: Any) -> Any:
    """One QMP command and its answer (events on the way are skipped)."""
    line = json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})}).encode() + b"\n"
    if _fds:
        socket.send_fds(qmp, [line], _fds)
    else:
        qmp.sendall(line)
    while True:
        message = _message(reader, f"its answer to {name}")
        if "event" in message:
            continue
        if "error" in message:
            error = message["error"]
            raise VmError(f"QEMU refused {name}: {str(error.get('desc') if isinstance(error, dict) else error)[:300]}")
        return message.get("return")


def _message(reader: Any, what: str) -> dict[str, Any]:
    line = reader.readline(65536)
    if not line.endswith(b"\n"):
        raise VmError(f"QEMU closed its QMP socket (or sent over 64 KiB) before {what}")
    try:
        message = json.loads(line)
    except ValueError:
        raise VmError(f"QEMU's QMP sent something not JSON before {what}: {line[:200]!r}") from None
    if not isinstance(message, dict):
        raise VmError(f"QEMU's QMP sent something not an object before {what}: {line[:200]!r}")
    return message


def version_text(reply: dict[str, Any]) -> str:
    q = reply.get("qemu", {})
    return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}{reply.get('package', '')}".strip()


def check_version(reply: dict[str, Any], expected: str) -> None:
    """A snapshot loads only into the QEMU version that made it (``reply``: query-version's)."""
    version = version_text(reply)
    if version != expected:
        raise VmError(f"the snapshot was made by QEMU {expected}; this host runs QEMU {version}",
                      "take a new snapshot with this QEMU")
