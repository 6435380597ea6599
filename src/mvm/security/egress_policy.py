"""The allow-list of an ``allow-list`` VM: which destinations a guest may ask the host to
connect to, decided on the host, from nothing the guest says but ``NAME:PORT``.

Entries are ``host:port`` (a name, ``localhost``, or one address; IPv6 in brackets),
``*.domain:port`` (any name under domain, not domain itself) and ``CIDR:port``. A request
for a name is resolved here only when an exact or wildcard entry names it (the guest cannot
make the host look up anything else), and the connection goes to the address checked, never
to the name again (no second lookup to rebind). Addresses in special ranges (loopback,
link-local, private, CGNAT, ULA, metadata, reserved) are refused unless an entry for that
port names that address: an exact address entry (``localhost`` names 127.0.0.1 and ::1), or
a CIDR entry that lies inside the same special range (``10.20.0.0/16:5432``, not
``0.0.0.0/0:443``); metadata addresses only by an exact entry.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
# (label, range): the first that holds an address names it. Anything else Python does not
# call global (or multicast) is "reserved".
SPECIAL_RANGES: tuple[tuple[str, Network], ...] = tuple(
    (label, ipaddress.ip_network(net)) for label, net in (
        ("loopback", "127.0.0.0/8"), ("loopback", "::1/128"),
        ("link-local", "169.254.0.0/16"), ("link-local", "fe80::/10"),
        ("private", "10.0.0.0/8"), ("private", "172.16.0.0/12"), ("private", "192.168.0.0/16"),
        ("CGNAT", "100.64.0.0/10"), ("ULA", "fc00::/7"),
        ("unspecified", "0.0.0.0/8"), ("unspecified", "::/128"),
        ("multicast", "224.0.0.0/4"), ("multicast", "ff00::/8"),
        ("reserved", "240.0.0.0/4"),
    ))
_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


class EntryError(ValueError):
    """An allow entry that is not one of the three forms (its message names it and the fix)."""


@dataclass(frozen=True)
class AllowEntry:
    """One entry as written, and what it means."""

    text: str
    port: int
    name: str | None = None  # exact name, lower case ("localhost" too)
    suffix: str | None = None  # "*.example.com" -> ".example.com"
    address: Address | None = None  # one address
    network: Network | None = None  # a CIDR

    @property
    def loopback(self) -> bool:
        """Means the host's loopback: the guest sees the same address:port on its own."""
        return self.name == "localhost" or (self.address is not None and self.address.is_loopback)


@dataclass(frozen=True)
class Decision:
    """Allowed: connect to ``address``. Refused: ``reason`` says why (for the log and the guest)."""

    address: str | None
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.address is not None


def parse_entry(text: str) -> AllowEntry:
    fix = "write host:port, *.domain:port or CIDR:port, e.g. api.example.com:443 or 10.20.0.0/16:5432"
    if not isinstance(text, str) or not text or any(c.isspace() for c in text) or len(text) > 300:
        raise EntryError(f"allow entry {str(text)[:80]!r} is not host:port ({fix})")
    host, sep, port_text = text.rpartition(":")
    port = int(port_text) if port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 else 0
    if not sep or not host or not 1 <= port <= 65535:
        raise EntryError(f"allow entry {text!r} needs a port from 1 to 65535 after the last ':' ({fix})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "/" in host:
        try:
            return AllowEntry(text, port, network=ipaddress.ip_network(host, strict=True))
        except ValueError as err:
            raise EntryError(f"allow entry {text!r}: {err} ({fix})") from None
    try:
        return AllowEntry(text, port, address=_plain(ipaddress.ip_address(host)))
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    if name.startswith("*.") and _NAME.fullmatch(name[2:]) and "." in name[2:]:
        return AllowEntry(text, port, suffix=name[1:])
    if _NAME.fullmatch(name) and not name.replace(".", "").isdigit():
        return AllowEntry(text, port, name=name)
    raise EntryError(f"allow entry {text!r}: {host!r} is not a host name, address or CIDR ({fix})")


def parse_entries(texts: Iterable[str]) -> tuple[AllowEntry, ...]:
    return tuple(parse_entry(t) for t in texts)


def special_range(address: Address) -> tuple[str, Network | None] | None:
    """(label, range) of a special address, or None for an ordinary global one."""
    address = _plain(address)
    if address in METADATA:
        return "metadata", ipaddress.ip_network(address)
    for label, network in SPECIAL_RANGES:
        if address.version == network.version and address in network:
            return label, network
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None and special_range(embedded) is not None:
            return "reserved", None  # (6to4 or NAT64 of a special IPv4 address)
    if not address.is_global or address.is_multicast:
        return "reserved", None
    return None


def _plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address is the IPv4 address it maps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in ipaddress.ip_network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


class EgressPolicy:
    """The entries of one VM, and the check every connection goes through."""

    def __init__(self, entries: Iterable[AllowEntry]) -> None:
        self.entries = tuple(entries)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> EgressPolicy:
        return cls(parse_entries(texts))

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.entries]

    def names(self, name: str, port: int) -> bool:
        """An exact or wildcard entry for ``name`` on ``port``: the host may resolve it."""
        return any(e.port == port and (e.name == name or (e.suffix is not None and name.endswith(e.suffix)))
                   for e in self.entries)

    def allows_address(self, address: Address, port: int, named: bool = False) -> Decision:
        """The check for one address: what the guest asked for, or (``named``) what a name an
        entry names resolved to, which is allowed unless special."""
        address = _plain(address)
        special = special_range(address)
        for e in self.entries:
            if e.port != port:
                continue
            exact = e.address == address or (e.name == "localhost" and address in LOCALHOST)
            if exact:
                return Decision(str(address))
            if e.network is not None and address.version == e.network.version and address in e.network:
                if special is None:
                    return Decision(str(address))
                label, special_net = special
                if label != "metadata" and special_net is not None and e.network.subnet_of(special_net):  # type: ignore[arg-type]
                    return Decision(str(address))
        if special is not None:
            return Decision(None, f"{address} is a {special[0]} address, which no entry for port {port} names exactly")
        if named:
            return Decision(str(address))
        return Decision(None, f"{address}:{port} is not on the allow-list")

    def check(self, host: str, port: int, resolve: Callable[[str, int], list[str]]) -> Decision:
        """Whether a guest's ``host:port`` may be connected to, and the address to connect to.
        ``resolve`` (the host's resolver) is called only for a name an entry names."""
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            return Decision(None, "the port is not a number from 1 to 65535")
        if not isinstance(host, str) or not host or len(host) > 255:
            return Decision(None, "the destination is not a host name or address")
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            return self.allows_address(ipaddress.ip_address(literal), port)
        except ValueError:
            pass
        name = host.lower().rstrip(".")
        if not _NAME.fullmatch(name):
            return Decision(None, f"{host[:80]!r} is not a host name or address")
        if not self.names(name, port):
            return Decision(None, f"{name}:{port} is not on the allow-list")
        if name == "localhost":
            addresses = [str(a) for a in LOCALHOST]
        else:
            try:
                addresses = resolve(name, port)
            except OSError as err:
                return Decision(None, f"{name} does not resolve on the host ({err.strerror or err})")
        refusals = []
        for text in addresses:
            try:
                decision = self.allows_address(ipaddress.ip_address(text.split("%")[0]), port, named=True)
            except ValueError:
                continue
            if decision.allowed:
                return decision
            refusals.append(decision.reason)
        if not refusals:
            return Decision(None, f"{name} has no address on the host")
        return Decision(None, f"{name} resolves to {refusals[0]}")
