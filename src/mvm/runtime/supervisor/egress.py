"""Egress of an ``allow-list`` VM: the host's end. The guest has no network device; its agent
listens on the guest's loopback and asks here (``dial {conn, host, port}``) for each
connection. Every one is checked against the VM's list (security/egress_policy.py: names are
resolved here, special ranges refused unless named), connected from here to the address
checked, and relayed as a port forward is (forwards.relay). Refusals go to supervisor.log and
the audit log with the destination. `mvmctl network NAME --allow/--deny` changes the list
(``egress_update``); new connections use the new list, open ones run on.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import TYPE_CHECKING, Any

from mvm.core import protocol
from mvm.runtime.log_budget import LogBudget
from mvm.runtime.supervisor.forwards import relay
from mvm.security.egress_policy import AllowEntry, EgressPolicy, EntryError, parse_entry

if TYPE_CHECKING:
    from mvm.runtime.supervisor.clients import Client
    from mvm.runtime.supervisor.supervisor import Supervisor

NAME_BASE = (127, 77, 0)  # the guest's own addresses for listed names: 127.77.0.2, .3, ...
MAX_DIALING = 64  # guest requests being checked or connected at once; more are refused
MAX_OPEN = 512  # egress connections open at once
CONNECT_TIMEOUT_S = 10.0
RESOLVE_TIMEOUT_S = 10.0
APPLY_TIMEOUT_S = 10.0  # for the guest's agent to listen where a changed list says


def resolve(name: str, port: int) -> list[str]:
    """The host's resolver (the supervisor's own /etc/hosts and DNS)."""
    return [info[4][0] for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)]


def guest_plan(entries: tuple[AllowEntry, ...]) -> dict[str, Any]:
    """Where the guest's agent listens and which names /etc/hosts gives it: an exact name
    gets an address of its own on the guest's loopback, listened on for each port it is
    listed with; a loopback entry is listened on at the address it names. Wildcard, CIDR and
    other address entries are reached through the proxy only."""
    listen: list[list[Any]] = []
    names: dict[str, str] = {}
    taken = {str(e.address) for e in entries if e.loopback and e.address is not None}
    number = 2
    for e in entries:
        if e.name == "localhost":
            listen.append(["127.0.0.1", e.port, "localhost"])
        elif e.loopback and e.address is not None:
            listen.append([str(e.address), e.port, str(e.address)])
        elif e.name is not None:
            if e.name not in names:
                while (addr := "{}.{}.{}.{}".format(*NAME_BASE, number)) in taken:
                    number += 1
                names[e.name], number = addr, number + 1
            listen.append([names[e.name], e.port, e.name])
    unique = list({(a, p): [a, p, h] for a, p, h in listen}.values())
    return {"listen": unique, "hosts": [[addr, name] for name, addr in names.items()]}


class Egress:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.policy = EgressPolicy.parse(sup.record.allow) if self.on else EgressPolicy(())
        self.stream_id: int | None = None
        self.dialing = 0
        self.open = 0
        self.refusals_logged = LogBudget("egress refusals")
        self.waiting: list[asyncio.Future[None]] = []  # updates that answer once the guest has applied them
        self.settled = not self.on  # `up` is answered once the guest listens (or could not)

    @property
    def on(self) -> bool:
        return self.sup.record.network == "allow-list"

    def start(self) -> None:
        """The agent answers (at boot, or after it restarted): give it the listeners."""
        if not self.on:
            return
        agent = self.sup.agent
        if self.stream_id is not None:
            agent.streams.pop(self.stream_id, None)
        self.stream_id, agent.next_id = agent.next_id, agent.next_id + 1
        agent.streams[self.stream_id] = self.on_frame
        self.push()
        if not self.settled:  # an agent that never answers its setup must not hold `up` for ever
            asyncio.get_running_loop().call_later(APPLY_TIMEOUT_S, self.settle)

    def settle(self) -> None:
        if not self.settled:
            self.settled = True
            self.sup.on_ready_for_clients()

    def push(self) -> None:
        if self.stream_id is not None:
            self.sup.agent.send(protocol.encode({"type": "egress", "id": self.stream_id,
                                                 **guest_plan(self.policy.entries)}))

    def on_frame(self, frame: protocol.Frame) -> None:
        """What the agent says on the egress id: hostile input like all it says."""
        header = frame.header
        if frame.type == "dial":
            conn, host, port = header.get("conn"), header.get("host"), header.get("port")
            if not isinstance(conn, int) or isinstance(conn, bool) or not isinstance(host, str):
                return
            asyncio.get_running_loop().create_task(self.dial(conn, host[:300], port))
        elif frame.type in ("egress-ready", "error"):
            self.settle()
            waiting, self.waiting = self.waiting, []
            for future in waiting:
                if not future.done():
                    future.set_result(None)
            if frame.type == "error":
                print(f"mvm-supervisor: egress: the agent refused its setup: {str(header.get('message'))[:300]}",
                      file=sys.stderr, flush=True)
            elif header.get("failed"):
                print(f"mvm-supervisor: egress: the guest could not listen on: {str(header.get('failed'))[:500]}",
                      file=sys.stderr, flush=True)

    async def dial(self, conn: int, host: str, port: Any) -> None:
        agent = self.sup.agent
        if self.dialing >= MAX_DIALING or self.open >= MAX_OPEN:
            self.refuse(conn, host, port, "too many connections at once", log=False)
            return
        self.dialing += 1
        try:
            try:
                decision = await asyncio.wait_for(asyncio.to_thread(self.policy.check, host, port, resolve),
                                                  RESOLVE_TIMEOUT_S)
            except TimeoutError:
                self.refuse(conn, host, port, f"{host} did not resolve within {RESOLVE_TIMEOUT_S:.0f} s")
                return
            if not decision.allowed:
                self.refuse(conn, host, port, decision.reason)
                return
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(decision.address, port),
                                                        CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as err:
                why = getattr(err, "strerror", None) or "timed out"
                print(f"mvm-supervisor: egress to {host}:{port} ({decision.address}) failed: {why}",
                      file=sys.stderr, flush=True)
                self.refuse(conn, host, port, f"cannot connect to {host}:{port}: {why}", log=False)
                return
        finally:
            self.dialing -= 1
        self.open += 1
        try:
            await relay(agent, reader, writer, {"conn": conn})
        finally:
            self.open -= 1

    def refuse(self, conn: int, host: str, port: Any, reason: str, log: bool = True) -> None:
        self.sup.agent.send(protocol.encode({"type": "refuse", "conn": conn, "message": reason[:500]}))
        if log:
            self.log_refusal(f"{host}:{port}"[:300], reason)

    def log_refusal(self, destination: str, reason: str) -> None:
        """supervisor.log and the audit log, within a budget (log_budget.py): a guest that
        hammers refused destinations cannot fill the host's disk."""
        if not self.refusals_logged.allow():
            return
        print(f"mvm-supervisor: egress refused {destination}: {reason}", file=sys.stderr, flush=True)
        audit = self.sup.audit
        if not audit.off:
            entry = {"operation": "egress-refused", "actor": {"surface": "guest", "vm": self.sup.record.name},
                     **audit.vm_fields, "result": "refused", "detail": {"destination": destination, "reason": reason}}
            asyncio.get_running_loop().run_in_executor(None, audit.write, entry)

    async def update(self, client: Client, request_id: int | None, header: dict[str, Any]) -> None:
        """`mvmctl network NAME --allow ... --deny ...`: the new list, saved in the record."""
        record = self.sup.record
        if not self.on:
            client.send(protocol.error(request_id, f"VM {record.name} runs with network {record.network!r}, not "
                                                   "'allow-list': its list cannot be changed while it runs (set "
                                                   '[network] mode = "allow-list" in mvm.toml and start it again)'))
            return
        allow, deny = header.get("allow") or [], header.get("deny") or []
        if not isinstance(allow, list) or not isinstance(deny, list):
            client.send(protocol.error(request_id, "egress_update: 'allow' and 'deny' must be lists of entries"))
            return
        texts = list(record.allow)
        try:
            for text in allow:
                entry = parse_entry(text)
                if entry.text not in texts:
                    texts.append(entry.text)
            for text in deny:
                if text not in texts:
                    raise EntryError(f"{str(text)[:80]!r} is not on VM {record.name}'s list "
                                     f"(`mvmctl network {record.name}` lists it)")
                texts.remove(text)
        except EntryError as err:
            client.send(protocol.error(request_id, str(err)))
            return
        self.policy = EgressPolicy.parse(texts)
        record.allow = texts
        record.save(self.sup.paths)
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(applied)
        self.push()
        try:  # (so that a destination allowed is reachable once mvmctl returns)
            await asyncio.wait_for(applied, APPLY_TIMEOUT_S)
            applied_note = True
        except TimeoutError:
            applied_note = False
        client.send(protocol.encode({"type": "result", "id": request_id, "allow": texts, "applied": applied_note}))
