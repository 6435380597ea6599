"""A running ``allow-list`` VM's list: read it, change it (its supervisor holds the list and
checks every connection against it; see runtime/supervisor/egress.py)."""

from __future__ import annotations

import sys
import time

from mvm.core.errors import UsageError, VmError
from mvm.core.state import MvmHome
from mvm.runtime import lifecycle
from mvm.security.egress_policy import EntryError, parse_entry

UPDATE_WAIT_S = 30.0


def current(home: MvmHome, name: str) -> tuple[str, list[str]]:
    """(network mode, entries) from the VM's record."""
    _, record = lifecycle.require_vm(home, name)
    return record.network, list(record.allow)


def change(home: MvmHome, name: str, allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> list[str]:
    """Add ``allow`` and remove ``deny`` entries; returns the new list. New connections use
    it once this returns; connections already open run on."""
    for text in allow:
        try:
            parse_entry(text)
        except EntryError as err:
            raise UsageError(str(err).split(" (write ")[0], "write host:port, *.domain:port or CIDR:port") from None
    _, record = lifecycle.require_vm(home, name)
    if record.network != "allow-list":
        raise UsageError(f"VM {name} runs with network {record.network!r}, not 'allow-list': it has no list to change",
                         'set [network] mode = "allow-list" in its mvm.toml and start it again')
    started, error = time.monotonic(), None
    try:
        with lifecycle.connect(home, name) as client:
            reply = client.call("egress_update", allow=list(allow), deny=list(deny), wait_s=UPDATE_WAIT_S)
    except VmError as err:
        error = err
        raise
    finally:
        lifecycle.audit_action(home, "network", name=name, started=started, error=error,
                               detail={"allow": list(allow), "deny": list(deny)})
    if reply.get("applied") is False:
        sys.stderr.write(f"mvmctl: warning: VM {name}'s agent has not said it listens where the new list says "
                         "(paused, or busy); the host checks the new list either way\n")
    return [str(e) for e in reply.get("allow") or []]
