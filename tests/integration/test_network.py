"""Network modes on real guests: "deny" gives the guest no way out, "open" gives it ordinary
outbound networking (allow-list: test_egress.py). The only server any test talks to is one it starts on 127.0.0.1 (QEMU's
user-mode network reaches it as 10.0.2.2)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

WORKLOAD = """
    name = "{name}"
    memory_mib = 128
    [network]
    mode = "{mode}"
    [entrypoint]
    command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
"""
BANNER = b"hello-from-the-host\n"


class LoopbackServer:
    """Answers every connection with ``banner``; counts them."""

    def __init__(self, banner: bytes = BANNER) -> None:
        self.banner = banner
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(self.banner)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    yield srv
    srv.sock.close()


def test_open_mode_reaches_a_server_on_the_hosts_loopback(mvmctl: Mvmctl, workload_dir, server) -> None:
    directory = workload_dir(WORKLOAD.format(name="netopen", mode="open"), name="netopen")
    up = mvmctl("up", str(directory), "--hypervisor", "qemu", check=True)
    try:
        assert "network OPEN" in up.stdout
        status = mvmctl("status", "netopen", check=True).stdout
        assert "network     open" in status
        assert "processes: all" in status and "run as root or the image's uids" in status  # (the agent's list)
        got = mvmctl("exec", "netopen", "--", "sh", "-c", f"nc -w 10 10.0.2.2 {server.port} </dev/null")
        assert got.returncode == 0 and got.stdout.encode() == BANNER, got.stderr
        assert server.connections == 1
        routes = mvmctl("exec", "netopen", "--", "ip", "route", check=True).stdout
        assert "default via 10.0.2.2" in routes
    finally:
        mvmctl("down", "netopen", "--force")


def test_deny_mode_has_no_way_out(mvmctl: Mvmctl, workload_dir, server) -> None:
    directory = workload_dir(WORKLOAD.format(name="netdeny", mode="deny"), name="netdeny")
    up = mvmctl("up", str(directory), "--hypervisor", "qemu", check=True)
    try:
        assert "network OPEN" not in up.stdout
        assert mvmctl("exec", "netdeny", "--", "ls", "/sys/class/net", check=True).stdout.split() == ["lo"]
        tried = mvmctl("exec", "netdeny", "--", "sh", "-c", f"nc -w 3 10.0.2.2 {server.port} </dev/null")
        assert tried.returncode != 0 and BANNER.decode() not in tried.stdout
        assert server.connections == 0
    finally:
        mvmctl("down", "netdeny", "--force")


def test_open_mode_on_docker_is_the_default_bridge_network(docker_mvmctl: Mvmctl, workload_dir) -> None:
    """(Where that network leads is the daemon's business: this one was started with
    --bridge=none, so the test checks what mvm asked docker for, and sends no traffic.)"""
    import json
    import subprocess

    directory = workload_dir(WORKLOAD.format(name="netdock", mode="open"), name="netdock")
    up = docker_mvmctl("up", str(directory), "--hypervisor", "docker", check=True)
    try:
        assert "network OPEN" in up.stdout
        ids = subprocess.run(["docker", "ps", "-q", "--filter", "label=mvm.vm=netdock"], env=docker_mvmctl.env,
                             capture_output=True, text=True, check=True).stdout.split()
        inspected = json.loads(subprocess.run(["docker", "inspect", *ids], env=docker_mvmctl.env,
                                              capture_output=True, text=True, check=True).stdout)
        assert [c["HostConfig"]["NetworkMode"] for c in inspected] == ["bridge"]
    finally:
        docker_mvmctl("down", "netdock", "--force")
