"""A guest restored from a snapshot is one of many copies: before it does any work it gets
an identity of its own (arXiv 2102.12892, "Restoring Uniqueness in MicroVM Snapshots").

The host sends ``freeze`` just before it saves the VM, so every copy wakes up frozen: the
agent then refuses all work but ``identity`` (and ``thaw``, which the snapshotted VM itself
gets when it carries on as it was). ``identity`` carries fresh entropy from the host, the
host's clock, a hostname and a machine-id. The agent is not root, so a root helper that
/init started at ``freeze`` applies them: it mixes the entropy in with RNDADDENTROPY, forces
the kernel's CRNG to reseed (RNDRESEEDCRNG: without it the copies' /dev/urandom streams stay
identical until the next scheduled reseed), steps the clock and writes the names, then
reports back in /run/mvm/identity. Processes that were running when the snapshot was taken
run on from the moment the guest resumes, a few milliseconds before this is done.
"""

from __future__ import annotations

import os
import time

from mvm.core import protocol

from .channel import write_all
from .dispatch import Refused, arg, handles
from .system import CONTROL_FIFO

TYPE_CHECKING = False  # (typing and re cost their import at the agent's start: checks are by hand)
if TYPE_CHECKING:
    from .session import Session

STATUS_FILE = os.environ.get("MVM_AGENT_IDENTITY_STATUS", "/run/mvm/identity")  # the helper's answers
REQUEST_FIFO = os.environ.get("MVM_AGENT_IDENTITY_REQUEST", "/run/mvm/identity-request")
FREEZE_TIMEOUT_S = 30.0  # a Python starting under TCG on a busy host
IDENTITY_TIMEOUT_S = 5.0
ALLOWED_WHILE_FROZEN = frozenset({"hello", "ping", "identity", "thaw", "freeze"})
HEX_DIGITS = frozenset("0123456789abcdef")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


def is_hex(text: str) -> bool:
    return bool(text) and set(text) <= HEX_DIGITS


def is_hostname(text: str) -> bool:
    """[a-z0-9][a-z0-9_.-]{0,62}, as the host's VM names are."""
    return 0 < len(text) <= 63 and set(text) <= NAME_CHARS and text[0] not in "_.-"
FROZEN: list[bool] = []  # set by freeze; what a restored copy wakes up with


def check_frozen(kind: str) -> None:
    if FROZEN and kind not in ALLOWED_WHILE_FROZEN:
        raise Refused("this guest was restored from a snapshot and has not been given its own identity yet "
                      "(its host sends that first; a request before it is refused)")


@handles("freeze")
def do_freeze(session: Session, frame: protocol.Frame) -> None:
    """/init starts its root helper, which waits for the identity line; once it is ready the
    guest may be saved, and every copy wakes up with the helper already waiting."""
    import hashlib  # identity's, loaded before the save: no clone imports it under a cold TCG

    hashlib.sha256(b"")  # (and OpenSSL's lookup of its sha256, ~15 ms under TCG, made before the save too)

    nonce = os.urandom(16).hex()
    _remove_status()
    _write_line(CONTROL_FIFO, f"freeze {nonce}")
    _await_status(f"ready {nonce}", FREEZE_TIMEOUT_S, "start its identity helper")
    FROZEN[:] = [True]
    session.channel.reply(frame.id, "result")


@handles("thaw")
def do_thaw(session: Session, frame: protocol.Frame) -> None:
    """The snapshotted VM itself carries on as it was: its helper goes away unused."""
    try:
        _write_line(REQUEST_FIFO, "thaw")
    except OSError:
        pass  # no helper waiting (it failed to start): nothing to tell
    FROZEN.clear()
    session.channel.reply(frame.id, "result")


@handles("identity")
def do_identity(session: Session, frame: protocol.Frame) -> None:
    entropy = arg(frame, "entropy", str)
    host_time = arg(frame, "time", (int, float))
    hostname = arg(frame, "hostname", str)
    machine_id = arg(frame, "machine_id", str)
    if not (is_hex(entropy) and 64 <= len(entropy) <= 1024 and len(entropy) % 2 == 0):
        raise Refused("identity: entropy must be 32-512 bytes of hex")
    if not is_hostname(hostname):
        raise Refused("identity: hostname is not a plain name")
    if machine_id != "-" and not (is_hex(machine_id) and len(machine_id) == 32):
        raise Refused("identity: machine_id must be 32 hex digits (or '-': keep it)")
    if not 1e9 < host_time < 1e11:
        raise Refused("identity: time is not a plausible Unix time")
    _write_line(REQUEST_FIFO, f"identity {host_time:.6f} {hostname} {machine_id} {entropy}")
    import hashlib  # (already loaded by freeze)

    # The helper answers with a digest of the entropy (fresh each time: a nonce), never any of
    # it: /run/mvm/identity is readable by the workload.
    _await_status(f"{hashlib.sha256(entropy.encode()).hexdigest()[:32]} ok", IDENTITY_TIMEOUT_S, "apply it")
    FROZEN.clear()
    session.channel.reply(frame.id, "result", time=time.time())


def _write_line(fifo: str, line: str) -> None:
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # ENXIO: nobody reads it
    try:
        write_all(fd, line.encode() + b"\n")  # (under PIPE_BUF: one atomic write)
    finally:
        os.close(fd)


def _remove_status() -> None:
    try:
        os.unlink(STATUS_FILE)
    except OSError:
        pass  # none yet, or root's (in root's /run/mvm): the helper replaces it


def _await_status(expected: str, timeout: float, what: str) -> None:
    """Until the helper's status file says ``expected``; "<same first word> failed ..." or
    "refused ..." end the wait with its reason."""
    failed = expected.split()[0] + " failed "
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(STATUS_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            status = ""
        else:
            try:
                status = os.read(fd, 4096).decode(errors="replace").strip()
            finally:
                os.close(fd)
        if status == expected:
            return
        if status.startswith((failed, "refused ")):
            raise Refused(f"/init could not {what}: {status.removeprefix(failed)[:200]}")
        if time.monotonic() > deadline:
            raise Refused(f"/init did not {what} within {timeout:.0f} s")
        time.sleep(0.002)
