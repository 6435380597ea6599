"""The Firecracker backend against Firecracker's own published API description.

No firecracker binary and no usable KVM exist on the host these tests were written on, so
what can be checked is conformance: every request mvm would send (path, method, body) must
be an operation of the Swagger 2.0 document and its body must validate against that
operation's schema, with unknown fields refused (Firecracker's API rejects them). The
HTTP test runs the real FirecrackerApi against a unix-socket server that only checks requests
against the same document and answers 204 or 400 the way the document says; it says nothing
about what Firecracker does with a valid request.

The spec is read from ../shared/specs/firecracker/firecracker.yaml relative to the
repository (MVM_FIRECRACKER_SPEC overrides); it is third-party data, not copied here.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import socket
import socketserver
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from mvm.build import kernel as kernel_modules
from mvm.core import protocol
from mvm.core.bootimage import BootImage
from mvm.core.errors import HostToolMissing, VmError
from mvm.core.state import VmPaths, VmRecord
from mvm.runtime.backends import firecracker as fc
from mvm.runtime.backends import firecracker_api as fc_api
from mvm.runtime.backends import firecracker_kernel as fc_kernel

REPO = Path(__file__).resolve().parents[2]
SPEC_PATH = Path(os.environ.get("MVM_FIRECRACKER_SPEC") or REPO.parent / "shared" / "specs" / "firecracker"
                 / "firecracker.yaml")


# -- the spec -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the Firecracker spec (pip install pyyaml)")
    if not SPEC_PATH.is_file():
        pytest.skip(f"Firecracker API spec {SPEC_PATH} not found; set MVM_FIRECRACKER_SPEC")
    document = yaml.safe_load(SPEC_PATH.read_text())
    assert document.get("swagger") == "2.0", "expected Firecracker's Swagger 2.0 document"
    return document


def _strict(schema: Any) -> Any:
    """Refuse properties the document does not name (Firecracker's API refuses unknown fields)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _operation(spec: dict[str, Any], request: fc_api.Request) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(path template, operation, path parameters) for a request, or an AssertionError."""
    for template, item in spec["paths"].items():
        pattern = "^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
        match = re.match(pattern, request.path)
        if match:
            operation = item.get(request.method.lower())
            assert operation is not None, f"{request.describe()}: the spec has no {request.method} on {template}"
            return template, operation, match.groupdict()
    raise AssertionError(f"{request.describe()}: no such path in the spec")


def spec_errors(spec: dict[str, Any], request: fc_api.Request) -> list[str]:
    """Why the document would refuse this request ([] when it conforms)."""
    import jsonschema

    try:
        template, operation, path_params = _operation(spec, request)
    except AssertionError as err:
        return [str(err)]
    errors = []
    params = operation.get("parameters", [])
    for param in params:
        if param["in"] == "path" and param.get("required") and not path_params.get(param["name"]):
            errors.append(f"missing path parameter {param['name']}")
    body_params = [p for p in params if p["in"] == "body"]
    if not body_params:
        if request.body is not None:
            errors.append(f"{template} takes no body")
        return errors
    body_param = body_params[0]
    if request.body is None:
        if body_param.get("required"):
            errors.append(f"{request.describe()} needs a body")
        return errors
    schema = _strict({"definitions": spec["definitions"], **body_param["schema"]})
    validator = jsonschema.Draft4Validator(schema)
    errors += [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in validator.iter_errors(request.body)]
    if not any(str(code).startswith("2") for code in operation["responses"]):
        errors.append(f"{request.describe()} has no success response in the spec")
    return errors


def assert_conforms(spec: dict[str, Any], request: fc_api.Request) -> None:
    errors = spec_errors(spec, request)
    assert not errors, f"{request.describe()} {json.dumps(request.body)}: " + "; ".join(errors)


# -- what mvm sends -----------------------------------------------------------------------


def vm(tmp_path: Path, name: str = "t1") -> VmPaths:
    paths = VmPaths(tmp_path / "vms" / name)
    paths.dir.mkdir(parents=True)
    return paths


def record(name: str, vcpus: int, memory_mib: int) -> VmRecord:
    return VmRecord(name=name, artifact_key="k" * 64, artifact_name="w", backend="firecracker", accel="kvm",
                    mode="detached", vcpus=vcpus, memory_mib=memory_mib, accessible=True, sealed=False,
                    uids={"agent": 990, "entrypoint": 1000})


def image(tmp_path: Path, *, data_disk: int | None = None, vcpus: int = 1, memory: int = 256) -> fc_api.FirecrackerImage:
    store = tmp_path / "store" / "key"
    return fc_api.FirecrackerImage(kernel=store / "vmlinux", initrd=store / "initrd.cpio", rootfs=store / "rootfs.ext4",
                               vcpus=vcpus, memory_mib=memory, data_disk_bytes=data_disk)


PLANS = [
    pytest.param(None, 1, 256, id="1-vcpu"),
    pytest.param(None, 2, 512, id="2-vcpus"),
    pytest.param(1 << 30, 1, 256, id="data-disk"),
    pytest.param(64 << 20, 2, 1024, id="data-disk-2-vcpus"),
]


@pytest.mark.parametrize(("data_disk", "vcpus", "memory"), PLANS)
def test_boot_plan_conforms_to_the_spec(spec, tmp_path: Path, data_disk, vcpus, memory) -> None:
    paths = vm(tmp_path)
    plan = fc_api.plan_boot(image(tmp_path, data_disk=data_disk), paths, record("t1", vcpus, memory))
    for request in plan:
        assert_conforms(spec, request)
    jailed = fc_api.plan_boot(image(tmp_path, data_disk=data_disk), paths, record("t1", vcpus, memory), jailed=True)
    for request in jailed:
        assert_conforms(spec, request)
    assert [r.path for r in jailed] == [r.path for r in plan]


@pytest.mark.parametrize(("data_disk", "vcpus", "memory"), PLANS)
def test_boot_plan_is_mvms_vm(tmp_path: Path, data_disk, vcpus, memory) -> None:
    paths = vm(tmp_path)
    img = image(tmp_path, data_disk=data_disk)
    plan = fc_api.plan_boot(img, paths, record("t1", vcpus, memory))
    by_path = {r.path: r.body for r in plan}
    assert plan[0].path == "/machine-config" and plan[1].path == "/boot-source"  # before any device
    assert by_path["/machine-config"] == {"vcpu_count": vcpus, "mem_size_mib": memory, "smt": False}
    boot = by_path["/boot-source"]
    assert boot["kernel_image_path"] == str(img.kernel) and boot["initrd_path"] == str(img.initrd)
    args = boot["boot_args"].split()
    for arg in ("console=ttyS0", "reboot=k", "panic=1", "8250.nr_uarts=1"):
        assert arg in args
    assert not any(a.startswith(("tsc_early_khz", "panic=-1", "nomodule")) for a in args)
    root = by_path["/drives/root"]
    # Relative to Firecracker's working directory, the VM's own (Launch.cwd): a snapshot records
    # it as given, so each clone's Firecracker opens its own copy (see firecracker_snapshot.py).
    assert root == {"drive_id": "root", "path_on_host": "root.ext4", "is_root_device": True, "is_read_only": False}
    assert fc.launch_argv(paths, "/usr/bin/firecracker", None).cwd == paths.dir
    assert paths.dir / root["path_on_host"] != img.rootfs  # the artifact's base image is never written
    if data_disk:
        assert by_path["/drives/data"]["path_on_host"] == str(paths.data_disk)
        assert [r.path for r in plan].index("/drives/root") < [r.path for r in plan].index("/drives/data")
    else:
        assert "/drives/data" not in by_path
    assert by_path["/vsock"] == {"guest_cid": 3, "uds_path": str(paths.agent_socket)}
    assert "/entropy" in by_path
    assert not any(r.path.startswith("/network-interfaces") for r in plan)  # default deny
    assert not any(r.path == "/actions" for r in plan)  # InstanceStart comes after the plan


def test_boot_plan_takes_a_boot_image(tmp_path: Path) -> None:
    """mvm's BootImage (what `up` reads from the store) works as well as a FirecrackerImage."""
    store = tmp_path / "store" / "key"
    boot_image = BootImage(path=store, key="k" * 64, name="w", vcpus=2, memory_mib=384, data_disk_bytes=1 << 20,
                           expected_boot_ms=2500, kernel_release="6.1.0-test", accessible=False, sealed=True,
                           entrypoint_kind="command", agent_uid=990, entrypoint_uid=1000, hypervisor="firecracker",
                           forwards=())
    plan = fc_api.plan_boot(boot_image, vm(tmp_path), None)
    assert plan[0].body == {"vcpu_count": 2, "mem_size_mib": 384, "smt": False}
    assert any(r.path == "/drives/data" for r in plan)
    by_path = {r.path: r.body for r in plan}
    assert by_path["/boot-source"]["kernel_image_path"] == str(store / "vmlinux")


def every_other_request(tmp_path: Path) -> list[fc_api.Request]:
    return [
        fc_api.action_request("InstanceStart"),
        fc_api.action_request("SendCtrlAltDel"),
        fc_api.vm_state_request("Paused"),
        fc_api.vm_state_request("Resumed"),
        fc_api.snapshot_create_request(tmp_path / "snap.state", tmp_path / "snap.mem"),
        fc_api.snapshot_load_request(tmp_path / "snap.state", tmp_path / "snap.mem"),
        fc_api.snapshot_load_request(tmp_path / "snap.state", tmp_path / "snap.mem", resume=False,
                                 vsock_uds_path=tmp_path / "clone.sock"),
        fc_api.network_interface_request("eth0", "mvmtap0"),
        fc_api.network_interface_request("eth0", "mvmtap0", guest_mac="06:00:ac:10:00:02"),
        fc_api.drive_request("data", tmp_path / "ro.ext4", root=False, read_only=True),
    ]


def test_every_other_request_conforms_to_the_spec(spec, tmp_path: Path) -> None:
    for request in every_other_request(tmp_path):
        assert_conforms(spec, request)


def test_the_checker_refuses_what_the_spec_refuses(spec) -> None:
    """The conformance check itself has teeth: each of these is wrong per the document."""
    wrong = [
        fc_api.Request("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}),
        fc_api.Request("PUT", "/machine-config", {"vcpus": 1, "mem_size_mib": 128}),
        fc_api.Request("PUT", "/vm", {"state": "Stopped"}),
        fc_api.Request("POST", "/actions", {"action_type": "InstanceStart"}),
        fc_api.Request("PUT", "/actions", {"action_type": "Reboot"}),
        fc_api.Request("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/x"}),
        fc_api.Request("PUT", "/drives/root", {"drive_id": "root", "path_on_host": "/x"}),
        fc_api.Request("PUT", "/snapshot/create", {"snapshot_path": "/s"}),
        fc_api.Request("PUT", "/no-such-thing", {}),
    ]
    for request in wrong:
        assert spec_errors(spec, request), f"{request.describe()} {request.body} should not conform"


def test_pure_builders_refuse_impossible_values() -> None:
    with pytest.raises(VmError):
        fc_api.machine_config_request(33, 256)
    with pytest.raises(VmError):
        fc_api.vsock_request(2, "/x")
    with pytest.raises(VmError):
        fc_api.drive_request("../etc", "/x", root=False, read_only=True)


# -- the HTTP framing, against a server that only checks the spec -------------------------


class SpecCheckingServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.seen: list[fc_api.Request] = []
        super().__init__(path, SpecCheckingHandler)


class SpecCheckingHandler(http.server.BaseHTTPRequestHandler):
    """Answers 204 to a request the spec allows and 400 + fault_message otherwise: the
    document's response codes, not Firecracker's behaviour."""

    protocol_version = "HTTP/1.1"
    server: SpecCheckingServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        problems = []
        body = None
        if raw:
            if self.headers.get("Content-Type") != "application/json":
                problems.append("body without Content-Type: application/json")
            try:
                body = json.loads(raw)
            except ValueError as err:
                problems.append(f"body is not JSON: {err}")
        request = fc_api.Request(self.command, self.path, body)
        self.server.seen.append(request)
        problems += spec_errors(self.server.spec, request)
        if problems:
            payload = json.dumps({"fault_message": "; ".join(problems)}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

    do_PUT = do_PATCH = do_GET = do_POST = _handle


@pytest.fixture
def spec_server(spec, tmp_path: Path):
    path = str(tmp_path / "fc.sock")
    server = SpecCheckingServer(path, spec)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path, server
    server.shutdown()
    server.server_close()


def test_api_client_sends_spec_conformant_http(spec_server, tmp_path: Path) -> None:
    path, server = spec_server
    api = fc_api.FirecrackerApi(path)
    paths = vm(tmp_path)
    plan = fc_api.plan_boot(image(tmp_path, data_disk=1 << 20), paths, record("t1", 2, 512))
    for request in plan:
        api.send(request)
    api.start()
    api.pause()
    api.resume()
    api.snapshot_create(tmp_path / "s.state", tmp_path / "s.mem")
    api.snapshot_load(tmp_path / "s.state", tmp_path / "s.mem")
    api.ctrl_alt_del()
    api.network_interface("eth0", "mvmtap0")
    api.machine_config(1, 128)
    api.boot_source(tmp_path / "vmlinux", None, "console=ttyS0")
    api.drive("root", tmp_path / "root.ext4", True, False)
    api.vsock(3, tmp_path / "v.sock")
    api.entropy()
    assert [r.describe() for r in server.seen[:len(plan)]] == [r.describe() for r in plan]
    assert server.seen[:len(plan)] == plan  # the bodies arrive as built


def test_api_client_reports_the_fault_message(spec_server) -> None:
    path, _ = spec_server
    api = fc_api.FirecrackerApi(path)
    with pytest.raises(VmError, match=r"refused PATCH /vm \(400\): .*Stopped"):
        api.send(fc_api.Request("PATCH", "/vm", {"state": "Stopped"}))


def test_api_client_on_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="failed on PUT /actions"):
        fc_api.FirecrackerApi(tmp_path / "nothing.sock").start()


# -- the vsock handshake (host side) ------------------------------------------------------


def _peer(sock: socket.socket, reply: bytes) -> threading.Thread:
    """The other end of a socketpair: reads one line, answers ``reply`` (b"" = hang up)."""
    def run() -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                break
            line += chunk
        assert line == b"CONNECT 1024\n"
        if reply:
            sock.sendall(reply)
        else:
            sock.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_handshake_reads_ok_and_leaves_the_rest() -> None:
    ours, theirs = socket.socketpair()
    peer = _peer(theirs, b"OK 1073741824\n" + protocol.hello("agent"))
    assert fc_api.connect_agent_handshake(ours) == 1073741824
    peer.join(5)
    frames, _ = protocol.Decoder().feed_all(ours.recv(65536))  # the agent's bytes were not eaten
    assert frames and frames[0].type == "hello"


def test_handshake_refused_and_garbage() -> None:
    ours, theirs = socket.socketpair()
    _peer(theirs, b"")
    with pytest.raises(fc_api.VsockRefused):
        fc_api.connect_agent_handshake(ours)
    ours, theirs = socket.socketpair()
    _peer(theirs, b"NOPE\n")
    with pytest.raises(ConnectionError, match="unexpected vsock handshake reply"):
        fc_api.connect_agent_handshake(ours)
    assert fc_api.AGENT_VSOCK_PORT == 1024


def test_async_handshake(tmp_path: Path) -> None:
    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert await reader.readline() == b"CONNECT 1024\n"
            writer.write(b"OK 77\n")
            await writer.drain()

        server = await asyncio.start_unix_server(serve, path=str(tmp_path / "v.sock"))
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "v.sock"))
        await fc_api.vsock_handshake(reader, writer)
        writer.close()
        server.close()

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.close()

        server = await asyncio.start_unix_server(hang_up, path=str(tmp_path / "w.sock"))
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "w.sock"))
        with pytest.raises(fc_api.VsockRefused):
            await fc_api.vsock_handshake(reader, writer)
        writer.close()
        server.close()

    asyncio.run(main())


