"""``mvm.toml`` -> :class:`~mvm.core.workload.Workload`.

The manifest is the main thing users write by hand, so every mistake becomes exactly one
:class:`~mvm.core.errors.ManifestError` that names the file, the dotted field
(``entrypoint.command``, ``extra_files."/etc/motd".mode``), what is wrong and how to fix it.
Keys are checked against a fixed schema so a typo is reported (with the closest known key)
instead of silently ignored. CLI overrides (``--vcpus --mem --data-disk``) win over the file
and are reported as :class:`~mvm.core.errors.UsageError` naming the flag.

The top-level keys and the overrides are read here; the sections in core.manifest_guest
(entrypoint, uids, packages, extra_files) and core.manifest_host (sizes, network, volumes),
and the wording of every mistake in core.manifest_wording.

A Python declaration (``app.py``, ``app.py:NAME``) becomes the same document through
core.declaration and goes through the same readers (:func:`load_declaration`), so it compiles
to the same Workload with the same rules; only its messages say ``app.py:LINE``.

This module is pure: it reads one file and never runs a program (the ``nix`` check is a PATH
lookup only; a declaration is parsed, never imported).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from mvm.core.arch import GuestArchName
from mvm.core.errors import BuildError, ManifestError, UsageError
from mvm.core.manifest_guest import GuestSections
from mvm.core.manifest_host import MAX_VCPUS, MIN_MEMORY_MIB, HostSections
from mvm.core.manifest_wording import field_name, quote
from mvm.core.sizes import MIB, format_size, parse_mib, parse_size
from mvm.core.workdir import MANIFEST_FILE, declaration, manifest_file
from mvm.core.workload import Hypervisor, KernelName, Workload, validate_name

if TYPE_CHECKING:
    from mvm.core.declaration import Declaration

_TOP_KEYS = (
    "name", "vcpus", "memory_mib", "mem", "data_disk", "packages", "dev", "hypervisor",
    "flake", "profile", "entrypoint", "uids", "extra_files", "network", "volumes", "kernel",
    "arch",
)  # fmt: skip

_NIX_FIX = "remove flake/profile to use mvm's built-in Debian builder"
MAX_DECLARATION_BYTES = 4 * 1024 * 1024  # a declaration is a short file; this bounds a hostile one


@dataclass(frozen=True)
class ManifestOverrides:
    """Command-line values that win over mvm.toml (``build --vcpus --mem --data-disk``)."""

    vcpus: int | None = None
    memory: str | None = None
    data_disk: str | None = None
    kernel: str | None = None  # `build --kernel debian|mvm`
    arch: str | None = None  # `build --arch x86_64|aarch64`


@dataclass(frozen=True)
class DeclaredWorkload:
    """A Python declaration's Workload, and what of it the builder cannot make yet."""

    workload: Workload
    declaration: Declaration

    @property
    def nix_packages(self) -> tuple[str, ...] | None:
        return self.declaration.nix_packages


