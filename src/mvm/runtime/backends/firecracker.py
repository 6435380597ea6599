"""The Firecracker backend: the same artifact as QEMU, driven through Firecracker's REST API
(firecracker_api.py), after its kernel was checked (firecracker_kernel.py).

Written against Firecracker's published Swagger document (docs/firecracker.md says where it
lives and what was and was not exercised): this host has no firecracker binary and no usable
KVM, so every request below is checked against the spec by tests/unit/test_firecracker_api.py,
and nothing here has booted a guest yet.

Shape of a VM (everything in ``vms/<name>/``):

- ``fc.sock``   Firecracker's API socket (HTTP/1.1 over AF_UNIX; PUT/PATCH with JSON bodies)
- ``root.ext4`` the VM's writable root disk: Firecracker has no qcow2, so it is a sparse
  (and, where the filesystem can, reflinked) copy of the artifact's read-only rootfs.ext4
  (or, for a clone, of its snapshot's ``disk.raw``). Firecracker is told it as the relative
  path ``root.ext4`` and runs in this directory, so a snapshot's clones each open their own
  (firecracker_snapshot.py says why)
- ``data.ext4`` the optional data disk, as under QEMU
- ``agent.sock`` the vsock device's unix socket. The host connects to it and sends
  ``CONNECT 1024\\n``; Firecracker answers ``OK <host port>\\n`` once the guest agent (``python3 -m
  agent --vsock 1024``) accepted, or closes the connection when nothing listens yet.
- stdout of the Firecracker process is the guest's serial console (ttyS0), stdin its input.

Stdlib only at module level: the lean per-VM supervisor imports this module.
AGENT_VSOCK_PORT is re-exported for the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvm.core.bootimage import BootImage
from mvm.core.errors import HostToolMissing, VmError
from mvm.runtime.backends.base import (
    NOT_EXERCISED,
    BackendReport,
    Capabilities,
    Host,
    HostFacts,
    Spawned,
    VmBackend,
    dial_until_open,
    in_thread,
    join_reasons,
)
from mvm.runtime.process import spawn_tied

if TYPE_CHECKING:
    from mvm.core.state import VmPaths, VmRecord
    from mvm.runtime.backends.base import AgentHandler
    from mvm.runtime.backends.firecracker_api import ImageLike

FIRECRACKER_BINARY = "firecracker"
JAILER_BINARY = "jailer"
LOG_FILE = "firecracker.log"
JAIL_DIR = "jail"
API_SOCKET_WAIT_S = 5.0
API_SOCKET_FILE = "fc.sock"
ROOT_DISK_FILE = "root.ext4"
JAIL_STATE, JAIL_RAM = "snapshot.state", "snapshot.ram"  # a snapshot's files as a jailed Firecracker sees them


def api_socket_path(paths: VmPaths) -> Path:
    return paths.dir / API_SOCKET_FILE


def root_disk_path(paths: VmPaths) -> Path:
    return paths.dir / ROOT_DISK_FILE


def root_drive_path(*, jailed: bool) -> str:
    """The root disk as Firecracker is told it: relative to its working directory (the VM's
    directory) when not jailed, so a snapshot's clones each open their own copy at load."""
    return f"/{ROOT_DISK_FILE}" if jailed else ROOT_DISK_FILE


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
    cwd: Path | None = None  # Firecracker's working directory: relative drive paths resolve there


def _cgroup_version() -> str:
    return "2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "1"


def launch_argv(paths: VmPaths, binary: str, jailer: str | None) -> Launch:
    log = paths.dir / LOG_FILE
    if jailer is None:
        sock = api_socket_path(paths)
        return Launch([binary, "--api-sock", str(sock), "--id", jail_id(paths.name), "--log-path", str(log),
                       "--level", "Warning"], sock, cwd=paths.dir)
    uid, gid = (str(n) for n in jail_ids())
    base = paths.dir / JAIL_DIR
    vm_id = jail_id(paths.name)
    jail_root = base / Path(binary).name / vm_id / "root"
    argv = [jailer, "--id", vm_id, "--exec-file", binary, "--uid", uid, "--gid", gid,
            "--chroot-base-dir", str(base), "--cgroup-version", _cgroup_version(),
            "--", "--api-sock", f"/{API_SOCKET_FILE}", "--log-path", f"/{LOG_FILE}", "--level", "Warning"]
    return Launch(argv, api_socket_path(paths), jail_root)


def jail_ids() -> tuple[int, int]:
    """The uid and gid the jailer runs Firecracker as."""
    return (int(os.environ.get("MVM_FIRECRACKER_UID", "65534")), int(os.environ.get("MVM_FIRECRACKER_GID", "65534")))


