"""Firecracker's REST API: the requests mvm sends (and the plan that orders them for a boot),
the client that sends them over the API socket, and the vsock handshake that reaches the
guest's agent.

Written against Firecracker's published Swagger document: tests/unit/test_firecracker_api.py
validates every request below against it. Stdlib only (the supervisor uses the client).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mvm.core.bootimage import BootImage
from mvm.core.errors import VmError
from mvm.runtime.backends.base import DIRECT_ROOT_ARGS, encoded_argv
from mvm.runtime.backends.firecracker import root_drive_path

if TYPE_CHECKING:
    import asyncio

    from mvm.core.state import VmPaths, VmRecord

AGENT_VSOCK_PORT = 1024  # the first unprivileged vsock port: the agent runs as uid 990
API_TIMEOUT_S = 10.0
GUEST_CID = 3  # 0-2 are reserved (hypervisor, local, host)
# qemu.BOOT_ARGS adapted: Firecracker's own recommendations (reboot=k: a guest reboot ends the
# Firecracker process; panic=1; pci=off without --enable-pci; i8042 probing cut short, the
# i8042 stays for SendCtrlAltDel), mvm's measured fast path, and no tsc_early_khz (KVM only).
BOOT_ARGS = (
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce "
    "quiet loglevel=3 tsc=reliable no_timer_check mitigations=off cryptomgr.notests 8250.nr_uarts=1 "
    "random.trust_cpu=on"
)


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One API call: built by a pure function, validated by tests, sent by FirecrackerApi."""

    method: str
    path: str
    body: dict[str, Any] | None = None

    def describe(self) -> str:
        return f"{self.method} {self.path}"


def machine_config_request(vcpus: int, mem_mib: int) -> Request:
    if not 1 <= vcpus <= 32:
        raise VmError(f"Firecracker runs 1 to 32 vCPUs, not {vcpus}")
    if mem_mib < 1:
        raise VmError(f"a VM needs memory, not {mem_mib} MiB")
    return Request("PUT", "/machine-config", {"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": False})


def boot_source_request(kernel: str | Path, initrd: str | Path | None, boot_args: str) -> Request:
    body: dict[str, Any] = {"kernel_image_path": str(kernel), "boot_args": boot_args}
    if initrd is not None:
        body["initrd_path"] = str(initrd)
    return Request("PUT", "/boot-source", body)


def _check_id(kind: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", value):
        raise VmError(f"invalid Firecracker {kind} {value!r}: letters, digits and _ only")
    return value


def drive_request(drive_id: str, path: str | Path, root: bool, read_only: bool) -> Request:
    _check_id("drive id", drive_id)
    return Request("PUT", f"/drives/{drive_id}", {"drive_id": drive_id, "path_on_host": str(path),
                                                   "is_root_device": root, "is_read_only": read_only})


def drive_update_request(drive_id: str, path: str | Path) -> Request:
    """PATCH a drive's backing file: after a snapshot load (the VM built, still paused), so a
    clone's root drive is its own file, whatever path the snapshot recorded."""
    _check_id("drive id", drive_id)
    return Request("PATCH", f"/drives/{drive_id}", {"drive_id": drive_id, "path_on_host": str(path)})


def network_interface_request(iface_id: str, tap: str, guest_mac: str | None = None) -> Request:
    """A virtio-net device backed by the host TAP ``tap``. Not part of a default boot (default deny)."""
    _check_id("interface id", iface_id)
    body: dict[str, Any] = {"iface_id": iface_id, "host_dev_name": tap}
    if guest_mac is not None:
        body["guest_mac"] = guest_mac
    return Request("PUT", f"/network-interfaces/{iface_id}", body)


def vsock_request(guest_cid: int, uds_path: str | Path) -> Request:
    if guest_cid < 3:
        raise VmError(f"vsock CIDs 0-2 are reserved, not {guest_cid}")
    return Request("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": str(uds_path)})


def entropy_request() -> Request:
    """virtio-rng: without it the guest's first /dev/random read stalls (see DESIGN.md)."""
    return Request("PUT", "/entropy", {})


def action_request(action: str) -> Request:
    return Request("PUT", "/actions", {"action_type": action})


def vm_state_request(state: str) -> Request:
    return Request("PATCH", "/vm", {"state": state})


def version_request() -> Request:
    return Request("GET", "/version")


def snapshot_create_request(snapshot_path: str | Path, mem_file_path: str | Path) -> Request:
    return Request("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": str(snapshot_path),
                                               "mem_file_path": str(mem_file_path)})


