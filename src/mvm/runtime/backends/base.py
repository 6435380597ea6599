"""The one interface every backend implements, and the defaults it inherits.

A backend turns a built image into a running guest whose console is a pipe and whose agent
channel is a stream, so the supervisor and every client above it are the same on all of
them. Like Lima's driver base, :class:`VmBackend` supplies a refusal for everything optional
(snapshots, volumes, networks), so a backend writes only what it really supports, and the
refusal names the capability it lacks.

Where each method runs, in the order of a VM's life:

- ``availability`` and ``accel``: in `up`, to choose the backend and say why.
- ``prepare_image``: in `up` (and `build --hypervisor`), before the VM's name is taken:
  slow work cached per image (docker import).
- ``prepare``: in `up`, in the VM's staged directory: its disks, its record's backend fields.
- ``spawn``: in the forked launcher, just before the supervisor is exec'd: the process.
- ``serve_agent_channel``, ``pause``/``resume``, ``terminate``, ``after_exit``: in the
  supervisor, which imports only this module and its own backend's.
- ``release``: in any command that finds the VM stopped (its supervisor gone).
- ``describe`` (status) and ``doctor`` (host report): in the CLI.

Stdlib only, and no asyncio at import (it costs `up` ~40 ms before QEMU starts): `up` imports
a backend to spawn its process; the supervisor, which has asyncio loaded, awaits its async
methods, and the backend modules import asyncio inside those.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mvm.core.errors import UsageError

if TYPE_CHECKING:
    import asyncio

    from mvm.core.bootimage import BootImage
    from mvm.core.state import MvmHome, VmPaths, VmRecord
    from mvm.runtime.volumes import Mount

    AgentHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

NOT_EXERCISED = "not exercised on this host"
Progress = Callable[[str], None]

# The kernel command line's root for a kernel without an initramfs (ours: every driver built
# in): it mounts the first virtio disk and starts /init itself (rootflags: as the initramfs
# mounts it, without ext4's background lazyinit thread, which a power-off can cut mid-read).
DIRECT_ROOT_ARGS = ("root=/dev/vda rootfstype=ext4 rootflags=noinit_itable,no_prefetch_block_bitmaps rw "
                    "init=/init")


@dataclass(frozen=True)
class Capabilities:
    """What mvm can do with a VM on this backend (this version, not the hypervisor in theory)."""

    snapshots: bool
    pause_resume: bool
    vsock: bool
    tap_networking: bool
    port_forwarding: bool
    detach: bool
    console: bool
    isolation: str  # "microvm" or "container" (reduced: shares the host kernel)

    def as_dict(self) -> dict[str, bool | str]:
        return asdict(self)


class Host:
    """What choosing a backend may ask of this host; the KVM probe boot runs at most once, and
    never when ``may_probe`` is False (a dry run): then only a cached verdict counts."""

    def __init__(self, home: MvmHome, *, may_probe: bool = True) -> None:
        self.home = home
        self.may_probe = may_probe
        self._kvm_usable: bool | None = None
        self._probed = False

    def kvm_usable(self) -> bool | None:
        """The KVM probe's verdict (None: undecided); boots a probe guest the first time."""
        if not self._probed:
            from mvm.runtime.kvm import probe_kvm

            self._kvm_usable = probe_kvm(self.home, run_if_needed=self.may_probe).usable
            self._probed = True
        return self._kvm_usable


@dataclass(frozen=True)
class HostFacts:
    """What `mvmctl doctor` found about KVM and the host tools, for each backend's report."""

    kvm_usable: bool | None
    kvm_reason: str
    kvm_boot_ms: int | None
    pvm_hint: bool
    tools: dict[str, Any]  # name -> runtime.hosttools.ToolStatus

    def kvm_phrase(self) -> str:
        if self.kvm_usable:
            return "KVM usable"
        if self.kvm_usable is False:
            return f"KVM not usable ({self.kvm_reason})"
        hint = "; kvm_pvm loaded, nested PVM KVM usually cannot boot a guest" if self.pvm_hint else ""
        return f"KVM not verified ({self.kvm_reason}{hint})"

    def kvm_short(self) -> str:
        """For backends other than qemu: the KVM section of the report carries the details."""
        if self.kvm_usable:
            return "KVM usable"
        return "KVM not usable" if self.kvm_usable is False else "KVM not verified"


@dataclass(frozen=True)
class BackendReport:
    """One row of `mvmctl doctor` (and of `doctor --json`): can it run here, was it really
    run, why, and what mvm can do with a VM on it. Made by :meth:`VmBackend.report`."""

    name: str
    supported: bool
    available: bool
    tested_here: bool
    reason: str
    accel: str | None
    capabilities: dict[str, bool | str]


