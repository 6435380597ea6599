"""What a build produces, and the metadata the runtime trusts about it.

``artifact.json`` sits beside the images in the store and is also copied into the image at
``/etc/mvm/artifact.json``. The host checks sealed/accessible from the store copy, never by
asking the guest.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mvm.core.bootimage import ARTIFACT_FILE
from mvm.core.workload import EntrypointKind, Workload


class ArtifactUids(BaseModel):
    agent: int
    entrypoint: int


class ArtifactHashes(BaseModel):
    """sha256 of each file, hex."""

    vmlinux: str
    initrd: str | None  # None: a kernel with its drivers built in needs no initramfs
    rootfs: str


class LockedPackage(BaseModel):
    """One .deb pinned by exact version and sha256. mvm.lock is read back from disk, so its
    file name must be a plain .deb name: it becomes a path in the package cache."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9+.-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9.+~:-]+$")
    arch: str = Field(pattern=r"^[a-z0-9-]+$")
    filename: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9+.~_%-]*\.deb$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ArtifactMeta(BaseModel):
    """artifact.json. Field names are camelCase where the design names them so."""

    model_config = ConfigDict(populate_by_name=True)

    key: str
    name: str
    builder_version: str = Field(alias="builderVersion")
    accessible: bool
    sealed: bool
    entrypoint_kind: EntrypointKind = Field(alias="entrypointKind")
    uids: ArtifactUids
    rootless_entrypoint: bool = Field(alias="rootlessEntrypoint")
    agent_binary: str = Field(default="real", alias="agentBinary")
    expected_boot_ms: int = Field(alias="expectedBootMs")
    # p50 ms to agent-ready by accelerator (core/bootimage.py BOOT_BUDGET_MS); `mvmctl perf boot` gates on it
    boot_budget_ms: dict[str, int] = Field(default_factory=dict, alias="bootBudgetMs")
    kernel_release: str = Field(alias="kernelRelease")
    # "debian" (the cloud kernel's package) or ours: its name in cache/kernels and config digest
    kernel: dict[str, str] = Field(default_factory=dict)
    vcpus: int
    memory_mib: int = Field(alias="memoryMib")
    data_disk_bytes: int | None = Field(default=None, alias="dataDiskBytes")
    # None only in the copy inside the image: it cannot hold its own hash.
    hashes: ArtifactHashes | None = None
    packages: list[LockedPackage]
    workload: Workload

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True) + "\n"


class Artifact(BaseModel):
    """A built artifact in the store: its directory and its metadata (the runtime reads its
    files and the facts it boots from through core/bootimage.py's BootImage)."""

    path: Path
    meta: ArtifactMeta

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        meta = ArtifactMeta.model_validate_json((path / ARTIFACT_FILE).read_text())
        return cls(path=path, meta=meta)
