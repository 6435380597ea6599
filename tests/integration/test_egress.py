"""The allow-list network mode on real guests (QEMU and Docker): the guest has no network
device; its agent listens on the guest's loopback and the host checks, resolves and connects
each connection. Every server a test talks to is one it started on the host's 127.0.0.1.

The VM is started by `mvmctl up` inside `unshare -m` with a private /etc/hosts bind-mounted
over the host's, in which rebind.mvm.test is 127.0.0.1: the supervisor inherits that mount
namespace (so its resolver sees the name), and nothing outside it does.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Mvmctl
from tests.integration.test_network import LoopbackServer

pytestmark = pytest.mark.vm

NAME = "egress"
REBOUND = "rebind.mvm.test"
PROXY = "http://127.77.0.1:3128"
WORKLOAD = """
name = "{name}"
memory_mib = 128
[network]
mode = "allow-list"
allow = ["127.0.0.1:{allowed}", "{rebound}:{rebound_port}", "localhost:{http}"]
[entrypoint]
command = ["/bin/sh", "-c", "env > /tmp/entry-env; nc -w 10 127.0.0.1 {allowed} </dev/null >/tmp/first 2>&1; while :; do sleep 1; done"]
"""
PAGE = b"a page from the host\n"


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Servers:
    allowed: LoopbackServer  # listed exactly: 127.0.0.1:PORT
    rebound: LoopbackServer  # listed as rebind.mvm.test:PORT, a name that resolves to 127.0.0.1
    later: LoopbackServer  # not listed until `mvmctl network --allow`
    http: http.server.ThreadingHTTPServer  # listed as localhost:PORT

    @property
    def http_port(self) -> int:
        return self.http.server_address[1]


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    found = Servers(LoopbackServer(b"allowed\n"), LoopbackServer(b"rebound\n"), LoopbackServer(b"later\n"), page)
    yield found
    page.shutdown()
    for server in (found.allowed, found.rebound, found.later):
        server.sock.close()


@pytest.fixture(scope="module", params=["qemu", "docker"])
def ctl(request: pytest.FixtureRequest) -> Mvmctl:
    base = request.getfixturevalue("mvmctl" if request.param == "qemu" else "docker_mvmctl")
    return base.with_backend(request.param)


@pytest.fixture(scope="module")
def vm(ctl: Mvmctl, servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("egress")
    (directory / "mvm.toml").write_text(WORKLOAD.format(name=NAME, allowed=servers.allowed.port, rebound=REBOUND,
                                                        rebound_port=servers.rebound.port, http=servers.http_port))
    hosts = directory / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {REBOUND}\n")
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
            str(hosts), *ctl.argv("up", str(directory))]
    proc = subprocess.run(argv, env=ctl.env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "network allow-list (3 entries)" in proc.stdout
    assert REBOUND not in Path("/etc/hosts").read_text()  # the bind mount stayed in its namespace
    yield NAME
    ctl("down", NAME, "--force")


def guest(ctl: Mvmctl, script: str, *env_unset: str) -> subprocess.CompletedProcess:
    unset = [word for name in env_unset for word in ("-u", name)]
    return ctl("exec", NAME, "--", "env", *unset, "sh", "-c", script, timeout=120)


def supervisor_log(ctl: Mvmctl) -> str:
    return (ctl.home / "vms" / NAME / "supervisor.log").read_text()


def wait_for_log(ctl: Mvmctl, needle: str, within: float = 20) -> str:
    deadline = time.monotonic() + within
    while needle not in (text := supervisor_log(ctl)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in supervisor.log:\n{text[-2000:]}")
        time.sleep(0.2)
    return text


def test_the_entrypoint_starts_with_its_destinations_reachable_and_proxy_variables_set(ctl: Mvmctl, vm: str) -> None:
    # (the entrypoint may still be at it: its nc's answer is polled for, with a deadline)
    first = guest(ctl, "i=0; while [ ! -s /tmp/first ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; cat /tmp/first")
    assert first.stdout == "allowed\n", first.stderr
    entry_env = guest(ctl, "cat /tmp/entry-env").stdout.splitlines()
    exec_env = guest(ctl, "env").stdout.splitlines()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        assert f"{name}={PROXY}" in entry_env and f"{name}={PROXY}" in exec_env
    assert guest(ctl, "ls /sys/class/net").stdout.split() == ["lo"]  # no network device


def test_a_listed_loopback_destination_answers_and_an_unlisted_port_does_not(ctl: Mvmctl, vm: str,
                                                                            servers: Servers) -> None:
    got = guest(ctl, f"nc -w 10 127.0.0.1 {servers.allowed.port} </dev/null")
    assert got.returncode == 0 and got.stdout == "allowed\n", got.stderr
    before = servers.later.connections
    tried = guest(ctl, f"nc -w 5 127.0.0.1 {servers.later.port} </dev/null")
    assert "later" not in tried.stdout
    # Through the proxy the agent asks the host, which refuses and says so in its log.
    proxied = guest(ctl, f"""python3 -c '