# -- the guest side: the agent's accept loop ----------------------------------------------


def test_agent_serves_hosts_one_after_another_on_a_listener(tmp_path: Path) -> None:
    """``--vsock`` is an AF_VSOCK listener fed to serve_listener. AF_VSOCK cannot be exercised
    here (no vsock loopback transport, no /dev/vhost-vsock), so the same loop runs on a unix
    listener: each host gets a session until EOF, then the next one is accepted."""
    from mvm.guest.agent import serve

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "agent.sock"))
    listener.listen(1)
    threading.Thread(target=serve.serve_listener, args=(listener,), daemon=True).start()
    for _ in range(2):
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.settimeout(10)
        host.connect(str(tmp_path / "agent.sock"))
        host.sendall(protocol.hello("host"))
        decoder, frames = protocol.Decoder(), []
        while not frames:
            frames, _ = decoder.feed_all(host.recv(65536))
        assert frames[0].type == "hello" and frames[0].header["role"] == "agent"
        host.close()


# -- the kernel ---------------------------------------------------------------------------

DEBIAN_CLOUD_6_1 = {  # the options that matter, as measured in linux-image-6.1.0-56-cloud-amd64
    "CONFIG_KVM_GUEST": "y", "CONFIG_BLK_DEV_INITRD": "y", "CONFIG_SERIAL_8250_CONSOLE": "y",
    "CONFIG_VIRTIO_MMIO": "m", "CONFIG_VIRTIO_BLK": "m", "CONFIG_VSOCKETS": "m",
    "CONFIG_VIRTIO_VSOCKETS_COMMON": "m", "CONFIG_VIRTIO_VSOCKETS": "m", "CONFIG_ACPI": "y", "CONFIG_PCI": "y",
}
SHIPPED = list(kernel_modules.MODULES)  # what build/kernel.py puts in every image's initramfs
VSOCK_MODULES = ["vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"]
MVM_INITRAMFS = [m for m in SHIPPED if m not in VSOCK_MODULES]


