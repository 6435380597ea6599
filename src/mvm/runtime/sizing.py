"""What this host can give a VM, checked before anything boots.

A guest asked for more vCPUs than the host has threads, or more memory than the host has
free, does not fail cleanly: QEMU starts and the host thrashes (or the kernel's OOM killer
picks someone) while the guest boots slowly or not at all. So `up`/`run` refuse such a
request with the numbers, unless the caller says ``overcommit``.

Memory "free" is ``MemAvailable`` (what the kernel could hand out without swapping), bounded
by this process's cgroup limit if it has one, minus :data:`HOST_HEADROOM_MIB` kept back for
the host itself and for mvm's builder (apt, mkfs.ext4 and debugfs use a few hundred MiB).
Threads are the CPUs this process may run on (its affinity), bounded by a cgroup CPU quota.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mvm.core.errors import HostTooSmall

HOST_HEADROOM_MIB = 1024  # kept back for the host and the builder; documented in the README
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclass(frozen=True)
class HostCapacity:
    threads: int  # CPUs this process may use
    available_mib: int  # memory free now (MemAvailable, bounded by the cgroup)
    headroom_mib: int = HOST_HEADROOM_MIB

    @property
    def memory_for_guests_mib(self) -> int:
        return max(0, self.available_mib - self.headroom_mib)

    @classmethod
    def measure(cls) -> HostCapacity:
        return cls(threads=_threads(), available_mib=_available_mib())


def check_fits(vcpus: int, memory_mib: int, *, overcommit: bool = False,
               capacity: HostCapacity | None = None) -> HostCapacity:
    """Refuse (HostTooSmall, with the numbers) a VM the host cannot give what it asks for,
    unless ``overcommit``. Returns what was measured."""
    capacity = capacity or HostCapacity.measure()
    if overcommit:
        return capacity
    if vcpus > capacity.threads:
        raise HostTooSmall(f"{vcpus} vCPUs asked for, but this host has {capacity.threads} CPU threads for mvm",
                         f"ask for at most {capacity.threads} (--cpus), or pass --overcommit to boot it anyway")
    if memory_mib > capacity.memory_for_guests_mib:
        raise HostTooSmall(f"{memory_mib} MiB of memory asked for, but this host has {capacity.available_mib} MiB "
                         f"available, less {capacity.headroom_mib} MiB kept for the host and builder: "
                         f"{capacity.memory_for_guests_mib} MiB for guests",
                         "ask for less (--memory), stop another VM, or pass --overcommit to boot it anyway")
    return capacity


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def _threads() -> int:
    threads = len(allowed_cpus())
    quota = _cgroup_cpu_quota()
    return max(1, min(threads, math.ceil(quota))) if quota else threads


def _available_mib() -> int:
    available = _meminfo_kib("MemAvailable") * 1024
    limit = _cgroup_memory_left()
    if limit is not None:
        available = min(available, limit)
    return available // (1024 * 1024)


def _meminfo_kib(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    raise HostTooSmall(f"cannot read {field} from /proc/meminfo, so the host's free memory is unknown",
                     "pass --overcommit to start the VM without the check")


def _cgroup_paths() -> dict[str, Path]:
    """Controller ("" for cgroup v2) -> this process's cgroup directory."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            base = _CGROUP_ROOT / controller if controller else _CGROUP_ROOT
            found[controller] = base / parts[2].lstrip("/")
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_memory_left() -> int | None:
    """Bytes this process's cgroup may still use; None when it sets no limit (or is unreadable)."""
    paths = _cgroup_paths()
    for directory, limit_file, usage_file in ((paths.get(""), "memory.max", "memory.current"),
                                              (paths.get("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")):
        if directory is None:
            continue
        limit, usage = _read_int(directory / limit_file), _read_int(directory / usage_file)
        if limit is not None and limit < _NO_LIMIT and usage is not None:
            return max(0, limit - usage)
    return None


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup allows (2.0 = two CPUs); None for no quota."""
    paths = _cgroup_paths()
    if "" in paths:
        try:
            quota, period = (paths[""] / "cpu.max").read_text().split()
            if quota != "max" and int(period) > 0:
                return int(quota) / int(period)
        except (OSError, ValueError):
            pass
    directory = paths.get("cpu") or paths.get("cpuacct")
    if directory is not None:
        quota_us, period_us = _read_int(directory / "cpu.cfs_quota_us"), _read_int(directory / "cpu.cfs_period_us")
        if quota_us and period_us:  # (-1, no quota, is not all digits: None)
            return quota_us / period_us
    return None