import http.client
c = http.client.HTTPConnection("127.77.0.1", 3128, timeout=20)
c.set_tunnel("127.0.0.1", {servers.later.port})
try:
    c.connect()
except OSError as err:
    print("refused", err)
'""")
    assert "refused Tunnel connection failed: 403" in proxied.stdout, proxied.stdout + proxied.stderr
    wait_for_log(ctl, f"egress refused 127.0.0.1:{servers.later.port}: 127.0.0.1 is a loopback address")
    assert servers.later.connections == before


def test_an_http_client_works_through_the_proxy_variables(ctl: Mvmctl, vm: str, servers: Servers) -> None:
    # localhost is in no_proxy (the guest's own loopback); without it urllib takes HTTP_PROXY:
    # a plain-HTTP request with an absolute URI, and CONNECT for a raw stream.
    script = f"""python3 -c '
import socket, urllib.request
print(urllib.request.urlopen("http://localhost:{servers.http_port}/page", timeout=20).read().decode(), end="")
s = socket.create_connection(("127.77.0.1", 3128), timeout=20)
s.sendall(b"CONNECT 127.0.0.1:{servers.allowed.port} HTTP/1.1\\r\\n\\r\\n")
got = b""
while chunk := s.recv(4096):
    got += chunk
head, _, rest = got.partition(b"\\r\\n\\r\\n")
print(head.split(b" ")[1].decode(), rest.decode(), end="")
'"""
    got = guest(ctl, script, "NO_PROXY", "no_proxy")
    # (the whole CONNECT answer is read to its end: the banner may come in the same read as the 200)
    assert got.returncode == 0 and got.stdout == PAGE.decode() + "200 allowed\n", got.stderr
    direct = guest(ctl, f"""python3 -c '
import urllib.request
print(urllib.request.urlopen("http://localhost:{servers.http_port}/page", timeout=20).read().decode(), end="")
'""")
    assert direct.stdout == PAGE.decode(), direct.stderr  # the transparent listener, no proxy


def test_a_listed_name_that_resolves_to_loopback_is_refused(ctl: Mvmctl, vm: str, servers: Servers) -> None:
    hosts = guest(ctl, "cat /etc/hosts").stdout
    assert f"127.77.0.2 {REBOUND}" in hosts  # the guest's own address for the name
    forged = guest(ctl, "echo '127.0.0.1 api.example.com' >>/etc/hosts")  # the agent's file, not the workload's
    assert forged.returncode != 0 and "api.example.com" not in guest(ctl, "cat /etc/hosts").stdout
    before = servers.rebound.connections
    tried = guest(ctl, f"nc -w 5 {REBOUND} {servers.rebound.port} </dev/null")
    assert "rebound" not in tried.stdout
    wait_for_log(ctl, f"egress refused {REBOUND}:{servers.rebound.port}: {REBOUND} resolves to 127.0.0.1 is a "
                      f"loopback address, which no entry for port {servers.rebound.port} names exactly")
    assert servers.rebound.connections == before
    records = json.loads(ctl("audit", "ls", "--vm", NAME, "--json", check=True).stdout)
    refused = [r for r in records if r.get("operation") == "egress-refused"]
    assert f"{REBOUND}:{servers.rebound.port}" in [r["detail"]["destination"] for r in refused]


def test_the_list_of_a_running_vm_changes_with_mvmctl_network(ctl: Mvmctl, vm: str, servers: Servers) -> None:
    entry = f"127.0.0.1:{servers.later.port}"
    before = servers.later.connections
    added = ctl("network", NAME, "--allow", entry, check=True)
    assert f"allow {entry}" in added.stdout
    got = guest(ctl, f"nc -w 10 127.0.0.1 {servers.later.port} </dev/null")
    assert got.stdout == "later\n", got.stderr
    assert servers.later.connections == before + 1
    listed = json.loads(ctl("network", NAME, "--json", check=True).stdout)
    assert listed["network"] == "allow-list" and entry in listed["allow"]
    assert entry in ctl("status", NAME, check=True).stdout
    assert entry in json.loads(ctl("status", NAME, "--json", check=True).stdout)["allow"]

    ctl("network", NAME, "--deny", entry, check=True)
    tried = guest(ctl, f"nc -w 5 127.0.0.1 {servers.later.port} </dev/null")
    assert "later" not in tried.stdout
    assert servers.later.connections == before + 1
    assert entry not in json.loads(ctl("network", NAME, "--json", check=True).stdout)["allow"]

    bad = ctl("network", NAME, "--allow", "10.0.0.1/8:80")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "10.0.0.1/8:80" in bad.stderr, bad.stderr
    missing = ctl("network", NAME, "--deny", "127.0.0.1:1")
    assert missing.returncode != 0 and "is not on VM egress's list" in missing.stderr, missing.stderr


