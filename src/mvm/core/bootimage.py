"""What starting a VM needs from a built artifact, read from its ``artifact.json`` with plain json.

The build side writes and validates that record with pydantic (core/artifact.py). Starting a
VM reads a dozen of its fields, and does so before QEMU can start, where every millisecond
is boot time: importing pydantic and building its models costs ~130 ms, this costs ~0. The
store is content-addressed and only ever holds records the builder validated, so nothing is
lost by not validating them again here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvm.core.arch import DEFAULT_ARCH, GUEST_ARCHES
from mvm.core.errors import UsageError

# The file names in an artifact directory (core/artifact.py uses these too).
ARTIFACT_FILE = "artifact.json"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.cpio"
KERNEL_CONFIG_FILE = "kernel.config"  # our kernel's .config, beside its vmlinux (Debian's is in its .deb)
ROOTFS_FILE = "rootfs.ext4"
DEBS_FILE = "debs.txt"  # the .deb file names (one a line) of the lock it was built from: `prune` keeps them

# The cold-boot budget, QEMU's (or the container's) start to agent-ready, p50 in ms, for each
# accelerator a VM can run under: what `mvmctl perf boot` gates on, recorded in artifact.json
# as bootBudgetMs. kvm: the design's floor for a microVM. tcg: what the Debian cloud kernel
# reaches under emulation on the reference host (2 cores, benchmarks/README.md); the 1.0 s goal
# of a smaller kernel is not met yet. container: Docker's start (its vfs driver copies the
# root tree). expectedBootMs, the one number the design names (the supervisor gives up on a
# guest after 20x it), is the slowest of them. These are an x86_64 guest's; an aarch64 guest
# (always emulated here) has its own, larger tcg budget (core/arch.py).
BOOT_BUDGET_MS = dict(GUEST_ARCHES[DEFAULT_ARCH].boot_budget_ms)
EXPECTED_BOOT_MS = max(BOOT_BUDGET_MS.values())


NETWORK_MODES = ("deny", "allow-list", "open")  # a BootImage's network_mode


@dataclass(frozen=True)
class PortForward:
    """A host TCP port forwarded to a port on the guest's loopback."""

    host_addr: str
    host_port: int
    guest_port: int

    @classmethod
    def parse(cls, spec: str) -> PortForward:
        """``[ADDR:]HOST_PORT:GUEST_PORT`` (ADDR may be ``[::1]``); ADDR defaults to 127.0.0.1."""
        fix = "e.g. 8080:80, 127.0.0.1:8080:80 or [::1]:8080:80"
        addr, rest = "127.0.0.1", spec
        if spec.startswith("["):
            close = spec.find("]:")
            if close < 0:
                raise UsageError(f"port forward {spec!r} has an unclosed [ADDR]", fix)
            addr, rest = spec[1:close], spec[close + 2:]
        parts = rest.split(":")
        if not spec.startswith("[") and len(parts) == 3:
            addr, parts = parts[0], parts[1:]
        if len(parts) != 2 or not all(parts):
            raise UsageError(f"port forward {spec!r} is not [ADDR:]HOST_PORT:GUEST_PORT", fix)
        import ipaddress  # (here: `up` without -p does not pay for it)

        try:
            addr = str(ipaddress.ip_address(addr))
        except ValueError:
            raise UsageError(f"port forward {spec!r}: {addr!r} is not an IP address", fix) from None
        host_port, guest_port = (check_port(p, f"port forward {spec!r}") for p in parts)
        return cls(addr, host_port, guest_port)

    @property
    def host(self) -> str:
        """ADDR:PORT as the user writes it ([::1]:8080 for IPv6)."""
        return f"[{self.host_addr}]:{self.host_port}" if ":" in self.host_addr else f"{self.host_addr}:{self.host_port}"


def check_port(text: str | int, what: str) -> int:
    """A TCP port from 1 to 65535; one line that says which rule ``text`` broke."""
    word = str(text)
    if not word.isascii() or not word.isdigit():
        raise UsageError(f"{what}: {word[:20]!r} is not a port number", "ports are whole numbers from 1 to 65535")
    port = int(word)
    if port == 0:
        raise UsageError(f"{what}: port 0 is not a port one can forward",
                         "name a port from 1 to 65535")
    if port > 65535:
        raise UsageError(f"{what}: port {port} is over 65535, the highest TCP port", "name a port from 1 to 65535")
    return port


def parse_host(spec: str) -> tuple[str | None, int]:
    """``HOST_PORT``, ``ADDR:HOST_PORT`` or ``[ADDR]:HOST_PORT`` (what `forward rm` takes): the
    address (None: any) and the port."""
    fix = "e.g. 8080, 127.0.0.1:8080 or [::1]:8080"
    addr: str | None = None
    port = spec
    if spec.startswith("["):
        close = spec.find("]:")
        if close < 0:
            raise UsageError(f"host port {spec!r} has an unclosed [ADDR]", fix)
        addr, port = spec[1:close], spec[close + 2:]
    elif ":" in spec:
        addr, port = spec.rsplit(":", 1)
    if addr is not None:
        import ipaddress

        try:
            addr = str(ipaddress.ip_address(addr))
        except ValueError:
            raise UsageError(f"host port {spec!r}: {addr!r} is not an IP address", fix) from None
    return addr, check_port(port, f"host port {spec!r}")


