"""A running ``allow-list`` VM's list: read it, change it (its supervisor holds the list and
checks every connection against it; see runtime/supervisor/egress.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import replace

from mvm.core.bootimage import BootImage
from mvm.core.errors import MvmError, UsageError, VmError
from mvm.core.state import MvmHome, VmRecord
from mvm.runtime import lifecycle
from mvm.security.egress_policy import EntryError, parse_entry

UPDATE_WAIT_S = 30.0


def check_entries(entries: Iterable[str]) -> None:
    """Each entry parses as the host will read it; otherwise one line naming it."""
    for text in entries:
        if not isinstance(text, str):
            raise UsageError(f"allow entry {text!r} is not a string", "write host:port, *.domain:port or CIDR:port")
        try:
            parse_entry(text)
        except EntryError as err:
            raise UsageError(str(err).split(" (write ")[0], "write host:port, *.domain:port or CIDR:port") from None


def with_network(image: BootImage, mode: str | None, allow: Iterable[str] = ()) -> BootImage:
    """The image as started with another network mode and more allow entries (`up/run
    --network/--allow`, the SDK's ``network=``/``allow=``): the same artifact, only how it runs."""
    allow = tuple(allow)
    mode = mode or image.network_mode
    if mode not in lifecycle.NETWORK_MODES:
        raise UsageError(f"network mode {mode!r} is not one of {', '.join(lifecycle.NETWORK_MODES)}",
                         'use "deny" (no network), "allow-list" (only the listed destinations) or "open"')
    if allow and mode != "allow-list":
        raise UsageError(f"allow entries list destinations, but the network mode is {mode!r}",
                         "add --network allow-list (in the SDK: network=\"allow-list\")")
    check_entries(allow)
    entries = (*image.allow, *(a for a in allow if a not in image.allow)) if mode == "allow-list" else ()
    return replace(image, network_mode=mode, allow=entries)


def current(home: MvmHome, name: str) -> tuple[str, list[str]]:
    """(network mode, entries) from the VM's record."""
    _, record = lifecycle.require_vm(home, name)
    return record.network, list(record.allow)


def change(home: MvmHome, name: str, allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> list[str]:
    """Add ``allow`` and remove ``deny`` entries; returns the new list. New connections use
    it once this returns; connections already open run on.

    The list it would leave is held to the admission policy first (the home's policy.toml as
    it is now, and the ``--policy`` files the VM was started under), so a rule that refused
    the entry at `up` refuses it here too (PolicyRefused; an audit record either way). On a
    sealed VM a change whose record cannot be written is undone and fails (AuditError)."""
    check_entries(allow)
    _, record = lifecycle.require_vm(home, name)
    if record.network != "allow-list":
        raise UsageError(f"VM {name} runs with network {record.network!r}, not 'allow-list': it has no list to change",
                         'set [network] mode = "allow-list" in its mvm.toml and start it again')
    started = time.monotonic()
    detail: dict[str, object] = {"allow": list(allow), "deny": list(deny)}
    admit_change(home, record, allow, deny, detail)
    try:
        with lifecycle.connect(home, name) as client:
            reply = client.call("egress_update", allow=list(allow), deny=list(deny), wait_s=UPDATE_WAIT_S)
    except VmError as err:
        lifecycle.audit_action(home, "network", name=name, vm=record, started=started, error=err, detail=detail)
        raise
    try:
        lifecycle.audit_action(home, "network", name=name, vm=record, started=started, sealed=record.sealed,
                               detail=detail)
    except MvmError:  # (a sealed VM's AuditError: its list goes back to what the chain last said)
        undo_allow = [e for e in deny if e in record.allow]
        undo_deny = [e for e in allow if e not in record.allow]
        try:
            with lifecycle.connect(home, name) as client:
                client.call("egress_update", allow=undo_allow, deny=undo_deny, wait_s=UPDATE_WAIT_S)
        except VmError:
            pass
        raise
    if reply.get("applied") is False:
        sys.stderr.write(f"mvmctl: warning: VM {name}'s agent has not said it listens where the new list says "
                         "(paused, or busy); the host checks the new list either way\n")
    return [str(e) for e in reply.get("allow") or []]


def admit_change(home: MvmHome, record: VmRecord, allow: tuple[str, ...], deny: tuple[str, ...],
                 detail: dict[str, object]) -> None:
    """Hold the list ``change`` would leave to the [network] rules of the policies in force;
    a refusal is written to the audit chain (as a ``network`` record, result ``refused``) and
    raised, naming the rule and its file:line."""
    from mvm.security import admission, audit

    policies = [p for p in record.policies if isinstance(p, str)]  # (the record is a file: checked)
    policy = admission.load(home.root, policies)
    after = [e for e in record.allow if e not in deny] + [e for e in allow if e not in record.allow]
    try:
        admission.check_network(policy, "allow-list", after, changed=True)
    except admission.PolicyRefused as err:
        audit.record(home, operation="network", sealed=record.sealed, **audit.vm_fields(record), result="refused",
                     paths=list(policy.files), detail={**detail, "rule": err.rule, "where": err.where,
                                                       "why": err.why[:300]})
        raise