def test_the_initramfs_mvm_ships_has_what_firecracker_needs() -> None:
    assert set(VSOCK_MODULES) <= set(SHIPPED)
    assert fc_kernel.check_kernel(DEBIAN_CLOUD_6_1, SHIPPED, (1, 12, 0)) == []
    problems = fc_kernel.check_kernel(DEBIAN_CLOUD_6_1, MVM_INITRAMFS, (1, 12, 0))  # without the vsock modules
    assert len(problems) == 3 and all("vsock" in p for p in problems)


def test_kernel_device_discovery() -> None:
    modules = MVM_INITRAMFS + VSOCK_MODULES
    old = fc_kernel.check_kernel(DEBIAN_CLOUD_6_1, modules, (1, 7, 0))
    assert len(old) == 1 and "predates ACPI" in old[0]
    no_acpi = {**DEBIAN_CLOUD_6_1, "CONFIG_ACPI": "n"}
    assert any("cannot find" in p for p in fc_kernel.check_kernel(no_acpi, modules))
    legacy = {**no_acpi, "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y"}
    assert fc_kernel.check_kernel(legacy, modules, (1, 7, 0)) == []
    built_in = {**DEBIAN_CLOUD_6_1, "CONFIG_VSOCKETS": "y", "CONFIG_VIRTIO_VSOCKETS_COMMON": "y",
                "CONFIG_VIRTIO_VSOCKETS": "y"}
    assert fc_kernel.check_kernel(built_in, MVM_INITRAMFS) == []
    assert any("CONFIG_KVM_GUEST=n" in p for p in fc_kernel.check_kernel({**built_in, "CONFIG_KVM_GUEST": "n"}, None))


