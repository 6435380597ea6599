"""Port forwards as the docs write them, on real guests (QEMU and Docker): `up -p`, mvm.toml's
[network] forward, `forward NAME -p ...` (and the positional form), `forward ls`, `forward rm`,
`run -p`, the SDK's `sandbox.ports`, and one-line errors. Traffic only ever goes to 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

# Two servers on the guest's loopback, each serving /etc (so /mvm/name is the VM's name).
SERVERS = """
    name = "fwd"
    [network]
    forward = ["127.0.0.1:{toml_port}:8000"]
    [entrypoint]
    command = ["/bin/sh", "-c", "cd /etc && (python3 -m http.server 8000 --bind 127.0.0.1 & python3 -m http.server 8001 --bind 127.0.0.1 & wait) >/dev/null 2>&1"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port: int, within: float = 60) -> str:
    """GET /mvm/name through a host port, retrying while the guest's server starts."""
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/mvm/name", timeout=10) as reply:
                return reply.read().decode().strip()
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("mvmctl: docker:")]  # (progress)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in errors[0], proc.stderr


@pytest.fixture(scope="module", params=["qemu", "docker"])
def ctl(request: pytest.FixtureRequest) -> Mvmctl:
    base = request.getfixturevalue("mvmctl" if request.param == "qemu" else "docker_mvmctl")
    return base.with_backend(request.param)


@pytest.fixture(scope="module")
def vm(ctl: Mvmctl, tmp_path_factory: pytest.TempPathFactory):
    """VM fwd, with one forward from mvm.toml and one from `up -p`: (name, toml port, -p port)."""
    directory = tmp_path_factory.mktemp("fwd")
    toml_port, up_port = free_port(), free_port()
    (directory / "mvm.toml").write_text(SERVERS.format(toml_port=toml_port))
    proc = ctl("up", str(directory), "-p", f"{up_port}:8001", check=True)
    assert f"127.0.0.1:{toml_port} -> guest port 8000" in proc.stdout
    assert f"127.0.0.1:{up_port} -> guest port 8001" in proc.stdout
    yield "fwd", toml_port, up_port
    ctl("down", "fwd", "--force")


def listed(ctl: Mvmctl, name: str) -> set[tuple[str, int, int]]:
    rows = json.loads(ctl("forward", "ls", name, "--json", check=True).stdout)
    return {(r["host_addr"], r["host_port"], r["guest_port"]) for r in rows}


def test_forwards_from_the_manifest_and_up_p_carry_traffic(ctl: Mvmctl, vm) -> None:
    name, toml_port, up_port = vm
    assert fetch(toml_port) == name and fetch(up_port) == name
    assert listed(ctl, name) == {("127.0.0.1", toml_port, 8000), ("127.0.0.1", up_port, 8001)}
    text = ctl("forward", "ls", name, check=True).stdout
    assert f"127.0.0.1:{toml_port} -> VM {name} port 8000" in text


def test_forward_p_repeatable_then_rm_by_port_and_by_address(ctl: Mvmctl, vm) -> None:
    name, toml_port, up_port = vm
    a, b, c = free_port(), free_port(), free_port()
    proc = ctl("forward", name, "-p", f"{a}:8000", "-p", f"127.0.0.1:{b}:8001", check=True)
    assert f"127.0.0.1:{a} -> VM {name} port 8000" in proc.stdout
    ctl("forward", name, f"{c}:8000", check=True)  # the positional form still works
    assert fetch(a) == name and fetch(b) == name and fetch(c) == name
    assert {(a, 8000), (b, 8001), (c, 8000)} <= {(p, g) for _, p, g in listed(ctl, name)}

    assert ctl("forward", "rm", name, str(a), check=True).returncode == 0
    assert refused(a)
    ctl("forward", "rm", name, f"127.0.0.1:{b}", check=True)
    ctl("forward", "rm", name, str(c), check=True)
    assert refused(b) and refused(c)
    assert listed(ctl, name) == {("127.0.0.1", toml_port, 8000), ("127.0.0.1", up_port, 8001)}
    assert fetch(toml_port) == name  # the others are untouched


