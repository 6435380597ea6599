"""The QEMU backend, ``-M microvm``: the command line, the process, and QMP for pause.

Every choice here was measured on a TCG host (see DESIGN.md, "This machine"): the ELF
vmlinux boots via PVH; ``tsc_early_khz`` stops one boot in ten from hanging in PIT
calibration; virtio-rng stops the first /dev/random read stalling; the agent channel is a
``virtserialport`` (a ``virtconsole`` is a tty and mangles bytes); ACPI stays on because the
kernel finds virtio-mmio devices only through it. What differs for an aarch64 guest
(``-M virt``, its CPU model and console) is in qemu_arch.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvm.core.bootimage import BootImage
from mvm.core.errors import HostToolMissing, UsageError, VmError
from mvm.runtime.backends.base import (
    DIRECT_ROOT_ARGS,
    NOT_EXERCISED,
    BackendReport,
    Capabilities,
    Host,
    HostFacts,
    Spawned,
    VmBackend,
    dial_until_open,
    encoded_argv,
    in_thread,
    join_reasons,
)
from mvm.runtime.backends.qemu_arch import QEMU_GUEST_ARCHES, qemu_guest_arch
from mvm.runtime.process import spawn_tied

if TYPE_CHECKING:
    from mvm.core.state import VmPaths, VmRecord
    from mvm.runtime.backends.base import AgentHandler
    from mvm.runtime.volumes import Mount

QEMU_BINARY = "qemu-system-x86_64"
AGENT_PORT_NAME = "org.mvm.agent"
BOOT_PORT_NAME = "org.mvm.boot"
QMP_TIMEOUT_S = 10.0
# mvm's own kernel takes its local APIC timer's period instead of calibrating it, a 100 ms
# busy-wait under TCG, which has no TSC-deadline timer to skip it (the parameter is one of its
# source edits: build/kernel_configs/x86_64.edits.toml). QEMU's APIC timer, like KVM's, runs
# at 1 GHz: 1e9 / CONFIG_HZ (250, kernel_configs/x86_64.config) per jiffy.
LAPIC_TIMER_PERIOD_ARG = "lapic_timer_period=4000000"
TOOL_TIMEOUT_S = 120.0  # qemu-img, mkfs.ext4 for a VM's disks  # /init's boot markers: a port only root in the guest may open
BOOT_ARGS = QEMU_GUEST_ARCHES["x86_64"].boot_args


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


def _last_line(stream: Any) -> str:
    """The last line of what an exited process wrote to ``stream`` (a pipe), if any."""
    if stream is None:
        return ""
    lines = stream.read(65536).decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def kernel_cmdline(accel: str, arch: str = "x86_64") -> str:
    guest = qemu_guest_arch(arch)
    args = guest.boot_args
    if guest.tsc_early_khz and accel == "tcg":
        khz = host_tsc_khz()
        if khz:
            args += f" tsc_early_khz={khz}"
    return args


def qemu_binary(arch: str = "x86_64") -> str:
    guest = qemu_guest_arch(arch)
    path = shutil.which(guest.binary)
    if path is None:
        raise HostToolMissing(guest.binary, guest.package)
    return path


SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"  # QEMU's seccomp filter
SECCOMP_OFF_FOR_BENCHMARK = "MVM_QEMU_SECCOMP_OFF_FOR_BENCHMARK"  # benchmarks/seccomp_bench.py only


def seccomp_wanted(record: VmRecord) -> bool:
    """QEMU runs under its seccomp filter, unless the benchmark of its cost turned it off in the
    supervisor's environment for an accessible (dev) image; a sealed image's VM always has it
    (and `doctor` names a running VM without it)."""
    return record.sealed or os.environ.get(SECCOMP_OFF_FOR_BENCHMARK) != "1"


@dataclass
class QemuSpec:
    """Everything one QEMU boot needs; :meth:`argv` turns it into a command line."""

    kernel: Path
    initrd: Path | None  # None: a kernel that mounts the root disk itself (ours, every driver built in)
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
    # Guest RAM in a file rather than anonymous memory: shared (a VM that may be snapshotted:
    # the snapshot is then a copy of this file plus a little device state), or private (a
    # clone: a copy-on-write mapping of a snapshot's file, which stays untouched).
    ram_file: Path | None = None
    ram_shared: bool = True
    incoming: bool = False  # -incoming defer: wait for a migration stream (a restore) over QMP
    arch: str = "x86_64"  # the guest's CPU architecture: qemu_arch.py's table says how to run it
    extra_args: list[str] = field(default_factory=list)
    seccomp: bool = True  # -sandbox on: off only for benchmarks/ on a dev image (see seccomp_wanted)

    def root_args(self) -> str:
        """Without an initramfs (mvm's own kernel) the kernel mounts the root disk and starts
        /init itself, and is told its local APIC timer's period (LAPIC_TIMER_PERIOD_ARG)."""
        if self.initrd is not None or self.root_disk is None:
            return ""
        return f"{DIRECT_ROOT_ARGS} {LAPIC_TIMER_PERIOD_ARG}" if self.arch == "x86_64" else DIRECT_ROOT_ARGS

    def argv(self) -> list[str]:
        guest = qemu_guest_arch(self.arch)
        machine = guest.machine
        memory: list[str] = []
        if self.ram_file is not None:
            machine += ",memory-backend=ram0"
            memory = ["-object", f"memory-backend-file,id=ram0,size={self.memory_mib}M,mem-path={self.ram_file},"
                                 f"share={'on' if self.ram_shared else 'off'}"]
        argv = [
            qemu_binary(self.arch),
            "-M", machine, *memory, "-accel", self.accel,
            "-m", str(self.memory_mib), "-smp", str(self.vcpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            *(["-sandbox", SANDBOX] if self.seccomp else []),
            "-kernel", str(self.kernel), *(["-initrd", str(self.initrd)] if self.initrd is not None else []),
            "-append", f"{kernel_cmdline(self.accel, self.arch)} {self.root_args()} {self.boot_args}".strip(),
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
        elif guest.tcg_cpu is not None:
            argv += ["-cpu", guest.tcg_cpu]
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv + self.extra_args


def create_overlay(base: Path, overlay: Path, base_format: str = "raw") -> None:
    """A qcow2 whose writes stay in the VM's directory; the artifact (or the snapshot's frozen
    disk) is never written."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise HostToolMissing("qemu-img", "qemu-utils")
    try:
        proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", base_format,
                               str(overlay)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VmError(f"qemu-img did not create {overlay} within {TOOL_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        raise VmError(f"cannot create the disk overlay {overlay}: {proc.stderr.strip()}")


def rebase_onto_base(disk: Path) -> None:
    """Make ``disk`` hold everything between it and the bottom of its backing chain (the
    image's read-only rootfs), so a snapshot of a clone never needs the snapshot the clone
    came from. `qemu-img rebase` in safe mode copies just the clusters that differ."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise HostToolMissing("qemu-img", "qemu-utils")
    try:
        info = subprocess.run([qemu_img, "info", "--backing-chain", "--output=json", "-U", str(disk)],
                              capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=True)
        base = json.loads(info.stdout)[-1]["filename"]
        subprocess.run([qemu_img, "rebase", "-q", "-f", "qcow2", "-b", base, "-F", "raw", str(disk)],
                       capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=True)
    except subprocess.CalledProcessError as err:
        raise VmError(f"cannot make the snapshot's disk stand alone: {(err.stderr or '').strip()[:300]}") from None
    except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as err:
        raise VmError(f"cannot make the snapshot's disk stand alone: {err}") from None


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


SHARED_MEMORY = Path("/dev/shm")


def ram_path(paths: VmPaths) -> Path:
    """Where a VM keeps its guest RAM as a shared file (so a snapshot is a copy of it): in
    tmpfs, since a file on disk would be written back as the guest dirties its memory. Named
    after the VM's directory, so a crashed supervisor's file is found again and removed."""
    digest = hashlib.sha256(str(paths.dir.resolve()).encode()).hexdigest()[:16]
    return SHARED_MEMORY / f"mvm-ram-{digest}"


def saved_ram(record: VmRecord) -> Path | None:
    """A clone's guest RAM: the snapshot's RAM file, mapped privately (None: not such a clone)."""
    if record.restore_from is None:
        return None
    saved = Path(record.restore_from) / "ram"
    return saved if saved.exists() else None


def create_ram_file(path: Path, memory_mib: int) -> bool:
    """A fresh, private RAM file (QEMU would make it 0644, and reuse old bytes); False when
    there is no tmpfs to put it in (the VM then gets anonymous memory)."""
    if not SHARED_MEMORY.is_dir() or not os.access(SHARED_MEMORY, os.W_OK):
        return False
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory_mib << 20)
    finally:
        os.close(fd)
    return True


def image_spec(image: BootImage, overlay: Path, accel: str, *, vcpus: int | None = None,
               memory_mib: int | None = None) -> QemuSpec:
    return QemuSpec(kernel=image.vmlinux, initrd=image.initrd, root_disk=overlay, accel=accel,
                    vcpus=vcpus or image.vcpus, memory_mib=memory_mib or image.memory_mib, arch=image.arch)


class QemuBackend(VmBackend):
    """A microVM under QEMU: KVM when a real probe boot works, else TCG."""

    name = "qemu"
    process_label = "QEMU"
    volume_kind = "virtiofs"
    capabilities = Capabilities(snapshots=True, pause_resume=True, vsock=False, tap_networking=False,
                                port_forwarding=True, detach=True, console=True, isolation="microvm")

    def availability(self, host: Host) -> tuple[bool, str]:
        missing = [tool for tool in (QEMU_BINARY, "qemu-img") if shutil.which(tool) is None]
        if missing:
            return False, f"{' and '.join(missing)} not installed (run `mvmctl bootstrap`)"
        return True, "QEMU is installed (KVM when the probe boot works, else TCG)"

    def accel(self, host: Host) -> str:
        from mvm.runtime.kvm import select_accel

        return select_accel(host.home, may_probe=host.may_probe)[0]

    def arch_refusal(self, arch: str) -> str | None:
        if arch not in QEMU_GUEST_ARCHES:
            return f"the QEMU backend has no machine for {arch} guests"
        return None

    def availability_for(self, image: BootImage, host: Host) -> tuple[bool, str]:
        ok, why = super().availability_for(image, host)
        if not ok:
            return ok, why
        guest = qemu_guest_arch(image.arch)
        if shutil.which(guest.binary) is None:
            return False, (f"{guest.binary} is not installed, and runs {image.arch} guests "
                           f"(apt-get install {guest.package})")
        return ok, why

    def accel_for(self, image: BootImage, host: Host) -> str:
        """KVM only for the host's own architecture (and only if the probe boot works)."""
        from mvm.core.arch import is_native

        return self.accel(host) if is_native(image.arch) else "tcg"

    def prepare(self, image: BootImage, record: VmRecord, staged: VmPaths) -> None:
        if record.restore_from is not None:  # a clone: its writes go over the snapshot's frozen disk
            create_overlay(Path(record.restore_from) / "disk.qcow2", staged.overlay, "qcow2")
            return
        create_overlay(image.rootfs, staged.overlay)
        if image.data_disk_bytes:
            create_data_disk(staged.data_disk, image.data_disk_bytes)

    def spawn(self, image: BootImage, record: VmRecord, paths: VmPaths) -> Spawned:
        spec = image_spec(image, paths.overlay, record.accel, vcpus=record.vcpus, memory_mib=record.memory_mib)
        spec.arch = record.arch
        spec.agent_socket = paths.agent_socket
        spec.boot_socket = paths.boot_socket
        argv = encoded_argv(record)
        if argv is not None:
            spec.boot_args = f"mvm.argv={argv}"
        if record.network == "allow-list":  # no NIC: egress through the agent (guest/init, agent/egress.py)
            spec.boot_args = f"{spec.boot_args} mvm.egress=1".lstrip()
        spec.qmp_socket = paths.qmp_socket
        spec.seccomp = seccomp_wanted(record)
        if record.network == "open":  # user-mode networking: out through QEMU's own stack, as the host's user
            spec.extra_args += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
        if image.data_disk_bytes and record.restore_from is None:
            spec.data_disk = paths.data_disk
        self._memory(spec, record, paths)
        if record.volumes:
            self._volumes(spec, record, paths)
        argv = spec.argv()
        spawned = time.monotonic()
        process = spawn_tied(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if record.restore_from is None or saved_ram(record) is None:  # (a stream: the supervisor loads it)
            return Spawned(process, spawned)
        try:
            agent_fd = self._restore_now(process, record, paths)
        except BaseException as err:
            process.kill()
            process.wait()
            if not isinstance(err, VmError):
                raise
            said = _last_line(process.stderr)  # QEMU's own last word says more (a state it could not load)
            raise VmError(f"could not restore snapshot {record.snapshot}: {err.message}"
                          + (f" (QEMU said: {said})" if said else ""), err.fix) from None
        return Spawned(process, spawned, agent_fd=agent_fd, restored=time.monotonic())

    @staticmethod
    def _restore_now(process: subprocess.Popen, record: VmRecord, paths: VmPaths) -> int:
        """A clone of a RAM-file snapshot, restored and running before the supervisor starts,
        its hello and identity waiting on its agent's channel (backends/qemu_restore.py)."""
        from mvm.core import protocol
        from mvm.runtime.backends import qemu_restore

        assert record.restore_from is not None
        snapshot = Path(record.restore_from)
        manifest = json.loads((snapshot / "manifest.json").read_text())["manifest"]
        resumed = manifest.get("purpose") == "suspend"
        return qemu_restore.restore_ram_file_snapshot(
            paths.qmp_socket, paths.agent_socket, snapshot / "state",
            expected_version=str(manifest["hypervisor_version"]),
            agent_frames=lambda: protocol.HOST_HELLO + protocol.identity(record.name, resumed=resumed),
            alive=lambda: process.poll() is None)

    @staticmethod
    def _memory(spec: QemuSpec, record: VmRecord, paths: VmPaths) -> None:
        """A cold VM and a clone of a stream snapshot keep RAM in a shared file of their own;
        a clone of a RAM-file snapshot maps the snapshot's file privately."""
        if record.restore_from is not None:
            spec.incoming = True
            saved = saved_ram(record)
            if saved is not None:
                spec.ram_file, spec.ram_shared = saved, False
                return
        if create_ram_file(ram_path(paths), spec.memory_mib):
            spec.ram_file = ram_path(paths)

    @staticmethod
    def _volumes(spec: QemuSpec, record: VmRecord, paths: VmPaths) -> None:
        """virtiofs: a jailed virtiofsd per volume (runtime/virtiofs.py); vhost-user needs the
        guest's RAM in shared memory, which a cold VM's RAM file is."""
        from mvm.runtime import virtiofs, volumes

        if spec.ram_file is None or not spec.ram_shared:
            raise VmError(f"VM {record.name} has volumes, which need its RAM in shared memory, and there is no "
                          f"writable {SHARED_MEMORY} here", "mount a tmpfs on /dev/shm, or leave the volumes out")
        mounts = tuple(volumes.Mount.from_dict(v) for v in record.volumes)
        # vhost-user (libvhost-user) serves only modern virtio; microvm's virtio-mmio defaults to
        # legacy. Only here: a VM with volumes is never snapshotted, so no saved state changes.
        spec.extra_args += ["-global", "virtio-mmio.force-legacy=false",
                            *virtiofs.start_for_qemu(paths.dir, mounts, record.uids["entrypoint"])]
        spec.boot_args = f"{spec.boot_args} {volumes.boot_words(mounts)}".strip()

    def check_volumes(self, mounts: tuple[Mount, ...]) -> None:
        """virtiofs, run as described in runtime/virtiofs.py: it needs root, and an rw volume
        whose directory root owns is refused."""
        if not mounts:
            return
        from mvm.runtime import virtiofs, volumes

        virtiofs.check_host()
        volumes.check_rw_owner(mounts)

    async def restore(self, paths: VmPaths, record: VmRecord, snapshot: Path, hypervisor_version: str) -> None:
        from mvm.runtime.backends import qemu_migration  # (asyncio: not before QEMU has started)

        async with qemu_migration.qmp_session(paths.qmp_socket, record.name) as qmp:
            await qemu_migration.load(qmp, snapshot / "state", ram_file_kind=(snapshot / "ram").exists(),
                                      expected_version=hypervisor_version)

    async def snapshot(self, paths: VmPaths, record: VmRecord, dest: Path) -> dict[str, str]:
        """Stop the VM and save it into ``dest``; it stays stopped until :meth:`resume`."""
        if paths.data_disk.exists():
            raise UsageError(f"VM {record.name} has a data disk (/data), which its snapshot's clones would have to share",
                             "snapshot a VM of an image without one (mvm.toml's data_disk, `build --data-disk`)")
        # RAM in a shared file of its own: saved as a file; else (a private map of a snapshot's
        # file, or anonymous memory) inside the migration stream.
        shared = ram_path(paths) if saved_ram(record) is None and ram_path(paths).exists() else None
        from mvm.runtime.backends import qemu_migration

        async with qemu_migration.qmp_session(paths.qmp_socket, record.name) as qmp:
            saved = await qemu_migration.save(qmp, dest, ram_file=shared, disk=paths.overlay)
        if record.restore_from is not None:  # a clone's disk sits on its snapshot's: stand alone
            await in_thread(rebase_onto_base, dest / "disk.qcow2")
        return saved

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
        return [*super().runtime_files(paths), paths.boot_socket, paths.qmp_socket, paths.overlay, ram_path(paths)]

    def release(self, paths: VmPaths, record: VmRecord) -> bool:
        """A supervisor killed with SIGKILL left its RAM file in tmpfs: guest memory (and,
        should PDEATHSIG have missed one, a virtiofsd)."""
        ram_path(paths).unlink(missing_ok=True)
        if record.volumes:
            from mvm.runtime import virtiofs

            virtiofs.stop_stale(virtiofs.pid_file(paths.dir))
        return True

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
        arm = facts.tools.get(QEMU_GUEST_ARCHES["aarch64"].binary)
        aarch64 = ("aarch64 guests: " + (f"{arm.name} {arm.version or '(version unknown)'} (always tcg)" if arm.ok
                                         else f"{arm.problem} (apt-get install {arm.package})")) if arm else ""
        return self.report(True, True, join_reasons(
            f"{QEMU_BINARY} {system.version or '(version unknown)'} and qemu-img run (version check)", why, aarch64),
            accel=accel)