def _cpio(tmp_path: Path, files: dict[str, str]) -> Path:
    tree = tmp_path / "tree"
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    out = tmp_path / "initrd.cpio"
    names = "\n".join(sorted(files)) + "\n"
    with out.open("wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=names.encode(), cwd=tree, stdout=f, check=True)
    return out


@pytest.mark.skipif(not __import__("shutil").which("cpio"), reason="cpio is not installed")
def test_initramfs_modules_and_refusal(tmp_path: Path) -> None:
    initrd = _cpio(tmp_path, {"init": "#!/bin/sh\n", "modules/virtio.ko": "x", "modules.order": "\n".join(MVM_INITRAMFS)})
    assert fc_kernel.initramfs_modules(initrd) == MVM_INITRAMFS
    img = fc_api.FirecrackerImage(kernel=tmp_path / "vmlinux", initrd=initrd, rootfs=tmp_path / "rootfs.ext4")
    with pytest.raises(VmError, match="vmw_vsock_virtio_transport"):
        fc.refuse_unsuitable_kernel(img)


@pytest.mark.skipif(not __import__("shutil").which("dpkg-deb"), reason="dpkg-deb is not installed")
def test_kernel_config_from_a_deb(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: linux-image-test\nVersion: 1\nArchitecture: amd64\n"
                                             "Maintainer: t <t@t>\nDescription: t\n")
    (root / "boot").mkdir()
    (root / "boot" / "config-6.1.0-test").write_text("CONFIG_ACPI=y\n# CONFIG_X86_MPPARSE is not set\n"
                                                     "CONFIG_VIRTIO_MMIO=m\nCONFIG_CMDLINE=\"a b\"\n")
    deb = tmp_path / "linux-image-test_1_amd64.deb"
    subprocess.run(["dpkg-deb", "-Zxz", "--build", str(root), str(deb)], check=True, capture_output=True)
    assert fc_kernel.kernel_config_from_deb(deb) == {"CONFIG_ACPI": "y", "CONFIG_VIRTIO_MMIO": "m", "CONFIG_CMDLINE": "a b"}


# -- availability and the process ---------------------------------------------------------


def test_available_says_it_was_never_exercised(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    ok, why = fc.available(True, home=tmp_path)
    assert not ok and "no firecracker binary on PATH" in why and why.endswith("not exercised on this host")
    ok, why = fc.available(None, home=tmp_path)
    assert not ok and why.endswith("not exercised on this host")
    marker = fc.exercised_marker(tmp_path)
    marker.parent.mkdir(parents=True)
    marker.write_text("{}\n")
    ok, why = fc.available(True, home=tmp_path)
    assert not ok and not why.endswith("not exercised on this host")


def test_spawn_without_a_binary(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HostToolMissing, match="firecracker"):
        fc.spawn(vm(tmp_path), image(tmp_path), record("t1", 1, 256))


def test_jailer_command_line(tmp_path: Path) -> None:
    paths = vm(tmp_path, "web.1")
    launch = fc.launch_argv(paths, "/usr/local/bin/firecracker", "/usr/local/bin/jailer")
    argv = launch.argv
    assert argv[0] == "/usr/local/bin/jailer"
    assert argv[argv.index("--id") + 1] == "mvm-web-1"
    assert argv[argv.index("--exec-file") + 1] == "/usr/local/bin/firecracker"
    assert {"--uid", "--gid", "--chroot-base-dir", "--"} <= set(argv)
    assert argv[argv.index("--") + 1:argv.index("--") + 3] == ["--api-sock", "/fc.sock"]
    assert launch.jail_root == paths.dir / "jail" / "firecracker" / "mvm-web-1" / "root"
    direct = fc.launch_argv(paths, "/usr/local/bin/firecracker", None)
    assert direct.argv[:3] == ["/usr/local/bin/firecracker", "--api-sock", str(paths.dir / "fc.sock")]
    assert direct.jail_root is None
    assert direct.cwd == paths.dir and launch.cwd is None  # the jailer chroots: paths start at its root


def test_module_stays_lean() -> None:
    """The per-VM supervisor imports this module: no pydantic behind it."""
    code = "import sys, mvm.runtime.backends.firecracker; print('pydantic' in sys.modules)"
    out = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"



def test_an_image_of_our_kernel_boots_without_an_initrd_from_the_root_drive(tmp_path: Path) -> None:
    """mvm's own kernel (every driver built in): no initrd_path, the kernel mounts /dev/vda itself."""
    from dataclasses import replace

    paths = vm(tmp_path)
    for jailed in (False, True):
        plan = fc_api.plan_boot(replace(image(tmp_path), initrd=None), paths, record("t1", 1, 256), jailed=jailed)
        boot = {r.path: r.body for r in plan}["/boot-source"]
        assert "initrd_path" not in boot
        assert {"root=/dev/vda", "init=/init", "rw"} <= set(boot["boot_args"].split())
    with_initrd = {r.path: r.body for r in fc_api.plan_boot(image(tmp_path), paths, record("t1", 1, 256))}
    assert "root=/dev/vda" not in with_initrd["/boot-source"]["boot_args"]
