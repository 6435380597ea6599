"""The Workload IR: one validated description of a guest.

``mvm.toml`` (core.manifest), the declaration SDK and templates all compile to a
:class:`Workload`; the builder and the runtime consume nothing else. The model is frozen and
serialises canonically (:meth:`Workload.canonical_json`) so it can key the artifact store.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mvm.core.arch import GuestArchName

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
AGENT_UID = 990
SEALED_ENTRYPOINT_UID = 1000
DEV_ENTRYPOINT_UID = 0

Hypervisor = Literal["auto", "qemu", "docker", "firecracker", "apple-container", "libkrun", "lima"]
KernelName = Literal["auto", "debian", "mvm"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EntrypointKind(str, Enum):
    SHELL = "shell"
    COMMAND = "command"
    SERVICES = "services"


class RestartPolicy(str, Enum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class Service(_Frozen):
    """A long-running program that /init starts and restarts by ``restart``."""

    name: str
    command: tuple[str, ...] = Field(min_length=1)
    restart: RestartPolicy = RestartPolicy.ON_FAILURE


class Entrypoint(_Frozen):
    """Exactly one of shell, command or services."""

    kind: EntrypointKind
    shell: str | None = None
    command: tuple[str, ...] | None = None
    services: tuple[Service, ...] = ()

    @model_validator(mode="after")
    def _one_form(self) -> "Entrypoint":
        given = {
            EntrypointKind.SHELL: self.shell is not None,
            EntrypointKind.COMMAND: self.command is not None,
            EntrypointKind.SERVICES: bool(self.services),
        }
        if [k for k, v in given.items() if v] != [self.kind]:
            raise ValueError("entrypoint needs exactly one of shell, command or services")
        return self


class ExtraFile(_Frozen):
    """A file written into the image at an absolute ``path``."""

    path: str
    content: str
    mode: int = Field(default=0o644, ge=0, le=0o7777)

    @model_validator(mode="after")
    def _absolute(self) -> "ExtraFile":
        if not self.path.startswith("/") or ".." in self.path.split("/"):
            raise ValueError(f"extra file path {self.path!r} must be absolute, without '..'")
        return self


class Uids(_Frozen):
    """Every producer of a Workload gets these rules, not only mvm.toml's parser."""

    agent: int = Field(default=AGENT_UID, ge=1, le=65534)  # the agent never runs as root
    entrypoint: int = Field(ge=0, le=65534)

    @model_validator(mode="after")
    def _distinct(self) -> "Uids":
        if self.agent == self.entrypoint:
            raise ValueError("the entrypoint must not share the agent's uid (it could signal or trace it)")
        return self


class NetworkMode(str, Enum):
    DENY = "deny"
    ALLOW_LIST = "allow-list"
    OPEN = "open"


class Forward(_Frozen):
    """host_addr:host_port -> guest_port (TCP)."""

    host_addr: str = "127.0.0.1"
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)


class Network(_Frozen):
    mode: NetworkMode = NetworkMode.DENY
    allow: tuple[str, ...] = ()
    forward: tuple[Forward, ...] = ()


class Volume(_Frozen):
    """A host directory shared into the guest (runtime only; not part of the image)."""

    host: str
    guest: str
    readonly: bool = True


class Workload(_Frozen):
    """The IR. ``dev`` decides sealed vs accessible; see :meth:`from_parts` for defaults."""

    name: str
    entrypoint: Entrypoint
    packages: tuple[str, ...] = ()
    extra_files: tuple[ExtraFile, ...] = ()
    uids: Uids
    dev: bool
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=256, ge=64)
    data_disk_bytes: int | None = Field(default=None, ge=1024**2)
    network: Network = Network()
    volumes: tuple[Volume, ...] = ()
    hypervisor: Hypervisor = "auto"
    # "auto": ours when this home has it built, else Debian's (build/kernel_source.default_kernel,
    # settled before the store key is made, so an artifact always names the one it boots)
    kernel: KernelName = "auto"
    arch: GuestArchName = "x86_64"  # the guest's CPU (core/arch.py); aarch64 runs emulated here

    @property
    def accessible(self) -> bool:
        """An accessible image offers a console; a sealed one never does."""
        return self.dev

    @property
    def sealed(self) -> bool:
        return not self.dev

    @staticmethod
    def default_dev(kind: EntrypointKind) -> bool:
        """shell -> accessible (dev); command or services -> sealed."""
        return kind is EntrypointKind.SHELL

    @staticmethod
    def default_entrypoint_uid(dev: bool) -> int:
        return DEV_ENTRYPOINT_UID if dev else SEALED_ENTRYPOINT_UID

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def validate_name(name: str) -> str:
    """VM and workload names become directory names: keep them short and plain."""
    if not NAME_RE.match(name):
        raise ValueError(
            f"{name!r} is not a valid name: use 1-63 lowercase letters, digits, '-', '_' or '.',"
            " starting with a letter or digit"
        )
    return name