def snapshot_load_request(snapshot_path: str | Path, mem_file_path: str | Path, *, resume: bool = True,
                          vsock_uds_path: str | Path | None = None) -> Request:
    """Only on a fresh Firecracker process. The guest memory file is mapped privately."""
    body: dict[str, Any] = {"snapshot_path": str(snapshot_path),
                            "mem_backend": {"backend_type": "File", "backend_path": str(mem_file_path)},
                            "resume_vm": resume}
    if vsock_uds_path is not None:
        body["vsock_override"] = {"uds_path": str(vsock_uds_path)}
    return Request("PUT", "/snapshot/load", body)


# -- the API client -----------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class FirecrackerApi:
    """Firecracker's REST API on its unix socket: one method per request mvm sends."""

    def __init__(self, socket_path: str | Path, timeout: float = API_TIMEOUT_S) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def send(self, request: Request) -> bytes:
        """The response body of a 2xx; anything else raises VmError with Firecracker's fault_message."""
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            headers = {"Accept": "application/json"}
            payload = None
            if request.body is not None:
                payload = json.dumps(request.body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(request.method, request.path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as err:
            raise VmError(f"Firecracker's API at {self.socket_path} failed on {request.describe()}: "
                          f"{' '.join(str(err).split())[:200]}") from err
        finally:
            conn.close()
        if 200 <= response.status < 300:
            return data
        raise VmError(f"Firecracker refused {request.describe()} ({response.status}): {_fault(data)}")

    def machine_config(self, vcpus: int, mem_mib: int) -> None:
        self.send(machine_config_request(vcpus, mem_mib))

    def boot_source(self, kernel: str | Path, initrd: str | Path | None, boot_args: str) -> None:
        self.send(boot_source_request(kernel, initrd, boot_args))

    def drive(self, drive_id: str, path: str | Path, root: bool, read_only: bool) -> None:
        self.send(drive_request(drive_id, path, root, read_only))

    def network_interface(self, iface_id: str, tap: str, guest_mac: str | None = None) -> None:
        self.send(network_interface_request(iface_id, tap, guest_mac))

    def vsock(self, guest_cid: int, uds_path: str | Path) -> None:
        self.send(vsock_request(guest_cid, uds_path))

    def entropy(self) -> None:
        self.send(entropy_request())

    def start(self) -> None:
        self.send(action_request("InstanceStart"))

    def ctrl_alt_del(self) -> None:
        """x86 only: the guest sees Ctrl-Alt-Del on its i8042 and reboots, which (reboot=k) ends
        the Firecracker process. The graceful stop when the agent cannot be asked."""
        self.send(action_request("SendCtrlAltDel"))

    def pause(self) -> None:
        self.send(vm_state_request("Paused"))

    def resume(self) -> None:
        self.send(vm_state_request("Resumed"))

    def update_drive(self, drive_id: str, path: str | Path) -> None:
        self.send(drive_update_request(drive_id, path))

    def version(self) -> str:
        """Firecracker's build version (``GET /version``), as a snapshot's manifest records it."""
        data = self.send(version_request())
        try:
            version = json.loads(data)["firecracker_version"]
        except (ValueError, TypeError, KeyError):
            version = None
        if not isinstance(version, str) or not re.fullmatch(r"[0-9A-Za-z.+_-]{1,64}", version):
            raise VmError(f"Firecracker's GET /version answered no usable version: {data[:80]!r}")
        return version

    def snapshot_create(self, snapshot_path: str | Path, mem_file_path: str | Path) -> None:
        """A full snapshot of a paused VM. Disks are not in it: freeze or copy them yourself."""
        self.send(snapshot_create_request(snapshot_path, mem_file_path))

    def snapshot_load(self, snapshot_path: str | Path, mem_file_path: str | Path, *, resume: bool = True,
                      vsock_uds_path: str | Path | None = None) -> None:
        self.send(snapshot_load_request(snapshot_path, mem_file_path, resume=resume, vsock_uds_path=vsock_uds_path))


def _fault(data: bytes) -> str:
    try:
        message = json.loads(data).get("fault_message")
    except (ValueError, AttributeError):
        message = None
    text = str(message) if message else data.decode(errors="replace")
    return " ".join(text.split())[:300] or "no fault_message"  # one line, whatever Firecracker said


# -- the boot plan ------------------------------------------------------------------------


class ImageLike(Protocol):
    """What the backend needs from an image (a FirecrackerImage, or what image_of makes of a BootImage)."""

    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path | None: ...
    @property
    def rootfs(self) -> Path: ...
    @property
    def vcpus(self) -> int: ...
    @property
    def memory_mib(self) -> int: ...
    @property
    def data_disk_bytes(self) -> int | None: ...


@dataclass(frozen=True)
class FirecrackerImage:
    kernel: Path
    initrd: Path | None
    rootfs: Path
    vcpus: int = 1
    memory_mib: int = 256
    data_disk_bytes: int | None = None


def image_of(image: BootImage | ImageLike) -> ImageLike:
    """A FirecrackerImage from mvm's BootImage; anything else is taken to be ImageLike already."""
    if isinstance(image, BootImage):
        return FirecrackerImage(kernel=image.vmlinux, initrd=image.initrd, rootfs=image.rootfs, vcpus=image.vcpus,
                                memory_mib=image.memory_mib, data_disk_bytes=image.data_disk_bytes)
    return image




@dataclass(frozen=True)
class BootFiles:
    """Paths as Firecracker sees them: host paths, or paths inside the jailer's chroot. The
    root disk is relative to Firecracker's working directory (the VM's own directory, or the
    jail's root): a snapshot records it as given, and a clone's Firecracker, started in the
    clone's directory, then opens the clone's own disk at load (see firecracker_snapshot.py)."""

    kernel: str
    initrd: str | None  # None: our kernel, which mounts the root disk itself
    root_disk: str
    data_disk: str | None
    vsock: str


def boot_files(image: ImageLike, paths: VmPaths, *, jailed: bool = False) -> BootFiles:
    data = image.data_disk_bytes
    if jailed:  # spawn links/copies everything into the chroot under these names
        return BootFiles("/vmlinux", "/initrd.cpio" if image.initrd is not None else None, root_drive_path(jailed=True),
                         "/data.ext4" if data else None, "/agent.sock")
    return BootFiles(str(image.kernel), str(image.initrd) if image.initrd is not None else None,
                     root_drive_path(jailed=False),
                     str(paths.data_disk) if data else None, str(paths.agent_socket))


def plan_boot(artifact_like: BootImage | ImageLike, paths: VmPaths, record: VmRecord | None = None, *,
              jailed: bool = False) -> list[Request]:
    """Every request that configures the VM, in order; InstanceStart is sent after them.

    vcpus and memory come from the record (what `up` asked for), else from the artifact.
    No network interface: the default is deny, as under QEMU.
    """
    image = image_of(artifact_like)
    files = boot_files(image, paths, jailed=jailed)
    vcpus = (record.vcpus if record is not None else 0) or image.vcpus
    memory = (record.memory_mib if record is not None else 0) or image.memory_mib
    entrypoint = encoded_argv(record) if record is not None else None
    boot_args = BOOT_ARGS + (f" {DIRECT_ROOT_ARGS}" if files.initrd is None else "") \
        + (f" mvm.argv={entrypoint}" if entrypoint else "")
    if record is not None and record.network == "allow-list":  # egress through the agent (guest/init)
        boot_args += " mvm.egress=1"
    plan = [
        machine_config_request(vcpus, memory),
        boot_source_request(files.kernel, files.initrd, boot_args),
        drive_request("root", files.root_disk, root=True, read_only=False),
    ]
    if files.data_disk is not None:
        plan.append(drive_request("data", files.data_disk, root=False, read_only=False))
    plan += [entropy_request(), vsock_request(GUEST_CID, files.vsock)]
    return plan


# -- the agent channel --------------------------------------------------------------------


class VsockRefused(ConnectionError):
    """Firecracker closed the connection without ``OK``: nothing listens on that guest port yet
    (the agent is not up). Retry after a short sleep, as with a missing socket."""


def connect_line(port: int = AGENT_VSOCK_PORT) -> bytes:
    return f"CONNECT {port}\n".encode()


def parse_connect_reply(line: bytes, port: int = AGENT_VSOCK_PORT) -> int:
    """The host-side port from ``OK <port>\\n``; VsockRefused on EOF, ConnectionError on anything else."""
    if not line:
        raise VsockRefused(f"Firecracker closed the vsock connection: nothing listens on guest port {port} yet")
    text = line.decode(errors="replace").strip()
    match = re.fullmatch(r"OK (\d+)", text)
    if not line.endswith(b"\n") or not match:
        raise ConnectionError(f"unexpected vsock handshake reply for guest port {port}: {text[:80]!r}")
    return int(match[1])


def connect_agent_handshake(sock: socket.socket, port: int = AGENT_VSOCK_PORT) -> int:
    """On a stream already connected to the VM's vsock unix socket: ask for ``port``, return the
    host-side port. Reads byte by byte so no agent byte after the line is consumed."""
    sock.sendall(connect_line(port))
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < 64:
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return parse_connect_reply(bytes(line), port)


async def vsock_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          port: int = AGENT_VSOCK_PORT) -> None:
    """The same for asyncio streams (the supervisor's agent connection)."""
    writer.write(connect_line(port))
    await writer.drain()
    parse_connect_reply(await reader.readline(), port)