def jail_root_of(paths: VmPaths) -> Path | None:
    """The chroot of this VM's jailed Firecracker (None: not jailed), found through the fc.sock
    symlink spawn made into it, so the supervisor needs no second opinion on use_jailer()."""
    sock = api_socket_path(paths)
    if not sock.is_symlink():
        return None
    root = Path(os.readlink(sock)).parent
    if not root.is_relative_to(paths.dir / JAIL_DIR) or ".." in root.parts:
        raise VmError(f"{sock} points outside the VM's jail directory", "stop the VM and start it again")
    return root


def jail_snapshot_copies(paths: VmPaths) -> list[Path]:
    """The private copies of a snapshot's state and memory a jailed restore makes (removed after
    the load; these names find them if the supervisor died first). They hold guest memory."""
    jails = paths.dir / JAIL_DIR
    return [p for name in (JAIL_STATE, JAIL_RAM) for p in jails.glob(f"*/*/root/{name}")] if jails.is_dir() else []


def _prepare_disks(image: ImageLike, paths: VmPaths, root_disk: Path, data_disk: Path | None) -> None:
    proc = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(image.rootfs), str(root_disk)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmError(f"cannot copy the root disk to {root_disk}: {proc.stderr.strip()}")
    os.chmod(root_disk, 0o600)
    if data_disk is not None and image.data_disk_bytes:
        from mvm.runtime.backends.qemu import create_data_disk

        create_data_disk(data_disk, image.data_disk_bytes)


def _stage_jail(launch: Launch, image: ImageLike, paths: VmPaths, *, boot: bool = True) -> None:
    """Put what the jailed Firecracker opens inside its chroot, owned by its uid, and point the
    VM directory's fc.sock / agent.sock at the sockets it will create there. Not ``boot`` (a
    restore): no kernel and no disks; the restore copies the snapshot's disk in."""
    assert launch.jail_root is not None
    root = launch.jail_root
    root.mkdir(parents=True, exist_ok=True)
    uid, gid = jail_ids()
    if boot:
        for source, name in ((image.kernel, "vmlinux"), (image.initrd, "initrd.cpio")):
            if source is None:
                continue  # our kernel needs no initramfs
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
    from mvm.runtime.backends.firecracker_api import image_of
    from mvm.runtime.backends.firecracker_kernel import (
        artifact_kernel_config,
        check_kernel,
        initramfs_modules,
    )

    image = image_of(artifact)
    config = artifact_kernel_config(artifact) if isinstance(artifact, BootImage) else None
    version = firecracker_version(binary) if binary else None
    modules = initramfs_modules(image.initrd) if image.initrd is not None else []  # ours: every driver built in
    problems = check_kernel(config, modules, version)
    if problems:
        raise VmError("this artifact cannot run under Firecracker: " + "; ".join(problems),
                      "see docs/firecracker.md (kernel requirements); use --hypervisor qemu")