def test_removing_a_forward_closes_its_open_connections(ctl: Mvmctl, vm) -> None:
    name = vm[0]
    port = free_port()
    ctl("forward", name, "-p", f"{port}:8000", check=True)
    fetch(port)
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        ctl("forward", "rm", name, str(port), check=True)
        conn.settimeout(30)
        assert conn.recv(100) == b""  # closed by the host side, not left dangling
    finally:
        conn.close()


def test_forward_errors_are_one_line(ctl: Mvmctl, vm) -> None:
    name, toml_port, _ = vm
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line_error(ctl("forward", name, "-p", f"{port}:8000"), str(port), "another program listens there")
    one_line_error(ctl("forward", name, "-p", f"{toml_port}:8001"), "already forwarded")
    one_line_error(ctl("forward", name, "-p", "0:8000"), "port 0")
    one_line_error(ctl("forward", name, "-p", "8080:70000"), "70000", "65535")
    one_line_error(ctl("forward", name, "-p", "80:80:80:80"), "[ADDR:]HOST_PORT:GUEST_PORT")
    one_line_error(ctl("forward", name, "-p", "example.com:8080:80"), "not an IP address")
    one_line_error(ctl("forward", "rm", name, str(free_port())), "no forward from host")
    one_line_error(ctl("forward", "ls", "no-such-vm"), "no VM named no-such-vm")
    one_line_error(ctl("forward", name, "-p", "1:2", "--json"), "--json goes with")


def test_a_taken_port_at_up_fails_the_whole_up(ctl: Mvmctl, vm, workload_dir) -> None:
    directory = workload_dir('name = "fwd-taken"\n[entrypoint]\ncommand = ["/bin/sleep", "600"]\n', name="fwd-taken")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line_error(ctl("up", str(directory), "-p", f"{port}:80"), str(port))
    deadline = time.monotonic() + 60  # a failed up leaves nothing (its supervisor tidies up as it exits)
    while (ctl.home / "vms" / "fwd-taken").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (ctl.home / "vms" / "fwd-taken").exists()


def test_sdk_ports_forward_list_remove(ctl: Mvmctl, vm, monkeypatch: pytest.MonkeyPatch) -> None:
    import mvm
    from mvm.errors import UsageError, VmError

    name, toml_port, up_port = vm
    monkeypatch.setenv("MVM_HOME", str(ctl.home))
    if ctl.docker_host:
        monkeypatch.setenv("DOCKER_HOST", ctl.docker_host)
    sandbox = mvm.Sandbox.connect(name)
    port = free_port()
    assert sandbox.ports.forward(8000, port) == f"127.0.0.1:{port}"
    assert fetch(port) == name
    assert {(p.host_port, p.guest_port) for p in sandbox.ports.list()} == {(toml_port, 8000), (up_port, 8001),
                                                                         (port, 8000)}
    sandbox.ports.remove(port)
    assert refused(port)
    with pytest.raises(VmError, match="no forward from host"):
        sandbox.ports.remove(port)
    with pytest.raises(UsageError, match="port 0"):
        sandbox.ports.forward(8000, 0)


def test_run_attached_with_p(ctl: Mvmctl, workload_dir) -> None:
    """`run --attached -p`: the forward listens before the console is followed, and the VM ends
    with its command."""
    if ctl.hypervisor != "qemu":
        pytest.skip("one backend is enough for run's option parsing; forwards are tested on both above")
    directory = workload_dir('name = "fwd-run"\n[entrypoint]\ncommand = ["/bin/true"]\n', name="fwd-run")
    port = free_port()
    serve_once = ("import http.server as h, os; os.chdir('/etc'); "
                  "h.HTTPServer(('127.0.0.1', 8000), h.SimpleHTTPRequestHandler).handle_request()")
    proc = subprocess.Popen(ctl.argv("run", "--attached", str(directory), "-p", f"{port}:8000", "--",
                                     "python3", "-c", serve_once),
                            env=ctl.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert fetch(port, within=120) == "fwd-run"
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not Path(ctl.home / "vms" / "fwd-run" / "ctl.sock").exists()
