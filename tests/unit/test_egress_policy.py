"""The host's check of every egress connection (security/egress_policy.py): the entry forms,
special ranges refused unless named exactly, names resolved only when listed, and what the
guest's listeners are told (runtime/supervisor/egress.py's guest_plan)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.runtime.supervisor.egress import guest_plan
from mvm.security.egress_policy import EgressPolicy, EntryError, parse_entry, special_range

SPECIAL = ["127.0.0.1", "127.5.6.7", "::1", "10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1",
           "100.64.0.1", "169.254.1.1", "169.254.169.254", "fd00:ec2::254", "fd12::1", "fe80::1", "0.0.0.0", "::",
           "224.0.0.1", "ff02::1", "240.0.0.1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1",
           "2002:7f00:1::1", "192.0.2.1", "2001:db8::1"]
GLOBAL = ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "8.8.8.8"]


def never(name: str, port: int) -> list[str]:
    raise AssertionError(f"resolved {name}: the host must not look up names the list does not name")


def resolver(table: dict[str, list[str]]):
    def resolve(name: str, port: int) -> list[str]:
        if name not in table:
            raise OSError(-2, "Name or service not known")
        return table[name]
    return resolve


@pytest.mark.parametrize("text", ["api.example.com:443", "*.example.com:443", "10.20.0.0/16:5432", "127.0.0.1:5432",
                                  "localhost:8000", "[::1]:8000", "fd00::/8:22", "1.2.3.4:80", "Api.Example.COM.:443"])
def test_entry_forms(text: str) -> None:
    assert parse_entry(text).text == text


@pytest.mark.parametrize("text", ["", "example.com", "example.com:0", "example.com:65536", "example.com:http",
                                  "10.0.0.1/8:80", "*.com:443", "*:443", "a b:80", "exa_mple..com:80", ":80",
                                  "1.2.3.4/33:80", "-bad.example:80", "1234:80"])
def test_bad_entries_are_refused_with_the_forms(text: str) -> None:
    with pytest.raises(EntryError, match="allow entry"):
        parse_entry(text)


@pytest.mark.parametrize("address", SPECIAL)
def test_special_addresses_are_refused_even_inside_a_broad_cidr(address: str) -> None:
    assert special_range(ipaddress.ip_address(address)) is not None
    policy = EgressPolicy.parse(["0.0.0.0/0:443", "::/0:443"])
    decision = policy.check(address, 443, never)
    assert not decision.allowed and "address, which no entry for port 443 names exactly" in decision.reason


@pytest.mark.parametrize("address", GLOBAL)
def test_global_addresses_in_a_listed_cidr_are_allowed(address: str) -> None:
    assert special_range(ipaddress.ip_address(address)) is None
    policy = EgressPolicy.parse(["0.0.0.0/0:443", "::/0:443"])
    assert policy.check(address, 443, never).address == str(ipaddress.ip_address(address))
    assert not policy.check(address, 444, never).allowed


def test_an_exact_entry_opens_that_special_address_on_that_port_only() -> None:
    policy = EgressPolicy.parse(["127.0.0.1:5432", "169.254.169.254:80", "localhost:8000"])
    assert policy.check("127.0.0.1", 5432, never).address == "127.0.0.1"
    assert policy.check("::ffff:127.0.0.1", 5432, never).address == "127.0.0.1"  # (mapped is the same address)
    assert not policy.check("127.0.0.2", 5432, never).allowed
    assert not policy.check("127.0.0.1", 5433, never).allowed
    assert policy.check("169.254.169.254", 80, never).allowed
    assert policy.check("localhost", 8000, never).address == "127.0.0.1"
    assert policy.check("::1", 8000, never).address == "::1"
    assert not policy.check("localhost", 8001, never).allowed


def test_a_cidr_inside_a_private_range_opens_it_but_not_the_metadata_address() -> None:
    policy = EgressPolicy.parse(["10.20.0.0/16:5432", "169.254.0.0/16:80"])
    assert policy.check("10.20.3.4", 5432, never).allowed
    assert not policy.check("10.21.3.4", 5432, never).allowed
    assert policy.check("169.254.1.1", 80, never).allowed
    assert not policy.check("169.254.169.254", 80, never).allowed


def test_names_resolve_only_when_listed_and_rebinding_to_a_special_address_is_refused() -> None:
    table = {"api.example.com": ["93.184.216.34"], "a.svc.example.net": ["1.1.1.1"],
             "evil.example.com": ["127.0.0.1"], "mixed.example.com": ["10.0.0.5", "8.8.8.8"]}
    policy = EgressPolicy.parse(["api.example.com:443", "*.example.net:443", "evil.example.com:443",
                                 "mixed.example.com:443", "127.0.0.1:5432"])
    resolve = resolver(table)
    assert policy.check("API.example.com.", 443, resolve).address == "93.184.216.34"
    assert policy.check("a.svc.example.net", 443, resolve).address == "1.1.1.1"
    assert not policy.check("example.net", 443, never).allowed  # (a wildcard is for names under it)
    assert not policy.check("api.example.com", 80, never).allowed
    assert not policy.check("unlisted.example.org", 443, never).allowed
    refused = policy.check("evil.example.com", 443, resolve)
    assert not refused.allowed and "evil.example.com resolves to 127.0.0.1 is a loopback address" in refused.reason
    assert policy.check("mixed.example.com", 443, resolve).address == "8.8.8.8"  # the private one is skipped
    gone = policy.check("api.example.com", 443, resolver({}))
    assert not gone.allowed and "does not resolve" in gone.reason


@given(st.text(max_size=300), st.integers(min_value=-5, max_value=70000))
def test_whatever_the_guest_asks_the_check_answers_without_resolving_unlisted_names(host: str, port: int) -> None:
    policy = EgressPolicy.parse(["api.example.com:443", "127.0.0.1:5432", "10.0.0.0/8:22"])
    asked: list[str] = []

    def resolve(name: str, p: int) -> list[str]:
        asked.append(name)
        return ["127.0.0.1", "10.1.1.1"]  # a rebinding answer: never allowed for a name on 443

    decision = policy.check(host, port, resolve)
    assert asked in ([], ["api.example.com"])
    if decision.allowed:
        assert (decision.address, port) in (("127.0.0.1", 5432),) or (port == 22 and decision.address.startswith("10."))
    else:
        assert decision.reason


@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535))
def test_a_special_address_is_allowed_only_by_an_entry_that_names_it(address, port: int) -> None:
    broad = EgressPolicy.parse([f"0.0.0.0/0:{port}", f"::/0:{port}"])
    exact = EgressPolicy.parse([f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"])
    special = special_range(address) is not None
    assert broad.check(str(address), port, never).allowed is not special
    assert exact.check(str(address), port, never).allowed


def test_the_guest_is_told_where_to_listen_and_which_names_to_map() -> None:
    policy = EgressPolicy.parse(["api.example.com:443", "api.example.com:80", "db.example.com:5432",
                                 "127.0.0.1:5432", "localhost:8000", "127.77.0.2:9000", "*.example.net:443",
                                 "10.0.0.0/8:22", "1.2.3.4:80"])
    plan = guest_plan(policy.entries)
    assert plan["hosts"] == [["127.77.0.3", "api.example.com"], ["127.77.0.4", "db.example.com"]]
    assert plan["listen"] == [["127.77.0.3", 443, "api.example.com"], ["127.77.0.3", 80, "api.example.com"],
                              ["127.77.0.4", 5432, "db.example.com"], ["127.0.0.1", 5432, "127.0.0.1"],
                              ["127.0.0.1", 8000, "localhost"], ["127.77.0.2", 9000, "127.77.0.2"]]


def test_the_guest_proxy_reads_connect_and_absolute_uri_requests() -> None:
    from mvm.guest.agent.egress import proxy_target

    host, port, to_host, to_guest = proxy_target(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\nhello")
    assert (host, port, to_host) == ("api.example.com", 443, b"hello") and to_guest.startswith(b"HTTP/1.1 200")
    host, port, to_host, to_guest = proxy_target(b"GET http://[::1]:8000/a?b HTTP/1.1\r\nHost: [::1]:8000\r\n"
                                                 b"Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\n\r\n")
    assert (host, port, to_guest) == ("::1", 8000, b"")
    assert to_host == b"GET /a?b HTTP/1.1\r\nHost: [::1]:8000\r\nConnection: close\r\n\r\n"
    assert proxy_target(b"GET http://example.com HTTP/1.0\r\n\r\n")[:2] == ("example.com", 80)
    for bad in (b"GET /relative HTTP/1.1\r\n\r\n", b"CONNECT example.com HTTP/1.1\r\n\r\n",
                b"CONNECT example.com:99999 HTTP/1.1\r\n\r\n", b"garbage\r\n\r\n", b"GET http://x/ HTTP/1.1\r\n"):
        with pytest.raises(ValueError):
            proxy_target(bad)
