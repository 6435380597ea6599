"""The QEMU backend, ``-M microvm``: the command line, the process, and QMP for pause.

Every choice here was measured on a TCG host (see DESIGN.md, "This machine"): the ELF
vmlinux boots via PVH; ``tsc_early_khz`` stops one boot in ten from hanging in PIT
calibration; virtio-rng stops the first /dev/random read stalling; the agent channel is a
``virtserialport`` (a ``virtconsole`` is a tty and mangles bytes); ACPI stays on because the
kernel finds virtio-mmio devices only through it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
    encoded_argv,
    join_reasons,
)
from mvm.runtime.process import spawn_tied

if TYPE_CHECKING:
    from mvm.core.state import VmPaths, VmRecord
    from mvm.runtime.backends.base import AgentHandler

QEMU_BINARY = "qemu-system-x86_64"
AGENT_PORT_NAME = "org.mvm.agent"
BOOT_PORT_NAME = "org.mvm.boot"
QMP_TIMEOUT_S = 10.0
TOOL_TIMEOUT_S = 120.0  # qemu-img, mkfs.ext4 for a VM's disks  # /init's boot markers: a port only root in the guest may open
BOOT_ARGS = (
    "console=ttyS0 quiet loglevel=3 tsc=reliable no_timer_check mitigations=off cryptomgr.notests "
    "8250.nr_uarts=1 random.trust_cpu=on panic=-1"
)


def host_tsc_khz() -> int | None:
    """The host TSC frequency: a TCG guest's TSC ticks at this rate."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    if sysfs.is_file():
        return int(sysfs.read_text())
    try:
        kmsg = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        kmsg = ""
    for pattern in (r"tsc: Refined TSC clocksource calibration: ([\d.]+) MHz", r"tsc: Detected ([\d.]+) MHz"):
        match = re.search(pattern, kmsg)
        if match:
            return round(float(match.group(1)) * 1000)
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    return round(float(match.group(1)) * 1000) if match else None


def kernel_cmdline(accel: str) -> str:
    args = BOOT_ARGS
    khz = host_tsc_khz()
    if khz and accel == "tcg":
        args += f" tsc_early_khz={khz}"
    return args


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise HostToolMissing(QEMU_BINARY, "qemu-system-x86")
    return path