@dataclass(frozen=True)
class CachedImage:
    """What a backend keeps per image outside the store (docker: an imported image), for `prune`."""

    backend: str
    name: str  # what the backend calls it (docker: its tag)
    artifact_key_prefix: str  # the start of the store key it was made from
    size: int  # bytes


@dataclass
class Spawned:
    """The process the supervisor will own, and how its agent channel is reached."""

    process: subprocess.Popen
    spawned: float  # time.monotonic() just before the process was exec'd
    agent_listen_fd: int | None = None  # the agent dials us on this listening socket
    agent_fd: int | None = None  # a clone's agent channel, already connected (its hello and identity sent)
    restored: float | None = None  # time.monotonic() when spawn had restored the clone itself (no restore())


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``asyncio.to_thread``, for backend code that blocks (a CLI, an HTTP call)."""
    import asyncio

    return await asyncio.to_thread(fn, *args)


async def dial_until_open(path: Path, interval: float,
                          handshake: Callable[..., Awaitable[object]] | None = None) -> tuple[Any, Any]:
    """Connect to the unix socket ``path`` (and pass ``handshake``), retrying every ``interval``
    seconds until it works: the VM's process creates the socket once it is up."""
    import asyncio

    while True:
        writer = None
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            if handshake is not None:
                await handshake(reader, writer)
            return reader, writer
        except OSError:
            if writer is not None:
                writer.close()
            await asyncio.sleep(interval)


_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(writer: Any) -> int | None:
    """The uid of the process at the other end of an asyncio unix stream (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


ARGV_LIMIT = 1536  # bytes of base64: the kernel command line holds 2048 in all


def encoded_argv(record: VmRecord) -> str | None:
    """`run -- ARGV` for /init: base64 of its JSON (no spaces, no quoting to get wrong), passed
    as ``mvm.argv=`` on the kernel command line or ``MVM_ARGV`` in a container's environment."""
    if record.argv is None:
        return None
    import base64
    import json

    return base64.b64encode(json.dumps(record.argv).encode()).decode()