def test_a_guest_program_that_reads_slowly_gets_the_whole_download(ctl: Mvmctl, vm: str) -> None:
    """The host's bytes wait for the guest's acks (a window): a reader that sleeps before it
    reads gets all 40 MiB, where the agent would otherwise cut it at its 16 MiB buffer."""
    size = 40 << 20
    source = socket.socket()
    source.bind(("127.0.0.1", 0))
    source.listen(1)
    port = source.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = source.accept()
        except OSError:
            return
        with conn:
            try:
                conn.sendall(bytes(size))
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    entry = f"127.0.0.1:{port}"
    ctl("network", NAME, "--allow", entry, check=True)
    try:
        got = guest(ctl, f"nc -w 30 127.0.0.1 {port} </dev/null | (sleep 4; wc -c)")
        assert got.stdout.strip() == str(size), got.stderr
    finally:
        ctl("network", NAME, "--deny", entry)
        source.close()


def test_up_takes_the_mode_and_list_on_its_command_line(ctl: Mvmctl, servers: Servers, tmp_path: Path) -> None:
    directory = tmp_path / "egresscli"
    directory.mkdir()
    (directory / "mvm.toml").write_text('name = "egresscli"\nmemory_mib = 128\n[entrypoint]\n'
                                        'command = ["/bin/sh", "-c", "while :; do sleep 1; done"]\n')
    bad = ctl("up", str(directory), "--network", "allow-list", "--allow", "10.0.0.1/8:80")
    assert bad.returncode == 2 and "allow entry '10.0.0.1/8:80'" in bad.stderr, bad.stderr
    assert len([line for line in bad.stderr.splitlines() if not line.startswith("mvmctl: docker:")]) == 1
    assert "egresscli" not in ctl("ls", check=True).stdout  # nothing registered, nothing running
    lonely = ctl("up", str(directory), "--allow", "127.0.0.1:80")
    assert lonely.returncode == 2 and "add --network allow-list" in lonely.stderr
    policy = tmp_path / "policy.toml"  # admission sees the command line's list, not only mvm.toml's
    policy.write_text('[network]\nallow_patterns = ["127.0.0.1:*"]\n')
    held = ctl("up", str(directory), "--network", "allow-list", "--allow", "192.0.2.1:80", "--policy", str(policy))
    assert held.returncode != 0 and "192.0.2.1:80" in held.stderr, held.stderr
    assert "egresscli" not in ctl("ls", check=True).stdout
    ctl("up", str(directory), "--network", "allow-list", "--allow", f"127.0.0.1:{servers.allowed.port}",
        "--policy", str(policy), check=True)
    try:
        got = ctl("exec", "egresscli", "--", "sh", "-c", f"nc -w 10 127.0.0.1 {servers.allowed.port} </dev/null")
        assert got.stdout == "allowed\n", got.stderr
        assert json.loads(ctl("network", "egresscli", "--json", check=True).stdout)["allow"] == [
            f"127.0.0.1:{servers.allowed.port}"]
    finally:
        ctl("down", "egresscli", "--force")


def test_the_agent_listens_on_a_low_port_an_entry_names(ctl: Mvmctl, vm: str) -> None:
    """(Nothing connects to it: no server of the test's listens on the host's port 81.)"""
    ctl("network", NAME, "--allow", "127.0.0.1:81", check=True)
    try:
        table = guest(ctl, "cat /proc/net/tcp").stdout
        assert any(line.split()[1:2] == ["0100007F:0051"] and line.split()[3] == "0A" for line in table.splitlines()[1:])
        assert "could not listen" not in supervisor_log(ctl)
    finally:
        ctl("network", NAME, "--deny", "127.0.0.1:81", check=True)
    assert "0100007F:0051" not in guest(ctl, "cat /proc/net/tcp").stdout  # the listener went with the entry
