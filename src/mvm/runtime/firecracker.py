"""Firecracker: the same artifact as QEMU, driven through Firecracker's REST API.

Written against Firecracker's published Swagger document (docs/firecracker.md says where it
lives and what was and was not exercised): this host has no firecracker binary and no usable
KVM, so every request below is checked against the spec by tests/unit/test_firecracker_api.py,
and nothing here has booted a guest yet.

Shape of a VM (everything in ``vms/<name>/``):

- ``fc.sock``   Firecracker's API socket (HTTP/1.1 over AF_UNIX; PUT/PATCH with JSON bodies)
- ``root.ext4`` the VM's writable root disk: Firecracker has no qcow2, so it is a sparse
  (and, where the filesystem can, reflinked) copy of the artifact's read-only rootfs.ext4
- ``data.ext4`` the optional data disk, as under QEMU
- ``agent.sock`` the vsock device's unix socket. The host connects to it and sends
  ``CONNECT 1024\\n``; Firecracker answers ``OK <host port>\\n`` once the guest agent (``python3 -m
  agent --vsock 1024``) accepted, or closes the connection when nothing listens yet.
- stdout of the Firecracker process is the guest's serial console (ttyS0), stdin its input.

Stdlib only at module level: the lean per-VM supervisor imports this module.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mvm.core.bootimage import BootImage
from mvm.core.errors import HostToolMissing, VmError
from mvm.runtime.process import spawn_tied

if TYPE_CHECKING:
    import asyncio

    from mvm.core.state import VmPaths, VmRecord

FIRECRACKER_BINARY = "firecracker"
JAILER_BINARY = "jailer"
AGENT_VSOCK_PORT = 1024  # the first unprivileged vsock port: the agent runs as uid 990
GUEST_CID = 3  # 0-2 are reserved (hypervisor, local, host)
API_SOCKET_FILE = "fc.sock"
ROOT_DISK_FILE = "root.ext4"
LOG_FILE = "firecracker.log"
JAIL_DIR = "jail"
API_TIMEOUT_S = 10.0
API_SOCKET_WAIT_S = 5.0
MIN_ACPI_VERSION = (1, 8, 0)  # Firecracker describes virtio-mmio devices through ACPI from 1.8.0
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
            raise VmError(f"Firecracker's API at {self.socket_path} failed on {request.describe()}: {err}") from err
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
    return str(message) if message else (data.decode(errors="replace").strip() or "no fault_message")


# -- the boot plan ------------------------------------------------------------------------


class ImageLike(Protocol):
    """What the backend needs from an image (a FirecrackerImage, or what image_of makes of a BootImage)."""

    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
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
    initrd: Path
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


def api_socket_path(paths: VmPaths) -> Path:
    return paths.dir / API_SOCKET_FILE


def root_disk_path(paths: VmPaths) -> Path:
    return paths.dir / ROOT_DISK_FILE


@dataclass(frozen=True)
class BootFiles:
    """Paths as Firecracker sees them: host paths, or paths inside the jailer's chroot."""

    kernel: str
    initrd: str
    root_disk: str
    data_disk: str | None
    vsock: str