@dataclass(frozen=True)
class BootImage:
    """A built artifact as the runtime sees it: its files and the facts a VM is started from."""

    path: Path  # the artifact's directory in the store
    key: str
    name: str
    vcpus: int
    memory_mib: int
    data_disk_bytes: int | None
    expected_boot_ms: int
    kernel_release: str
    accessible: bool
    sealed: bool
    entrypoint_kind: str  # shell | command | services
    agent_uid: int
    entrypoint_uid: int
    hypervisor: str  # what mvm.toml asked for; "auto" when it did not
    forwards: tuple[PortForward, ...]  # mvm.toml's [network] forward
    network_mode: str = "deny"  # mvm.toml's [network] mode
    allow: tuple[str, ...] = ()  # mvm.toml's [network] allow (an allow-list's entries)
    volumes: tuple[tuple[str, str, bool], ...] = ()  # mvm.toml's [[volumes]]: (host, guest, readonly)
    boot_budget: tuple[tuple[str, int], ...] = ()  # artifact.json's bootBudgetMs (none before it existed)
    agent_binary: str = "real"  # artifact.json's agentBinary: "real", or what a test image carries instead
    kernel_name: str = "debian"  # mvm.toml's kernel: "mvm" (ours) has every driver built in and needs no initramfs
    arch: str = "x86_64"  # mvm.toml's arch: the guest's CPU (core/arch.py)

    def boot_budget_ms(self, accel: str) -> int:
        """The p50 budget to agent-ready under ``accel`` (kvm, tcg, container)."""
        return dict(self.boot_budget).get(accel) or BOOT_BUDGET_MS.get(accel) or self.expected_boot_ms

    @property
    def vmlinux(self) -> Path:
        return self.path / KERNEL_FILE

    @property
    def initrd(self) -> Path | None:
        """The initramfs that loads the Debian kernel's virtio modules; our kernel needs none."""
        return None if self.kernel_name == "mvm" else self.path / INITRD_FILE

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS_FILE

    @classmethod
    def open(cls, path: Path) -> BootImage:
        missing = [name for name in (KERNEL_FILE, INITRD_FILE, ROOTFS_FILE) if not (path / name).is_file()]
        if missing == [INITRD_FILE] and _kernel_name(path) == "mvm":
            missing = []
        if missing:
            raise UsageError(f"the image in {path} is damaged: {', '.join(missing)} missing",
                             "build it again with `mvmctl build --no-cache`")
        try:
            record = json.loads((path / ARTIFACT_FILE).read_text())
            workload = record["workload"]
            return cls(
                path=path, key=record["key"], name=record["name"], vcpus=record["vcpus"],
                memory_mib=record["memoryMib"], data_disk_bytes=record.get("dataDiskBytes"),
                expected_boot_ms=record["expectedBootMs"], kernel_release=record["kernelRelease"],
                accessible=record["accessible"], sealed=record["sealed"], entrypoint_kind=record["entrypointKind"],
                agent_uid=record["uids"]["agent"], entrypoint_uid=record["uids"]["entrypoint"],
                hypervisor=workload.get("hypervisor") or "auto",
                forwards=tuple(PortForward(f["host_addr"], f["host_port"], f["guest_port"])
                               for f in workload["network"]["forward"]),
                network_mode=workload["network"].get("mode", "deny"),
                allow=tuple(str(a) for a in workload["network"].get("allow") or ()),
                volumes=declared_volumes(workload),
                boot_budget=_budget(record.get("bootBudgetMs")),
                agent_binary=str(record.get("agentBinary", "none recorded"))[:40],
                kernel_name="mvm" if workload.get("kernel") == "mvm" else "debian",
                arch=str(workload.get("arch") or "x86_64"),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"the image in {path} is unreadable ({type(err).__name__}: {err})",
                             "build it again with `mvmctl build --no-cache`") from None


def _kernel_name(path: Path) -> str:
    try:
        return "mvm" if json.loads((path / ARTIFACT_FILE).read_text())["workload"].get("kernel") == "mvm" else "debian"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "debian"


def declared_volumes(workload: dict[str, Any]) -> tuple[tuple[str, str, bool], ...]:
    """[[volumes]] of a Workload IR as JSON: (host, guest, readonly); the host path was made
    absolute (relative to mvm.toml) when it was read."""
    return tuple((str(v["host"]), str(v["guest"]), v.get("readonly", True) is not False)
                 for v in workload.get("volumes") or ())


def _budget(value: object) -> tuple[tuple[str, int], ...]:
    """bootBudgetMs as pairs (a frozen dataclass holds no dict); what is not {str: int > 0} is ignored."""
    if not isinstance(value, dict):
        return ()
    return tuple((k, v) for k, v in value.items()
                 if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0)
