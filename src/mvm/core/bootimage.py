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

from mvm.core.errors import UsageError

# The file names in an artifact directory (core/artifact.py uses these too).
ARTIFACT_FILE = "artifact.json"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.cpio"
ROOTFS_FILE = "rootfs.ext4"

# The cold-boot budget, QEMU's (or the container's) start to agent-ready, p50 in ms, for each
# accelerator a VM can run under: what `mvmctl perf boot` gates on, recorded in artifact.json
# as bootBudgetMs. kvm: the design's floor for a microVM. tcg: what the Debian cloud kernel
# reaches under emulation on the reference host (2 cores, benchmarks/README.md); the 1.0 s goal
# of a smaller kernel is not met yet. container: Docker's start (its vfs driver copies the
# root tree). expectedBootMs, the one number the design names (the supervisor gives up on a
# guest after 20x it), is the slowest of them.
BOOT_BUDGET_MS = {"kvm": 300, "tcg": 2500, "container": 3000}
EXPECTED_BOOT_MS = max(BOOT_BUDGET_MS.values())


@dataclass(frozen=True)
class PortForward:
    """A host TCP port forwarded to a port on the guest's loopback."""

    host_addr: str
    host_port: int
    guest_port: int

    @classmethod
    def parse(cls, spec: str) -> PortForward:
        """``[ADDR:]HOST_PORT:GUEST_PORT``; ADDR defaults to 127.0.0.1."""
        parts = spec.rsplit(":", 2)
        try:
            ports = [int(p) for p in parts[-2:]]
            if len(parts) < 2 or not all(1 <= p <= 65535 for p in ports):
                raise ValueError
        except ValueError:
            raise UsageError(f"port forward {spec!r} is not [ADDR:]HOST_PORT:GUEST_PORT",
                             "e.g. 8080:80 or 127.0.0.1:8080:80") from None
        return cls(parts[0] if len(parts) == 3 else "127.0.0.1", ports[0], ports[1])


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
    volumes: int = 0  # how many [[volumes]] mvm.toml declares
    boot_budget: tuple[tuple[str, int], ...] = ()  # artifact.json's bootBudgetMs (none before it existed)

    def boot_budget_ms(self, accel: str) -> int:
        """The p50 budget to agent-ready under ``accel`` (kvm, tcg, container)."""
        return dict(self.boot_budget).get(accel) or BOOT_BUDGET_MS.get(accel) or self.expected_boot_ms

    @property
    def vmlinux(self) -> Path:
        return self.path / KERNEL_FILE

    @property
    def initrd(self) -> Path:
        return self.path / INITRD_FILE

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS_FILE

    @classmethod
    def open(cls, path: Path) -> BootImage:
        missing = [name for name in (KERNEL_FILE, INITRD_FILE, ROOTFS_FILE) if not (path / name).is_file()]
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
                network_mode=workload["network"].get("mode", "deny"), volumes=len(workload.get("volumes") or ()),
                boot_budget=_budget(record.get("bootBudgetMs")),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"the image in {path} is unreadable ({type(err).__name__}: {err})",
                             "build it again with `mvmctl build --no-cache`") from None


def _budget(value: object) -> tuple[tuple[str, int], ...]:
    """bootBudgetMs as pairs (a frozen dataclass holds no dict); what is not {str: int > 0} is ignored."""
    if not isinstance(value, dict):
        return ()
    return tuple((k, v) for k, v in value.items()
                 if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0)