def boot_files(image: ImageLike, paths: VmPaths, *, jailed: bool = False) -> BootFiles:
    data = image.data_disk_bytes
    if jailed:  # spawn links/copies everything into the chroot under these names
        return BootFiles("/vmlinux", "/initrd.cpio", f"/{ROOT_DISK_FILE}", "/data.ext4" if data else None,
                         "/agent.sock")
    return BootFiles(str(image.kernel), str(image.initrd), str(root_disk_path(paths)),
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
    plan = [
        machine_config_request(vcpus, memory),
        boot_source_request(files.kernel, files.initrd, BOOT_ARGS),
        drive_request("root", files.root_disk, root=True, read_only=False),
    ]
    if files.data_disk is not None:
        plan.append(drive_request("data", files.data_disk, root=False, read_only=False))
    plan += [entropy_request(), vsock_request(GUEST_CID, files.vsock)]
    return plan


# -- the guest kernel ---------------------------------------------------------------------


@dataclass(frozen=True)
class KernelOption:
    name: str
    accepted: tuple[str, ...]  # "y" built in, "m" a module the initramfs must load
    module: str | None  # that module's name (modules.order in the initramfs)
    why: str


KERNEL_REQUIREMENTS: tuple[KernelOption, ...] = (
    KernelOption("CONFIG_KVM_GUEST", ("y",), None, "kvm-clock timekeeping on x86_64"),
    KernelOption("CONFIG_BLK_DEV_INITRD", ("y",), None, "mvm boots through its initramfs"),
    KernelOption("CONFIG_SERIAL_8250_CONSOLE", ("y",), None, "ttyS0 carries the mvm-boot: markers"),
    KernelOption("CONFIG_VIRTIO_MMIO", ("y", "m"), "virtio_mmio", "every Firecracker device is virtio-mmio"),
    KernelOption("CONFIG_VIRTIO_BLK", ("y", "m"), "virtio_blk", "the root and data disks"),
    KernelOption("CONFIG_VSOCKETS", ("y", "m"), "vsock", "the agent channel is vsock"),
    KernelOption("CONFIG_VIRTIO_VSOCKETS_COMMON", ("y", "m"), "vmw_vsock_virtio_transport_common",
                 "the agent channel is vsock"),
    KernelOption("CONFIG_VIRTIO_VSOCKETS", ("y", "m"), "vmw_vsock_virtio_transport", "the agent channel is vsock"),
)
# How the guest finds the virtio-mmio devices: ACPI (DSDT, Firecracker >= 1.8.0; CONFIG_PCI is
# needed for the kernel's ACPI init even though Firecracker has no PCI by default) or the legacy
# virtio_mmio.device= kernel arguments Firecracker appends (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y).
DEVICE_DISCOVERY_ACPI = ("CONFIG_ACPI", "CONFIG_PCI")
DEVICE_DISCOVERY_CMDLINE = "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"
# Measured on Debian 12's linux-image-6.1.0-*-cloud-amd64 (the default artifact's kernel):
# ACPI=y, PCI=y, KVM_GUEST=y, VIRTIO_MMIO=m, VIRTIO_MMIO_CMDLINE_DEVICES off, X86_MPPARSE off,
# VSOCKETS/VIRTIO_VSOCKETS(_COMMON)=m. So it can only find devices through ACPI (Firecracker
# >= 1.8.0), and mvm's initramfs (build/kernel.py MODULES) does not carry the three vsock modules.


def check_kernel(config: dict[str, str] | None, initramfs_modules: list[str] | None,
                 firecracker_version: tuple[int, int, int] | None = None) -> list[str]:
    """What stops this kernel + initramfs from running mvm under Firecracker; [] when nothing known does.

    ``config`` is the kernel's .config as {option: value} (None: unknown, only modules are
    checked); ``initramfs_modules`` the initramfs's modules.order (None: unknown).
    """
    problems: list[str] = []
    for option in KERNEL_REQUIREMENTS:
        value = config.get(option.name) if config is not None else None
        if config is not None and value not in option.accepted:
            problems.append(f"{option.name}={value or 'n'} (needs {' or '.join(option.accepted)}: {option.why})")
            continue
        module_needed = option.module is not None and (value == "m" or config is None)
        if module_needed and initramfs_modules is not None and option.module not in initramfs_modules:
            built = f"{option.name}=m" if value == "m" else f"{option.name} unknown, unless built in"
            problems.append(f"the initramfs does not load {option.module}.ko ({built}: {option.why})")
    if config is not None:
        acpi = all(config.get(name) == "y" for name in DEVICE_DISCOVERY_ACPI)
        cmdline = config.get(DEVICE_DISCOVERY_CMDLINE) == "y"
        if not acpi and not cmdline:
            problems.append(f"{DEVICE_DISCOVERY_CMDLINE} is off and {'+'.join(DEVICE_DISCOVERY_ACPI)} are not both "
                            "built in: the guest cannot find Firecracker's virtio-mmio devices")
        elif not cmdline and firecracker_version is not None and firecracker_version < MIN_ACPI_VERSION:
            problems.append(f"{DEVICE_DISCOVERY_CMDLINE} is off, and Firecracker "
                            f"{'.'.join(map(str, firecracker_version))} predates ACPI device discovery "
                            f"({'.'.join(map(str, MIN_ACPI_VERSION))})")
    return problems


def parse_kernel_config(text: str) -> dict[str, str]:
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            config[name] = value.strip().strip('"')
    return config


def kernel_config_from_deb(deb: Path) -> dict[str, str] | None:
    """``/boot/config-*`` from a kernel .deb (an ar archive holding data.tar.*), stdlib only."""
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            return None
        while header := f.read(60):
            if len(header) < 60:
                return None
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    return None  # tarfile cannot read zstd; Debian 12's kernel uses xz
                member_file: Any = _Limited(f, size)
                with tarfile.open(fileobj=member_file, mode="r|*") as tar:
                    for member in tar:
                        if re.fullmatch(r"\./boot/config-.*", member.name) and member.isfile():
                            data = tar.extractfile(member)
                            return parse_kernel_config(data.read().decode()) if data else None
                return None
            f.seek(size + (size & 1), os.SEEK_CUR)
    return None


class _Limited:
    """A read-only view of the next ``size`` bytes of a file (one ar member)."""

    def __init__(self, f: Any, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def initramfs_modules(initrd: Path) -> list[str] | None:
    """modules.order of mvm's initramfs (an uncompressed newc cpio); None if it cannot be read."""
    try:
        data = initrd.read_bytes()
    except OSError:
        return None
    offset = 0
    while data[offset:offset + 6] == b"070701":
        fields = [int(data[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start:name_start + namesize - 1].decode(errors="replace")
        body_start = (name_start + namesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        if name.lstrip("./") == "modules.order":
            return data[body_start:body_start + size].decode().split()
        offset = (body_start + size + 3) & ~3
    return None


def artifact_kernel_config(image: BootImage) -> dict[str, str] | None:
    """The image's kernel config, from the kernel .deb (``linux-image-<kernelRelease>_*.deb``)
    in ``$MVM_HOME/cache/debs`` if it is still there; None when it is not."""
    home = image.path.parent.parent  # $MVM_HOME/store/<key>
    release = image.kernel_release
    for deb in sorted((home / "cache" / "debs").glob(f"linux-image-{release}_*.deb"), reverse=True):
        try:
            config = kernel_config_from_deb(deb)
        except (OSError, ValueError, EOFError, tarfile.TarError):
            continue
        if config is not None:
            return config
    return None


# -- the process --------------------------------------------------------------------------


def firecracker_binary() -> str:
    path = shutil.which(FIRECRACKER_BINARY)
    if path is None:
        raise HostToolMissing(FIRECRACKER_BINARY, "firecracker (a release binary from "
                              "github.com/firecracker-microvm/firecracker/releases)")
    return path


def firecracker_version(binary: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def use_jailer() -> str | None:
    """The jailer's path when it will be used: on PATH, running as root (it chroots, mknods
    /dev/kvm and changes uid), and not turned off with MVM_FIRECRACKER_JAILER=0."""
    if os.environ.get("MVM_FIRECRACKER_JAILER", "1") == "0" or os.geteuid() != 0:
        return None
    return shutil.which(JAILER_BINARY)


def jail_id(vm_name: str) -> str:
    """The jailer's --id: letters, digits and hyphens, at most 64."""
    return ("mvm-" + re.sub(r"[^A-Za-z0-9-]", "-", vm_name))[:64]


@dataclass
class Launch:
    argv: list[str]
    api_socket: Path  # where the host reaches the API (a symlink into the jail when jailed)
    jail_root: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


def _cgroup_version() -> str:
    return "2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "1"


def launch_argv(paths: VmPaths, binary: str, jailer: str | None) -> Launch:
    log = paths.dir / LOG_FILE
    if jailer is None:
        sock = api_socket_path(paths)
        return Launch([binary, "--api-sock", str(sock), "--id", jail_id(paths.name), "--log-path", str(log),
                       "--level", "Warning"], sock)
    uid = os.environ.get("MVM_FIRECRACKER_UID", "65534")
    gid = os.environ.get("MVM_FIRECRACKER_GID", "65534")
    base = paths.dir / JAIL_DIR
    vm_id = jail_id(paths.name)
    jail_root = base / Path(binary).name / vm_id / "root"
    argv = [jailer, "--id", vm_id, "--exec-file", binary, "--uid", uid, "--gid", gid,
            "--chroot-base-dir", str(base), "--cgroup-version", _cgroup_version(),
            "--", "--api-sock", f"/{API_SOCKET_FILE}", "--log-path", f"/{LOG_FILE}", "--level", "Warning"]
    return Launch(argv, api_socket_path(paths), jail_root)


def _prepare_disks(image: ImageLike, paths: VmPaths, root_disk: Path, data_disk: Path | None) -> None:
    proc = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(image.rootfs), str(root_disk)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmError(f"cannot copy the root disk to {root_disk}: {proc.stderr.strip()}")
    os.chmod(root_disk, 0o600)
    if data_disk is not None and image.data_disk_bytes:
        from mvm.runtime.qemu import (
            create_data_disk,  # lazily: qemu imports pydantic via artifact
        )

        create_data_disk(data_disk, image.data_disk_bytes)


def _stage_jail(launch: Launch, image: ImageLike, paths: VmPaths) -> None:
    """Put what the jailed Firecracker opens inside its chroot, owned by its uid, and point the
    VM directory's fc.sock / agent.sock at the sockets it will create there."""
    assert launch.jail_root is not None
    root = launch.jail_root
    root.mkdir(parents=True, exist_ok=True)
    uid = int(os.environ.get("MVM_FIRECRACKER_UID", "65534"))
    gid = int(os.environ.get("MVM_FIRECRACKER_GID", "65534"))
    for source, name in ((image.kernel, "vmlinux"), (image.initrd, "initrd.cpio")):
        target = root / name
        try:
            os.link(source, target)
        except OSError:  # another filesystem: copy (the store's files are read-only to the VM anyway)
            shutil.copyfile(source, target)
    _prepare_disks(image, paths, root / ROOT_DISK_FILE, root / "data.ext4" if image.data_disk_bytes else None)
    for name in (ROOT_DISK_FILE, "data.ext4"):
        if (root / name).exists():
            os.chown(root / name, uid, gid)
    (root / LOG_FILE).touch()
    os.chown(root / LOG_FILE, uid, gid)
    for link, target in ((paths.agent_socket, root / "agent.sock"), (launch.api_socket, root / API_SOCKET_FILE)):
        link.unlink(missing_ok=True)
        link.symlink_to(target)


def _wait_for_api(proc: subprocess.Popen, sock_path: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VmError(f"Firecracker exited with code {proc.returncode} before its API came up")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock_path))
            return
        except OSError:
            time.sleep(0.005)
        finally:
            probe.close()
    raise VmError(f"Firecracker's API socket {sock_path} did not come up within {API_SOCKET_WAIT_S:.0f} s")


def refuse_unsuitable_kernel(artifact: BootImage | ImageLike, binary: str | None = None) -> None:
    """Raise VmError, before anything starts, if the artifact cannot boot under Firecracker."""
    image = image_of(artifact)
    config = artifact_kernel_config(artifact) if isinstance(artifact, BootImage) else None
    version = firecracker_version(binary) if binary else None
    problems = check_kernel(config, initramfs_modules(image.initrd), version)
    if problems:
        raise VmError("this artifact cannot run under Firecracker: " + "; ".join(problems),
                      "see docs/firecracker.md (kernel requirements); use --hypervisor qemu")


def spawn(paths: VmPaths, artifact: BootImage | ImageLike, record: VmRecord | None = None) -> subprocess.Popen:
    """Start Firecracker for this VM, configure it through the API and boot the guest.

    stdin/stdout/stderr are pipes: stdout is the guest's serial console. The process dies with
    ours (PDEATHSIG) when not jailed; the jailer changes credentials, which clears PDEATHSIG.
    """
    binary = firecracker_binary()
    refuse_unsuitable_kernel(artifact, binary)
    image = image_of(artifact)
    jailer = use_jailer()
    launch = launch_argv(paths, binary, jailer)
    for stale in (launch.api_socket, paths.agent_socket):
        stale.unlink(missing_ok=True)
    if launch.jail_root is not None:
        if launch.jail_root.parent.exists():
            shutil.rmtree(launch.jail_root.parent)  # a jail left by an earlier run of this VM
        _stage_jail(launch, image, paths)
    else:
        _prepare_disks(image, paths, root_disk_path(paths), paths.data_disk if image.data_disk_bytes else None)
        (paths.dir / LOG_FILE).touch()
    proc = spawn_tied(launch.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_api(proc, launch.api_socket, time.monotonic() + API_SOCKET_WAIT_S)
        api = FirecrackerApi(launch.api_socket)
        for request in plan_boot(image, paths, record, jailed=launch.jail_root is not None):
            api.send(request)
        api.start()
    except BaseException as err:
        proc.kill()
        try:
            _, stderr = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            stderr = b""
        detail = (stderr or b"").decode(errors="replace").strip().splitlines()
        if isinstance(err, VmError):
            raise VmError(err.message + (f" (stderr: {detail[-1]})" if detail else ""), err.fix) from err
        raise VmError(f"Firecracker did not start: {err}") from err
    _mark_exercised(paths, binary)
    return proc


def _mark_exercised(paths: VmPaths, binary: str) -> None:
    """Remember that a guest was started here, so `available` stops calling it unexercised."""
    marker = exercised_marker(paths.dir.parent.parent)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"binary": binary, "at": time.time()}) + "\n")
    except OSError:
        pass


def exercised_marker(home: Path) -> Path:
    return home / "cache" / "host" / "firecracker-started.json"


def available(kvm_usable: bool | None, home: Path | None = None) -> tuple[bool, str]:
    """Can Firecracker run VMs here? ``kvm_usable`` is the KVM probe's verdict (None: unknown)."""
    if home is None:
        from mvm.core.state import mvm_home

        home = mvm_home()
    exercised = exercised_marker(home).is_file()
    suffix = "" if exercised else "; not exercised on this host"
    if not sys.platform.startswith("linux"):
        return False, "Firecracker needs Linux with KVM" + suffix
    binary = shutil.which(FIRECRACKER_BINARY)
    problems = []
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        problems.append("/dev/kvm is missing or not read-writable")
    elif kvm_usable is False:
        problems.append("/dev/kvm cannot run a guest (the KVM probe boot failed)")
    elif kvm_usable is None:
        problems.append("KVM was not probed yet")
    if binary is None:
        problems.append(f"no {FIRECRACKER_BINARY} binary on PATH")
    if problems:
        return False, "; ".join(problems) + suffix
    return True, f"{binary} with a working /dev/kvm" + suffix


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
