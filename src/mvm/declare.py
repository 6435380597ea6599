"""The declaration SDK: ``@mvm.app(...)`` and its helpers describe a workload in Python.

::

    import mvm

    @mvm.app(name="hello", image=mvm.packages(["python3"]),
             entrypoint=mvm.command(["python3", "-m", "http.server"]),
             resources=mvm.resources(cpus=1, memory="256M"))
    def hello():
        ...

``mvmctl validate app.py``, ``build app.py`` and ``up app.py`` read these arguments with
:mod:`ast` (core.declaration) and never import the file, so they must be literals. When a
program does import the file, the decorator only records the declaration on the function
(``fn.__mvm_app__``) and boots nothing; the helpers return small frozen records. This module
is beside ``mvm.errors`` rather than in ``mvm.sdk`` so that using it does not load the
runtime SDK.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

F = TypeVar("F", bound=Callable[..., object])

__all__ = ["App", "Command", "LocalPath", "Network", "NixPackages", "Packages", "Resources", "Services",
           "Shell", "app", "command", "local_path", "network", "nix_packages", "packages", "resources",
           "services", "shell"]


@dataclass(frozen=True)
class LocalPath:
    """A host directory, relative to the declaring file: where relative paths (volumes) start."""

    path: str


@dataclass(frozen=True)
class Packages:
    """Debian packages for mvm's built-in builder."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class NixPackages:
    """Nix packages: accepted by ``validate``, refused by ``build`` until a Nix builder exists."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Network:
    """``mode``: deny | allow-list | open; ``allow``: host:port entries (allow-list only);
    ``forward``: ``[ADDR:]HOSTPORT:GUESTPORT`` specs."""

    mode: str = "deny"
    allow: tuple[str, ...] = ()
    forward: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resources:
    """``memory``: MiB as an int, or a size such as ``"512M"``; ``data_disk``: e.g. ``"8G"``."""

    cpus: int | None = None
    memory: int | str | None = None
    data_disk: str | None = None


@dataclass(frozen=True)
class Command:
    """Run this argv (no shell) as the guest's entrypoint; a sealed image by default."""

    argv: tuple[str, ...]


@dataclass(frozen=True)
class Shell:
    """An interactive shell as the entrypoint; an accessible (dev) image by default."""

    path: str = "/bin/sh"


@dataclass(frozen=True)
class Services:
    """Long-running programs by name: an argv, ``mvm.command([...])``, or
    ``{"command": [...], "restart": "always" | "on-failure" | "never"}``."""

    services: Mapping[str, object]


@dataclass(frozen=True)
class App:
    """What ``@mvm.app`` recorded on a function (``fn.__mvm_app__``)."""

    name: str | None = None
    source: LocalPath | None = None
    image: Packages | NixPackages | Sequence[str] | None = None
    entrypoint: Command | Shell | Services | None = None
    network: Network | Mapping[str, object] | None = None
    resources: Resources | None = None
    uids: int | Mapping[str, int] | None = None
    dev: bool | None = None
    volumes: Sequence[Mapping[str, object]] | None = None
    extra_files: Mapping[str, Mapping[str, object]] | None = None
    hypervisor: str | None = None
    kernel: str | None = None
    arch: str | None = None
    function: Callable[..., object] | None = field(default=None, compare=False)


def app(*, name: str | None = None, source: LocalPath | None = None,
        image: Packages | NixPackages | Sequence[str] | None = None,
        entrypoint: Command | Shell | Services | None = None,
        network: Network | Mapping[str, object] | None = None, resources: Resources | None = None,
        uids: int | Mapping[str, int] | None = None, dev: bool | None = None,
        volumes: Sequence[Mapping[str, object]] | None = None,
        extra_files: Mapping[str, Mapping[str, object]] | None = None,
        hypervisor: str | None = None, kernel: Literal["auto", "debian", "mvm"] | None = None,
        arch: Literal["x86_64", "aarch64"] | None = None) -> Callable[[F], F]:
    """Declare the workload this function belongs to; ``mvmctl up app.py`` builds and boots it.

    The arguments mean what mvm.toml's keys mean (``uids=1000`` is the entrypoint's uid,
    ``{"agent": ..., "entrypoint": ...}`` both). They must be literals: the CLI reads them
    from the file's text and never runs it. Calling this only records the declaration.
    """
    declared = App(name, source, image, entrypoint, network, resources, uids, dev, volumes, extra_files,
                   hypervisor, kernel, arch)

    def record(function: F) -> F:
        function.__mvm_app__ = App(**{**declared.__dict__, "function": function})  # type: ignore[attr-defined]
        return function

    return record


def local_path(path: str = ".") -> LocalPath:
    return LocalPath(path)


def packages(names: Sequence[str]) -> Packages:
    return Packages(tuple(names))


def nix_packages(names: Sequence[str]) -> NixPackages:
    return NixPackages(tuple(names))


def network(mode: Literal["deny", "allow-list", "open"] = "deny", allow: Sequence[str] = (),
            forward: Sequence[str] = ()) -> Network:
    return Network(mode, tuple(allow), tuple(forward))


def resources(cpus: int | None = None, memory: int | str | None = None, data_disk: str | None = None) -> Resources:
    return Resources(cpus, memory, data_disk)


def command(argv: Sequence[str]) -> Command:
    return Command(tuple(argv))


def shell(path: str = "/bin/sh") -> Shell:
    return Shell(path)


def services(services: Mapping[str, object]) -> Services:
    return Services(dict(services))