def spawn(paths: VmPaths, artifact: BootImage | ImageLike, record: VmRecord | None = None) -> subprocess.Popen:
    """Start Firecracker for this VM, configure it through the API and boot the guest.

    stdin/stdout/stderr are pipes: stdout is the guest's serial console. The process dies with
    ours (PDEATHSIG) when not jailed; the jailer changes credentials, which clears PDEATHSIG.
    A clone (``record.restore_from``) gets a bare Firecracker, its API socket and nothing else:
    a snapshot loads only into a process nothing was configured on; the supervisor's
    ``restore`` does the rest.
    """
    from mvm.runtime.backends.firecracker_api import FirecrackerApi, image_of, plan_boot

    restoring = record is not None and record.restore_from is not None
    binary = firecracker_binary()
    if not restoring:  # a clone runs the kernel its snapshot's source already ran here
        refuse_unsuitable_kernel(artifact, binary)
    image = image_of(artifact)
    jailer = use_jailer()
    launch = launch_argv(paths, binary, jailer)
    for stale in (launch.api_socket, paths.agent_socket):
        stale.unlink(missing_ok=True)
    if launch.jail_root is not None:
        if launch.jail_root.parent.exists():
            shutil.rmtree(launch.jail_root.parent)  # a jail left by an earlier run of this VM
        _stage_jail(launch, image, paths, boot=not restoring)
    else:
        if not restoring:
            _prepare_disks(image, paths, root_disk_path(paths), paths.data_disk if image.data_disk_bytes else None)
        (paths.dir / LOG_FILE).touch()
    proc = spawn_tied(launch.argv, cwd=launch.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        _wait_for_api(proc, launch.api_socket, time.monotonic() + API_SOCKET_WAIT_S)
        if restoring:
            return proc
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




class FirecrackerBackend(VmBackend):
    """A microVM under Firecracker on Linux with working KVM; the agent channel is vsock."""

    name = "firecracker"
    process_label = "Firecracker"
    markers_on_console = True  # one serial port and no virtio-serial: see docs/firecracker.md
    capabilities = Capabilities(snapshots=True, pause_resume=True, vsock=True, tap_networking=True,
                                port_forwarding=True, detach=True, console=True, isolation="microvm")

    def arch_refusal(self, arch: str) -> str | None:
        from mvm.core.arch import host_arch, is_native

        if is_native(arch):
            return None
        return (f"Firecracker runs guests of the host's own architecture ({host_arch()}) under KVM only, "
                f"not {arch} (use --hypervisor qemu, which emulates it)")

    def availability(self, host: Host) -> tuple[bool, str]:
        if shutil.which(FIRECRACKER_BINARY) is None:  # decided without a KVM probe boot
            return False, f"no {FIRECRACKER_BINARY} binary on PATH; {NOT_EXERCISED}"
        return available(host.kvm_usable(), host.home.root)

    def spawn(self, image: BootImage, record: VmRecord, paths: VmPaths) -> Spawned:
        spawned = time.monotonic()
        return Spawned(spawn(paths, image, record), spawned)

    def socket_paths(self, paths: VmPaths) -> list[Path]:
        return [paths.agent_socket, api_socket_path(paths)]

    async def serve_agent_channel(self, paths: VmPaths, record: VmRecord, listen_fd: int | None,
                                  handler: AgentHandler) -> None:
        """Dial the vsock device's unix socket and ask for the agent's port until it listens
        (a refused handshake is an OSError: nothing listens on that guest port yet)."""
        from mvm.runtime.backends.firecracker_api import vsock_handshake

        await handler(*await dial_until_open(paths.agent_socket, 0.1, vsock_handshake))

    def _api(self, paths: VmPaths) -> Any:
        from mvm.runtime.backends.firecracker_api import FirecrackerApi

        return FirecrackerApi(str(api_socket_path(paths)))

    async def pause(self, paths: VmPaths, record: VmRecord) -> None:
        await in_thread(self._api(paths).pause)

    async def resume(self, paths: VmPaths, record: VmRecord) -> None:
        await in_thread(self._api(paths).resume)

    async def snapshot(self, paths: VmPaths, record: VmRecord, dest: Path) -> dict[str, str]:
        """Pause and write guest memory, device state and the root disk into ``dest`` (0600:
        guest memory). The VM stays paused: the supervisor resumes it (or stops it)."""
        from mvm.runtime.backends import firecracker_snapshot

        return await in_thread(firecracker_snapshot.save, self._api(paths), paths, record, dest)

    async def restore(self, paths: VmPaths, record: VmRecord, snapshot: Path, hypervisor_version: str) -> None:
        """Load ``snapshot`` into the bare Firecracker spawn started, on a copy of its disk."""
        from mvm.runtime.backends import firecracker_snapshot

        await in_thread(firecracker_snapshot.load, self._api(paths), paths, snapshot, hypervisor_version)
        binary = shutil.which(FIRECRACKER_BINARY)
        if binary is not None:
            _mark_exercised(paths, binary)

    def runtime_files(self, paths: VmPaths) -> list[Path]:
        return [*super().runtime_files(paths), api_socket_path(paths), root_disk_path(paths),
                *jail_snapshot_copies(paths)]

    def release(self, paths: VmPaths, record: VmRecord) -> bool:
        """A supervisor killed in the middle of a jailed restore left guest memory in the jail."""
        for copy in jail_snapshot_copies(paths):
            copy.unlink(missing_ok=True)
        return True

    def doctor(self, facts: HostFacts) -> BackendReport:
        missing: list[str] = []
        import platform

        if platform.system() != "Linux":
            missing.append(f"needs Linux, this host is {platform.system()}")
        if not facts.kvm_usable:
            missing.append(f"needs usable KVM ({facts.kvm_short()})")
        binary = shutil.which(FIRECRACKER_BINARY)
        if binary is None:
            missing.append(f"needs a `{FIRECRACKER_BINARY}` binary on PATH (none found)")
        found = f"firecracker at {binary}" if binary and not missing else ""
        return self.report(not missing, False, join_reasons(
            *missing, found, "snapshots (PUT /snapshot/create, /snapshot/load) written against the API spec only",
            NOT_EXERCISED))