@dataclass
class QemuSpec:
    """Everything one QEMU boot needs; :meth:`argv` turns it into a command line."""

    kernel: Path
    initrd: Path
    root_disk: Path | None  # the VM's qcow2 overlay over the artifact's read-only rootfs.ext4
    accel: str = "tcg"
    vcpus: int = 1
    memory_mib: int = 256
    agent_socket: Path | None = None
    boot_socket: Path | None = None  # needs agent_socket (they share the virtio-serial device)
    data_disk: Path | None = None
    qmp_socket: Path | None = None
    console: str = "stdio"  # a QEMU chardev backend for the serial console
    boot_args: str = ""  # appended to the kernel command line
    extra_args: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        argv = [
            qemu_binary(),
            "-M", "microvm,isa-serial=on", "-accel", self.accel,
            "-m", str(self.memory_mib), "-smp", str(self.vcpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", f"{kernel_cmdline(self.accel)} {self.boot_args}".rstrip(),
            "-chardev", f"{self.console},id=console0" + (",signal=off" if self.console == "stdio" else ""),
            "-serial", "chardev:console0",
            "-device", "virtio-rng-device",
        ]
        if self.root_disk is not None:
            argv += ["-drive", f"id=root,file={self.root_disk},format=qcow2,if=none,discard=unmap",
                     "-device", "virtio-blk-device,drive=root"]
        if self.data_disk is not None:
            argv += ["-drive", f"id=data,file={self.data_disk},format=raw,if=none,discard=unmap",
                     "-device", "virtio-blk-device,drive=data"]
        if self.agent_socket is not None:
            argv += ["-chardev", f"socket,id=agent0,path={self.agent_socket},server=on,wait=off",
                     "-device", "virtio-serial-device",
                     "-device", f"virtserialport,chardev=agent0,name={AGENT_PORT_NAME}"]
            if self.boot_socket is not None:
                argv += ["-chardev", f"socket,id=boot0,path={self.boot_socket},server=on,wait=off",
                         "-device", f"virtserialport,chardev=boot0,name={BOOT_PORT_NAME}"]
        if self.qmp_socket is not None:
            argv += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        if self.accel == "kvm":
            argv += ["-cpu", "host"]  # under TCG the default model is fastest (-cpu max is slower)
        return argv + self.extra_args


def create_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 whose writes stay in the VM's directory; the artifact is never written."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise HostToolMissing("qemu-img", "qemu-utils")
    try:
        proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", "raw",
                               str(overlay)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VmError(f"qemu-img did not create {overlay} within {TOOL_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        raise VmError(f"cannot create the disk overlay {overlay}: {proc.stderr.strip()}")


def create_data_disk(path: Path, size: int) -> None:
    """A sparse ext4 file the guest mounts at /data; one already there (the kept disk of a
    named VM, linked in by runtime/data_disks.py) is used as it is."""
    if path.exists():
        return
    with path.open("wb") as f:
        f.truncate(size)
    try:
        proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "mvm-data", str(path)], capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VmError(f"mkfs.ext4 did not format {path} within {TOOL_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        raise VmError(f"cannot format the data disk {path}: {proc.stderr.strip()}")


def image_spec(image: BootImage, overlay: Path, accel: str, *, vcpus: int | None = None,
               memory_mib: int | None = None) -> QemuSpec:
    return QemuSpec(kernel=image.vmlinux, initrd=image.initrd, root_disk=overlay, accel=accel,
                    vcpus=vcpus or image.vcpus, memory_mib=memory_mib or image.memory_mib)


class QemuBackend(VmBackend):
    """A microVM under QEMU: KVM when a real probe boot works, else TCG."""

    name = "qemu"
    process_label = "QEMU"
    capabilities = Capabilities(snapshots=False, pause_resume=True, vsock=False, tap_networking=False,
                                port_forwarding=True, detach=True, console=True, isolation="microvm")

    def availability(self, host: Host) -> tuple[bool, str]:
        missing = [tool for tool in (QEMU_BINARY, "qemu-img") if shutil.which(tool) is None]
        if missing:
            return False, f"{' and '.join(missing)} not installed (run `mvmctl bootstrap`)"
        return True, "QEMU is installed (KVM when the probe boot works, else TCG)"

    def accel(self, host: Host) -> str:
        from mvm.runtime.kvm import select_accel

        return select_accel(host.home, may_probe=host.may_probe)[0]

    def prepare(self, image: BootImage, record: VmRecord, staged: VmPaths) -> None:
        create_overlay(image.rootfs, staged.overlay)
        if image.data_disk_bytes:
            create_data_disk(staged.data_disk, image.data_disk_bytes)

    def spawn(self, image: BootImage, record: VmRecord, paths: VmPaths) -> Spawned:
        spec = image_spec(image, paths.overlay, record.accel, vcpus=record.vcpus, memory_mib=record.memory_mib)
        spec.agent_socket = paths.agent_socket
        spec.boot_socket = paths.boot_socket
        argv = encoded_argv(record)
        if argv is not None:
            spec.boot_args = f"mvm.argv={argv}"
        spec.qmp_socket = paths.qmp_socket
        if image.data_disk_bytes:
            spec.data_disk = paths.data_disk
        argv = spec.argv()
        spawned = time.monotonic()
        return Spawned(spawn_tied(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
                       spawned)

    def socket_paths(self, paths: VmPaths) -> list[Path]:
        return [paths.agent_socket, paths.boot_socket, paths.qmp_socket]

    async def serve_agent_channel(self, paths: VmPaths, record: VmRecord, listen_fd: int | None,
                                  handler: AgentHandler) -> None:
        """QEMU serves the virtio-serial port's chardev socket: dial it until it is there."""
        await handler(*await dial_until_open(paths.agent_socket, 0.01))

    async def serve_boot_channel(self, paths: VmPaths, feed: Callable[[bytes], None]) -> None:
        reader, _ = await dial_until_open(paths.boot_socket, 0.01)
        try:
            while data := await reader.read(65536):
                feed(data)
        except ConnectionError:
            pass  # QEMU is gone

    async def pause(self, paths: VmPaths, record: VmRecord) -> None:
        await self._qmp(paths, record, "stop")

    async def resume(self, paths: VmPaths, record: VmRecord) -> None:
        await self._qmp(paths, record, "cont")

    async def _qmp(self, paths: VmPaths, record: VmRecord, command: str) -> None:
        """One QMP command; a QEMU that does not answer within QMP_TIMEOUT_S is an error, not a hang."""
        import asyncio

        from qemu.qmp import QMPClient

        qmp = QMPClient(record.name)
        try:
            await asyncio.wait_for(qmp.connect(str(paths.qmp_socket)), QMP_TIMEOUT_S)
            await asyncio.wait_for(qmp.execute(command), QMP_TIMEOUT_S)
        except TimeoutError:
            raise VmError(f"QEMU did not answer QMP {command!r} within {QMP_TIMEOUT_S:.0f} s") from None
        finally:
            await qmp.disconnect()

    def runtime_files(self, paths: VmPaths) -> list[Path]:
        return [*super().runtime_files(paths), paths.boot_socket, paths.qmp_socket, paths.overlay]

    def doctor(self, facts: HostFacts) -> BackendReport:
        system, img = facts.tools[QEMU_BINARY], facts.tools["qemu-img"]
        ran = system.ok  # the version check executes the binary, so a found-and-ok tool has run here
        broken = [f"{t.name}: {t.problem}" for t in (system, img) if not t.ok]
        if broken:
            return self.report(False, ran,
                                 join_reasons(*broken, "" if ran else NOT_EXERCISED))
        if facts.kvm_usable:
            accel = "kvm"
            why = "accel kvm: the probe booted a guest under KVM" + (
                f" in {facts.kvm_boot_ms} ms" if facts.kvm_boot_ms is not None else "")
        else:
            accel = "tcg"
            why = (f"accel tcg (software emulation, slower) because {facts.kvm_phrase()}; "
                   "doctor boots no guest under TCG")
        return self.report(True, True, join_reasons(
            f"{QEMU_BINARY} {system.version or '(version unknown)'} and qemu-img run (version check)", why),
            accel=accel)