def load_manifest(path: Path | str, *, overrides: ManifestOverrides | None = None) -> Workload:
    """Read ``path`` (a directory holding mvm.toml, the file itself, or a Python declaration)
    into the Workload a build makes: a declaration of ``mvm.nix_packages`` is refused here."""
    if declaration(path) is not None:
        declared = load_declaration(path, overrides=overrides)
        if declared.nix_packages is not None:
            decl = declared.declaration
            raise BuildError(
                "resolve", f"{decl.file}:{decl.line_of(('image',))}: image is mvm.nix_packages(...), and this "
                "version of mvm has no Nix builder", "use mvm.packages([...]) with Debian package names",
            )  # fmt: skip
        return declared.workload
    given = Path(path)
    file = manifest_file(given)
    shown = str(file)
    if not file.exists():
        if given.is_dir() and (given / "flake.nix").exists():
            raise ManifestError(
                shown, None, "no such file: this project has a flake.nix, and Nix builds are not available in "
                "this version of mvm", f"write a {MANIFEST_FILE} beside it for mvm's built-in Debian builder",
            )  # fmt: skip
        raise ManifestError(
            shown,
            None,
            "no such file" if given.is_dir() else "no such file or directory",
            f"create {MANIFEST_FILE} or point at the directory that has it",
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(
            shown, None, f"is not UTF-8 text ({err.reason} at byte {err.start})",
            "save the file as UTF-8",
        ) from None  # fmt: skip
    except OSError as err:
        raise ManifestError(
            shown, None, f"cannot be read: {err.strerror or err}",
            "check that it is a readable file",
        ) from None  # fmt: skip
    return parse_manifest(text, shown, base_dir=file.absolute().parent, overrides=overrides)


def load_declaration(path: Path | str, *, overrides: ManifestOverrides | None = None) -> DeclaredWorkload:
    """Read the ``@mvm.app`` of ``app.py`` (or ``app.py:NAME``) without running the file."""
    declared = declaration(path)
    if declared is None:
        raise UsageError(f"{path} is not a Python file", "give the path of a .py file (app.py or app.py:NAME)")
    file, app = declared
    shown = str(file)
    try:  # non-blocking open: a FIFO or a device named app.py must not hang the command
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ManifestError(shown, None, "is not a regular file", "give the path of a .py file")
            source = stream.read(MAX_DECLARATION_BYTES + 1)
    except OSError as err:
        raise ManifestError(shown, None, f"cannot be read: {err.strerror or err}",
                            "check that the file exists and is readable") from None
    if len(source) > MAX_DECLARATION_BYTES:
        raise ManifestError(shown, None, f"is larger than {MAX_DECLARATION_BYTES // MIB} MiB",
                            "keep the declaration in a small file")
    from mvm.core.declaration import extract  # only declarations pay for it

    decl = extract(source, shown, app)
    base = file.absolute().parent
    if decl.source is not None:
        base = Path(os.path.normpath(base / os.path.expanduser(decl.source)))
        if not base.is_dir():
            raise ManifestError(f"{shown}:{decl.line_of(('source',))}", "source",
                                f"{quote(decl.source)} is not a directory (from {file.absolute().parent})",
                                "give a directory relative to the file, e.g. mvm.local_path(\".\")")
    try:
        workload = _Parser(shown, base, decl.locate).workload(decl.data, overrides or ManifestOverrides())
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(p for p in first["loc"] if isinstance(p, (str, int)))
        where, name = decl.locate(loc)
        raise ManifestError(where, name, first["msg"], "correct this value") from None
    return DeclaredWorkload(workload, decl)


def parse_manifest(
    text: str,
    path: str = MANIFEST_FILE,
    base_dir: Path | None = None,
    overrides: ManifestOverrides | None = None,
) -> Workload:
    """Parse manifest ``text``; ``path`` is only shown in errors.

    ``base_dir`` is where relative volume paths and the default name come from; ``None``
    means the directory of ``path`` (the current directory for a bare ``mvm.toml``).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ManifestError(
            path, None, f"not valid TOML: {err}", "fix the syntax at that line and column"
        ) from None
    base = (base_dir if base_dir is not None else Path(path).parent).absolute()
    try:
        return _Parser(path, base).workload(data, overrides or ManifestOverrides())
    except ValidationError as err:
        # Only reachable if a check above is missing; still one line, never a traceback.
        first = err.errors()[0]
        loc = [p for p in first["loc"] if isinstance(p, (str, int))]
        raise ManifestError(
            path, field_name(*loc) or None, first["msg"], "correct this value"
        ) from None


class _Parser(GuestSections, HostSections):
    """Walks the TOML document: the top-level keys here, each section by its reader."""

    def workload(self, data: dict[str, Any], overrides: ManifestOverrides) -> Workload:
        self.keys(data, _TOP_KEYS, ())
        self.nix(data)
        name = self.name(data)
        vcpus = self.vcpus(data)
        memory_mib = self.memory(data)
        data_disk = self.data_disk(data)
        vcpus, memory_mib, data_disk = _apply(overrides, vcpus, memory_mib, data_disk)
        entrypoint = self.entrypoint(data)
        dev = Workload.default_dev(entrypoint.kind)
        if "dev" in data:
            dev = self.boolean(data["dev"], ("dev",))
        fields: dict[str, Any] = dict(
            name=name,
            entrypoint=entrypoint,
            dev=dev,
            uids=self.uids(data, dev),
            packages=self.packages(data),
            extra_files=self.extra_files(data),
            network=self.network(data),
            volumes=self.volumes(data),
            vcpus=vcpus,
            memory_mib=memory_mib,
            data_disk_bytes=data_disk,
        )
        if "hypervisor" in data:
            fields["hypervisor"] = self.choice(
                data["hypervisor"], get_args(Hypervisor), ("hypervisor",)
            )
        for key, choices, what in (("kernel", get_args(KernelName), "a kernel mvm knows"),
                                   ("arch", get_args(GuestArchName), "a guest architecture mvm builds")):
            if key in data:
                fields[key] = self.choice(data[key], choices, (key,))
            override = getattr(overrides, key)
            if override is not None:  # `build --kernel/--arch` wins over the file
                if override not in choices:
                    raise UsageError(f"--{key}: {override!r} is not {what}", f"use one of {', '.join(choices)}")
                fields[key] = override
        return Workload(**fields)

    def nix(self, data: dict[str, Any]) -> None:
        """flake/profile pick the Nix builder, which this version cannot drive yet."""
        for key in ("flake", "profile"):
            if key in data:
                self.string(data[key], (key,), f'write {key} as a string, e.g. "."')
        given = [key for key in ("flake", "profile") if key in data]
        if not given:
            return
        if shutil.which("nix") is None:
            raise self.error(
                (given[0],), "the Nix builder needs `nix`, which is not installed here", _NIX_FIX
            )
        raise self.error(
            (given[0],), "the Nix builder is not supported by this version of mvm yet", _NIX_FIX
        )

    def name(self, data: dict[str, Any]) -> str:
        if "name" in data:
            name = self.string(data["name"], ("name",), 'write name = "my-app"')
            try:
                return validate_name(name)
            except ValueError as err:
                raise self.error(
                    ("name",), str(err), 'pick a plain name such as "my-app"'
                ) from None
        derived = self.base_dir.name.lower()
        try:
            return validate_name(derived)
        except ValueError:
            plain = re.sub(r"[^a-z0-9_.-]+", "-", derived).strip("-._")[:63] or "app"
            raise self.error(
                ("name",),
                f"is not set, and the directory name {quote(self.base_dir.name)} is not valid",
                f'add name = "{plain}" to the top of the file',
            ) from None


def _apply(
    overrides: ManifestOverrides, vcpus: int, memory_mib: int, data_disk: int | None
) -> tuple[int, int, int | None]:
    """Command-line values win; a bad one is the user's flag, so it is a UsageError."""
    if overrides.vcpus is not None:
        value = overrides.vcpus
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VCPUS:
            raise UsageError(
                f"--vcpus: {value!r} is not a vCPU count",
                f"use a whole number from 1 to {MAX_VCPUS}",
            )
        vcpus = value
    if overrides.memory is not None:
        try:
            memory_mib = parse_mib(overrides.memory)
        except ValueError as err:
            raise UsageError(f"--mem: {err}", "use a size such as 512M or 2G") from None
        if memory_mib < MIN_MEMORY_MIB:
            raise UsageError(
                f"--mem: {format_size(memory_mib * MIB)} is too small;"
                f" a guest needs at least {MIN_MEMORY_MIB} MiB",
                f"use --mem {MIN_MEMORY_MIB}M or more",
            )
    if overrides.data_disk is not None:
        try:
            data_disk = parse_size(overrides.data_disk)
        except ValueError as err:
            raise UsageError(f"--data-disk: {err}", "use a size such as 8G") from None
        if data_disk < MIB:
            raise UsageError(
                f"--data-disk: {overrides.data_disk!r} is smaller than 1M", "use a size such as 8G"
            )
    return vcpus, memory_mib, data_disk
