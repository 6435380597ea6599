"""Backends, one module each, behind one interface (base.py), and the registry that names them.

Nothing outside this package compares backend names: code asks the VM's backend object
(``get(record.backend)``) what it can do, and a unit test parses src/mvm to hold everyone to
that. The registry is in priority order; modules are imported only when their backend is
asked for, so the per-VM supervisor loads just its own.

A new backend: a module here with a :class:`~mvm.runtime.backends.base.VmBackend` subclass
(name, capabilities, availability, spawn, serve_agent_channel, doctor, and whichever optional
hooks it supports), one line in ``_REGISTRY``, and its name in core/workload.py's
``Hypervisor`` (a test checks the two agree).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from mvm.core.errors import BackendUnavailable, UsageError
from mvm.runtime.backends.base import Capabilities, Host, VmBackend

__all__ = ["Capabilities", "Choice", "Host", "VmBackend", "get", "select_backend", "ALL_BACKENDS", "PRIORITY"]

# name -> (module, class), in the order `up` tries them when none is named.
_REGISTRY: dict[str, tuple[str, str]] = {
    "firecracker": ("mvm.runtime.backends.firecracker", "FirecrackerBackend"),
    "qemu": ("mvm.runtime.backends.qemu", "QemuBackend"),
    "docker": ("mvm.runtime.backends.docker", "DockerBackend"),
    "apple-container": ("mvm.runtime.backends.elsewhere", "AppleContainerBackend"),
    "libkrun": ("mvm.runtime.backends.elsewhere", "LibkrunBackend"),
    "lima": ("mvm.runtime.backends.elsewhere", "LimaBackend"),
}
ALL_BACKENDS: tuple[str, ...] = tuple(_REGISTRY)
_instances: dict[str, VmBackend] = {}


def get(name: str) -> VmBackend:
    """The backend called ``name``; UsageError for a name no backend has."""
    backend = _instances.get(name)
    if backend is None:
        try:
            module, cls = _REGISTRY[name]
        except KeyError:
            raise UsageError(f"unknown hypervisor {name!r}", f"use one of: auto, {', '.join(ALL_BACKENDS)}") from None
        backend = _instances[name] = getattr(importlib.import_module(module), cls)()
    return backend


def all_backends() -> list[VmBackend]:
    return [get(name) for name in ALL_BACKENDS]


PRIORITY: tuple[str, ...] = ("firecracker", "qemu", "docker")  # tried in this order when none is named


@dataclass(frozen=True)
class Choice:
    backend: VmBackend
    reason: str

    @property
    def name(self) -> str:
        return self.backend.name


def select_backend(requested: str | None, available: Callable[[VmBackend], tuple[bool, str]]) -> Choice:
    """The backend to use. ``available(backend)`` says whether it can run here, and why (not)."""
    if requested and requested != "auto":
        backend = get(requested)
        ok, why = available(backend)
        if not ok:
            raise BackendUnavailable(f"{requested} is not available here: {why}",
                                     "`mvmctl doctor` lists every backend and what it needs")
        return Choice(backend, f"{requested} was asked for")
    passed = []
    for name in PRIORITY:
        backend = get(name)
        ok, why = available(backend)
        if ok:
            skipped = "; ".join(passed)
            return Choice(backend, f"{name} is the first available in the order {' > '.join(PRIORITY)}"
                          + (f" ({skipped})" if skipped else ""))
        passed.append(f"{name}: {why}")
    raise BackendUnavailable("no backend can run a VM here: " + "; ".join(passed),
                             "run `mvmctl bootstrap` to install QEMU, or start dockerd")
