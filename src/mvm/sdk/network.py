"""``sandbox.ports`` (host ports tunnelled to the guest) and ``sandbox.network`` (its mode and
allow-list, changed while it runs)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mvm.core.bootimage import PortForward, parse_host
from mvm.runtime import allow_list, lifecycle
from mvm.runtime.client import AgentError
from mvm.sdk import record

if TYPE_CHECKING:
    from mvm.sdk.sandbox import Sandbox


@dataclass(frozen=True)
class PortInfo:
    host_addr: str
    host_port: int
    guest_port: int


class Ports:
    """``sandbox.ports``: host TCP ports tunnelled to the guest's loopback (no guest NIC needed)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def forward(self, guest_port: int, host_port: int | None = None, *, host_addr: str = "127.0.0.1") -> str:
        """Listen on ``host_addr:host_port`` (loopback unless you name another address) and carry
        each connection to ``guest_port`` on the guest's loopback; returns the host address
        (``ADDR:PORT``). ``host_port=None``: a free port on ``host_addr``, picked now."""
        if self._sandbox._recording:
            raise record.needs_live(self._sandbox.name, "ports.forward()")
        if host_port is not None:
            spec = PortForward.parse(f"[{host_addr}]:{host_port}:{guest_port}")
            with self._sandbox._client() as client:
                lifecycle.add_forward(client, spec)
            return spec.host
        PortForward.parse(f"[{host_addr}]:1:{guest_port}")  # (the address and guest port, checked first)
        for attempt in range(5):  # another program may take the free port before the supervisor listens
            spec = PortForward.parse(f"[{host_addr}]:{_free_port(host_addr)}:{guest_port}")
            try:
                with self._sandbox._client() as client:
                    lifecycle.add_forward(client, spec)
                return spec.host
            except AgentError as err:
                if "another program listens there" not in str(err) or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def list(self) -> list[PortInfo]:
        self._sandbox._record(running=True)
        return [PortInfo(f.host_addr, f.host_port, f.guest_port)
                for f in lifecycle.list_forwards(self._sandbox._home, self._sandbox.name)]

    def remove(self, host_port: int, *, host_addr: str | None = None) -> None:
        """Stop forwarding ``host_port`` (on ``host_addr``, or whichever address it is on);
        connections it carries are closed."""
        _, port = parse_host(str(host_port))
        with self._sandbox._client() as client:
            lifecycle.remove_forward(client, port, host_addr)


@dataclass(frozen=True)
class NetworkInfo:
    mode: str  # "deny", "allow-list" or "open"
    allow: list[str]  # the allow-list's entries (empty unless mode is "allow-list")


class Network:
    """``sandbox.network``: its network mode, and the destinations of an ``allow-list`` sandbox,
    changed while it runs (as ``mvmctl network`` does). The host checks every connection the
    guest opens against the list: new connections use the changed list, open ones run on."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def info(self) -> NetworkInfo:
        mine = self._sandbox._record()
        return NetworkInfo(mine.network, list(mine.allow))

    def allow(self, *entries: str) -> list[str]:
        """Add destinations (``host:port``, ``*.domain:port``, ``CIDR:port``); returns the new list."""
        return self._change(entries, ())

    def deny(self, *entries: str) -> list[str]:
        """Remove destinations, written as listed; returns the new list."""
        return self._change((), entries)

    def _change(self, allow: tuple[str, ...], deny: tuple[str, ...]) -> list[str]:
        if self._sandbox._recording:
            allow_list.check_entries(allow)
            record.plan().add("network", self._sandbox.name, allow=list(allow) or None, deny=list(deny) or None)
            return []
        self._sandbox._record(running=True)
        return allow_list.change(self._sandbox._home, self._sandbox.name, allow, deny)


def _free_port(host_addr: str) -> int:
    """A TCP port nothing listens on at ``host_addr`` now (the kernel's pick)."""
    family = socket.AF_INET6 if ":" in host_addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host_addr, 0))
        return int(probe.getsockname()[1])
