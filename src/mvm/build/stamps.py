"""What a build's result depends on, hashed, so an unchanged workload finds its image at once.

Every store key (builder.store_key) covers the builder's version, the guest's sources, the
workload and the package lock. A *stamp* goes one step earlier: it hashes the raw inputs of a
workload (the bytes of mvm.toml and mvm.lock, and mvm.toml's real path, since relative
paths in it resolve against its directory, and the builder's version, guest sources, our
kernel's config fragments and which of our kernels are built; for a
Python declaration, the .py file's bytes, its lock and the chosen ``:NAME``) and
remembers the key they built, in ``store/stamps/<digest>``.

`up` and `run` of an unchanged directory are the common case. With a stamp they find the
image by hashing a few small files, without parsing mvm.toml or importing the builder
(~150 ms of pydantic and friends, paid before QEMU could start). A stamp is only a shortcut
into the content-addressed store: any change to an input is a different digest, which misses
and takes the ordinary build path; a stamp naming a key the store no longer has is ignored.
Builds with command-line overrides (``build --mem ...``) write no stamp, since their key is
not the directory's alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from mvm.core.bootimage import ARTIFACT_FILE, BootImage
from mvm.core.errors import UsageError
from mvm.core.state import MvmHome, write_atomic
from mvm.core.workdir import declaration, lock_file, manifest_file
from mvm.guest import GUEST_FILES, guest_file, protocol_source

# 2: precompiled guest Python (unchecked-hash pycs); 3: vsock modules in the initramfs
BUILDER_VERSION = "3"


def guest_sources_digest() -> str:
    """Changing /init, the agent or the protocol must change every key. Each file goes in with
    its name and length, so code moved from one agent module to the next changes it too."""
    digest = hashlib.sha256()
    files = [(name, guest_file(name)) for name in GUEST_FILES] + [("mvm/core/protocol.py", protocol_source())]
    for name, data in files:
        for part in (name.encode(), data):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def kernel_configs_digest() -> str:
    """Our kernel's config fragments and source edits (build/kernel_configs/): a new config is a
    new kernel, so a `kernel = "mvm"` workload must miss its stamp and build against it (cheap:
    a few small files)."""
    digest = hashlib.sha256()
    for config in sorted(p for p in Path(__file__).with_name("kernel_configs").iterdir() if p.is_file()):
        for part in (config.name.encode(), config.read_bytes()):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def built_kernels(home: MvmHome) -> bytes:
    """Which of our kernels this home has built: `kernel = "auto"` picks ours once it is there
    (kernel_source.default_kernel), so a kernel built since a stamp was written must miss it.
    A directory listing, to keep the builder's imports off this path."""
    try:
        names = sorted(d.name for d in home.kernels.iterdir() if d.name.startswith("mvm-") and
                       (d / "build.json").is_file())
    except OSError:
        names = []
    return "\n".join(names).encode()


def input_digest(path: str | Path, manifest: bytes | None = None, home: MvmHome | None = None) -> str | None:
    """The stamp digest of a workload; None if it has no mvm.toml or no mvm.lock yet (an
    unlocked workload is resolved against the package index, which a stamp cannot see).

    ``manifest``: the mvm.toml bytes a build actually read, when recording after it.
    ``home``: where the stamp lives, whose built kernels `kernel = "auto"` may choose.
    """
    file = manifest_file(path)
    try:
        if manifest is None:
            manifest = file.read_bytes()
        lock = lock_file(path).read_bytes()
    except OSError:
        return None
    digest = hashlib.sha256()
    declared = declaration(path)
    app = (declared[1] or "").encode() if declared else b""  # app.py:web and app.py:db differ
    for part in (b"stamp-1", BUILDER_VERSION.encode(), guest_sources_digest().encode(),
                 kernel_configs_digest().encode(), built_kernels(home) if home else b"",
                 os.path.realpath(file).encode(), manifest, lock,
                 *((app,) if app else ())):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def lookup(home: MvmHome, path: str | Path) -> BootImage | None:
    """The image an unchanged workload built before, if the store still has it.

    A hit does not move ``store/refs/<name>``: only builds do.
    """
    digest = input_digest(path, home=home)
    if digest is None:
        return None
    try:
        key = (home.stamps / digest).read_text().strip()
    except OSError:
        return None
    image_dir = home.store / key
    if not re.fullmatch(r"[0-9a-f]{64}", key) or not (image_dir / ARTIFACT_FILE).is_file():
        return None  # no such image (any more), or a damaged stamp: build, which writes a new one
    try:
        return BootImage.open(image_dir)
    except UsageError:
        return None  # a damaged image: the build replaces it


def record(home: MvmHome, path: str | Path, manifest: bytes, key: str) -> None:
    """Remember that the workload at ``path``, with ``manifest`` and its mvm.lock as it is now, built ``key``."""
    digest = input_digest(path, manifest, home)
    if digest is not None:
        write_atomic(home.stamps / digest, key + "\n")
    builds = [k for k in project_builds(home, path) if k != key]
    write_atomic(project_file(home, path), "".join(f"{k}\n" for k in [*builds[-(MAX_SLOTS - 1):], key]))


# A project's build slots: the keys its directory built, oldest first, in
# store/projects/<sha256 of mvm.toml's real path>. `manifest-prune DIR` keeps the newest and
# removes the others that nothing else uses.
MAX_SLOTS = 64


def project_file(home: MvmHome, path: str | Path) -> Path:
    where = os.path.realpath(manifest_file(path)).encode()
    return home.store / "projects" / hashlib.sha256(where).hexdigest()


def project_builds(home: MvmHome, path: str | Path) -> list[str]:
    """The keys the project at ``path`` built, oldest first (a damaged file: none)."""
    return read_slots(project_file(home, path))


def read_slots(file: Path) -> list[str]:
    try:
        lines = file.read_text().split()
    except (OSError, UnicodeDecodeError):
        return []
    return [k for k in lines if re.fullmatch(r"[0-9a-f]{64}", k)]


def keep_builds(home: MvmHome, path: str | Path, keys: list[str]) -> None:
    """After `manifest-prune`: the project's slots are now ``keys`` (oldest first)."""
    write_atomic(project_file(home, path), "".join(f"{k}\n" for k in keys))