def join_reasons(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


class VmBackend:
    why_not: ClassVar[dict[str, str]] = {}  # capability -> why this backend cannot have it
    """The base every backend extends: required methods raise, optional hooks refuse."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    process_label: ClassVar[str]  # how a stop reason names its process ("QEMU", "the docker CLI")
    supported: ClassVar[bool] = True  # this mvm version can start VMs with it
    boots_kernel: ClassVar[bool] = True  # False for a container: boot-report has no kernel phase
    # True where no channel but the console exists for /init's boot markers, so a workload can
    # forge them (Firecracker here); otherwise serve_boot_channel reaches a root-only one.
    markers_on_console: ClassVar[bool] = False
    volume_kind: ClassVar[str] = "none"  # how it shares a volume: virtiofs, bind mount

    # -- choosing ------------------------------------------------------------------------------

    def availability(self, host: Host) -> tuple[bool, str]:
        """Whether it can start a VM here now, and why (not). Cheap checks first."""
        raise NotImplementedError

    def accel(self, host: Host) -> str:
        """What the record's ``accel`` says: kvm, tcg, container."""
        return "kvm"

    # -- guest architectures (core/arch.py) -----------------------------------------------------

    def arch_refusal(self, arch: str) -> str | None:
        """Why this backend cannot run a guest of ``arch`` here (None: it can). By default a
        backend runs only guests of the host's own CPU architecture."""
        from mvm.core.arch import host_arch, is_native

        if is_native(arch):
            return None
        return f"{self.name} runs only guests of the host's own architecture ({host_arch()}), not {arch}"

    def availability_for(self, image: BootImage, host: Host) -> tuple[bool, str]:
        """:meth:`availability` for this image: also whether it can run the image's architecture."""
        refused = self.arch_refusal(image.arch)
        if refused is not None:
            return False, refused
        return self.availability(host)

    def accel_for(self, image: BootImage, host: Host) -> str:
        """:meth:`accel` for this image (an emulated architecture is never under KVM)."""
        return self.accel(host)

    # -- starting ------------------------------------------------------------------------------

    def prepare_image(self, image: BootImage, progress: Progress | None = None) -> None:
        """Make the image runnable on this backend (cached per image); nothing by default."""

    def prepare(self, image: BootImage, record: VmRecord, staged: VmPaths) -> None:
        """Set up the VM's own files in its (still hidden) directory; nothing by default."""

    def spawn(self, image: BootImage, record: VmRecord, paths: VmPaths) -> Spawned:
        """Start the VM's process, tied to ours, with its console on pipes."""
        raise NotImplementedError

    def socket_paths(self, paths: VmPaths) -> list[Path]:
        """Unix sockets this backend creates for the VM (checked against the path limit)."""
        return [paths.agent_socket]

    def data_location(self, paths: VmPaths) -> Path:
        """Where the VM's /data lives in its directory: a disk image (docker: a directory).
        For a named VM it is a link to the disk kept in disks/ (runtime/data_disks.py)."""
        return paths.data_disk

    # -- in the supervisor ---------------------------------------------------------------------

    async def serve_agent_channel(self, paths: VmPaths, record: VmRecord, listen_fd: int | None,
                                  handler: AgentHandler) -> None:
        """Reach the guest's agent and hand each connection to ``handler``."""
        raise NotImplementedError

    async def serve_boot_channel(self, paths: VmPaths, feed: Callable[[bytes], None]) -> None:
        """Pass the bytes of the guest's boot marker channel to ``feed`` as they arrive."""
        raise NotImplementedError

    async def pause(self, paths: VmPaths, record: VmRecord) -> None:
        raise self.refuse("pause_resume", record.name)

    async def resume(self, paths: VmPaths, record: VmRecord) -> None:
        raise self.refuse("pause_resume", record.name)

    async def terminate(self, record: VmRecord, process: Any, sig: int) -> None:
        """Stop the VM's process with ``sig`` (the process outlives nothing it started)."""
        process.send_signal(sig)

    async def after_exit(self, record: VmRecord) -> None:
        """The VM's process has exited: free what the backend still holds for it."""

    def runtime_files(self, paths: VmPaths) -> list[Path]:
        """What a stopped VM no longer needs (its record, mode and console log stay)."""
        return [paths.ctl_socket, paths.agent_socket, paths.data_disk]

    # -- after the fact ------------------------------------------------------------------------

    def release(self, paths: VmPaths, record: VmRecord) -> bool:
        """For a VM found stopped: free what a crashed supervisor left behind. True when
        nothing of it is left (False: try again later)."""
        return True

    def describe(self, record: VmRecord) -> list[tuple[str, str]]:
        """Extra (label, text) lines for `mvmctl status`."""
        return []

    def doctor(self, facts: HostFacts) -> BackendReport:
        """This backend's row in `mvmctl doctor`, from checks made now."""
        raise NotImplementedError

    def report(self, available: bool, tested_here: bool, reason: str, accel: str | None = None) -> BackendReport:
        return BackendReport(self.name, self.supported, available, tested_here, reason, accel,
                             self.capabilities.as_dict())

    def cached_images(self, home: MvmHome) -> list[CachedImage]:
        """Per-image copies this backend made from ``home``'s store; none by default."""
        return []

    def remove_cached_image(self, image: CachedImage) -> None:
        raise NotImplementedError

    # -- optional: a backend overrides what it can do ------------------------------------------

    async def snapshot(self, paths: VmPaths, record: VmRecord, dest: Path) -> dict[str, str]:
        """Stop the VM and write its state into the directory ``dest``; returns the manifest's
        ``kind`` and ``hypervisor_version``. The VM stays stopped until :meth:`resume`."""
        raise self.refuse("snapshots", record.name)

    async def restore(self, paths: VmPaths, record: VmRecord, snapshot: Path, hypervisor_version: str) -> None:
        """Load the VM just spawned (waiting for it) from ``snapshot`` and run it (unless
        ``spawn`` already did: Spawned.restored)."""
        raise self.refuse("snapshots", record.name)

    def check_volumes(self, mounts: tuple[Mount, ...]) -> None:
        """Refuse, before anything starts, volumes (runtime/volumes.py) this backend cannot
        share as asked; a backend that shares none refuses any."""
        if mounts:
            raise UsageError(f"{self.name} cannot share host directories (volumes) in this mvm version",
                             "use --hypervisor qemu or docker, or leave the volumes out")

    async def network(self, paths: VmPaths, record: VmRecord, mode: str) -> None:
        raise UsageError(f"VM {record.name} runs on {self.name}, which has no {mode} network in this mvm version",
                         "`mvmctl doctor` shows what each backend can do")

    def refuse(self, capability: str, vm: str) -> UsageError:
        why = self.why_not.get(capability)
        return UsageError(f"VM {vm} runs on {self.name}, which has no {capability.replace('_', '/')} "
                          f"capability in this mvm version{f' ({why})' if why else ''}",
                          "`mvmctl doctor` shows what each backend can do")

    def require(self, capability: str, vm: str) -> None:
        """Refuse, before doing anything, a verb this backend cannot serve."""
        if not getattr(self.capabilities, capability):
            raise self.refuse(capability, vm)

