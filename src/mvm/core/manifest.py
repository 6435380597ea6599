"""``mvm.toml`` -> :class:`~mvm.core.workload.Workload`.

The manifest is the main thing users write by hand, so every mistake becomes exactly one
:class:`~mvm.core.errors.ManifestError` that names the file, the dotted field
(``entrypoint.command``, ``extra_files."/etc/motd".mode``), what is wrong and how to fix it.
Keys are checked against a fixed schema so a typo is reported (with the closest known key)
instead of silently ignored. CLI overrides (``--vcpus --mem --data-disk``) win over the file
and are reported as :class:`~mvm.core.errors.UsageError` naming the flag.

This module is pure: it reads one file and never runs a program (the ``nix`` check is a PATH
lookup only).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from mvm.core.errors import ManifestError, UsageError
from mvm.core.manifest_guest import GuestSections
from mvm.core.manifest_wording import field_name, kind_of, quote
from mvm.core.sizes import MIB, format_size, parse_mib, parse_size
from mvm.core.workdir import MANIFEST_FILE, manifest_file
from mvm.core.workload import (
    Forward,
    Hypervisor,
    Network,
    NetworkMode,
    Volume,
    Workload,
    validate_name,
)

MIN_MEMORY_MIB = 64
MAX_VCPUS = 64

_TOP_KEYS = (
    "name", "vcpus", "memory_mib", "mem", "data_disk", "packages", "dev", "hypervisor",
    "flake", "profile", "entrypoint", "uids", "extra_files", "network", "volumes",
)  # fmt: skip
_NETWORK_KEYS = ("mode", "allow", "forward")
_VOLUME_KEYS = ("host", "guest", "readonly")

_NIX_FIX = "remove flake/profile to use mvm's built-in Debian builder"


@dataclass(frozen=True)
class ManifestOverrides:
    """Command-line values that win over mvm.toml (``build --vcpus --mem --data-disk``)."""

    vcpus: int | None = None
    memory: str | None = None
    data_disk: str | None = None


def load_manifest(path: Path | str, *, overrides: ManifestOverrides | None = None) -> Workload:
    """Read ``path`` (a directory holding mvm.toml, or the file itself) into a Workload."""
    given = Path(path)
    file = manifest_file(given)
    shown = str(file)
    if not file.exists():
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


class _Parser(GuestSections):
    """Walks the TOML document; every check raises one ManifestError for ``self.path``."""

    # -- the document ----------------------------------------------------------------------

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

    def vcpus(self, data: dict[str, Any]) -> int:
        if "vcpus" not in data:
            return 1
        fix = f"write vcpus as a whole number from 1 to {MAX_VCPUS}"
        vcpus = self.integer(data["vcpus"], ("vcpus",), fix)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise self.error(
                ("vcpus",), f"{vcpus} is out of range; a guest has 1 to {MAX_VCPUS} vCPUs", fix
            )
        return vcpus

    def memory(self, data: dict[str, Any]) -> int:
        """``memory_mib = 256`` or ``mem = "256M"``: two spellings, one value, never both."""
        if "memory_mib" in data and "mem" in data:
            raise self.error(("mem",), "memory_mib and mem are both given", "keep only one of them")
        if "memory_mib" in data:
            fix = 'write memory_mib as a whole number of MiB, or mem = "256M"'
            mib = self.integer(data["memory_mib"], ("memory_mib",), fix)
            self.enough_memory(mib, ("memory_mib",))
            return mib
        if "mem" in data:
            fix = 'write a size such as mem = "256M", or memory_mib = 256'
            text = self.string(data["mem"], ("mem",), fix)
            try:
                mib = parse_mib(text)
            except ValueError as err:
                raise self.error(("mem",), str(err), fix) from None
            self.enough_memory(mib, ("mem",))
            return mib
        return 256

    def enough_memory(self, mib: int, at: tuple[str, ...]) -> None:
        if mib < MIN_MEMORY_MIB:
            raise self.error(
                at,
                f"{mib} MiB is too small; a guest needs at least {MIN_MEMORY_MIB} MiB",
                f"give it {MIN_MEMORY_MIB} MiB or more",
            )

    def data_disk(self, data: dict[str, Any]) -> int | None:
        if "data_disk" not in data:
            return None
        fix = 'write a size such as data_disk = "8G"'
        text = self.string(data["data_disk"], ("data_disk",), fix)
        try:
            size = parse_size(text)
        except ValueError as err:
            raise self.error(("data_disk",), str(err), fix) from None
        if size < MIB:
            raise self.error(("data_disk",), f"{quote(text)} is smaller than 1M", fix)
        return size

    def network(self, data: dict[str, Any]) -> Network:
        at: tuple[str | int, ...] = ("network",)
        table = self.table(data.get("network", {}), at, 'write [network] with mode = "deny"')
        self.keys(table, _NETWORK_KEYS, at)
        modes = tuple(m.value for m in NetworkMode)
        mode = (
            NetworkMode(self.choice(table["mode"], modes, (*at, "mode")))
            if "mode" in table
            else NetworkMode.DENY
        )
        allow_fix = 'write allow = ["api.example.com:443", ...]'
        allow = self.strings(table.get("allow", []), (*at, "allow"), allow_fix)
        for i, entry in enumerate(allow):
            self.allow_entry(entry, (*at, "allow", i), allow_fix)
        if allow and mode is not NetworkMode.ALLOW_LIST:
            raise self.error(
                (*at, "allow"),
                f'lists destinations, but network.mode is "{mode.value}" so it has no effect',
                'set mode = "allow-list" or remove allow',
            )
        forward_fix = 'write each forward as "[ADDR:]HOSTPORT:GUESTPORT", e.g. "127.0.0.1:8080:80"'
        specs = self.strings(table.get("forward", []), (*at, "forward"), forward_fix)
        forwards: list[Forward] = []
        for i, spec in enumerate(specs):
            forward = self.forward(spec, (*at, "forward", i), forward_fix)
            if any(
                (f.host_addr, f.host_port) == (forward.host_addr, forward.host_port)
                for f in forwards
            ):
                raise self.error(
                    (*at, "forward", i),
                    f"{forward.host_addr}:{forward.host_port} is already forwarded",
                    "give each forward its own host port",
                )
            forwards.append(forward)
        return Network(mode=mode, allow=tuple(allow), forward=tuple(forwards))

    def allow_entry(self, entry: str, at: tuple[str | int, ...], fix: str) -> None:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or any(c.isspace() for c in entry) or not _port(port):
            raise self.error(at, f"{quote(entry)} is not host:port", fix)

    def forward(self, spec: str, at: tuple[str | int, ...], fix: str) -> Forward:
        """``[ADDR:]HOSTPORT:GUESTPORT``; ADDR may be ``[::1]``; it defaults to loopback."""
        addr = "127.0.0.1"
        rest = spec
        if spec.startswith("["):
            close = spec.find("]:")
            if close < 0:
                raise self.error(at, f"{quote(spec)} has an unclosed [ADDR]", fix)
            addr, rest = spec[1:close], spec[close + 2 :]
        parts = rest.split(":")
        if not spec.startswith("[") and len(parts) == 3:
            addr, parts = parts[0], parts[1:]
        if len(parts) != 2:
            raise self.error(at, f"{quote(spec)} is not [ADDR:]HOSTPORT:GUESTPORT", fix)
        try:
            addr = str(ipaddress.ip_address(addr))
        except ValueError:
            raise self.error(
                at, f"{quote(addr)} in {quote(spec)} is not an IP address", fix
            ) from None
        host_port, guest_port = (_port(p) for p in parts)
        if host_port is None or guest_port is None:
            raise self.error(at, f"{quote(spec)} needs ports from 1 to 65535", fix)
        return Forward(host_addr=addr, host_port=host_port, guest_port=guest_port)

    def volumes(self, data: dict[str, Any]) -> tuple[Volume, ...]:
        fix = 'write [[volumes]] with host = "./data" and guest = "/data"'
        value = data.get("volumes", [])
        if not isinstance(value, list):
            raise self.error(("volumes",), f"must be an array of tables, not {kind_of(value)}", fix)
        volumes: list[Volume] = []
        for i, spec in enumerate(value):
            here: tuple[str | int, ...] = ("volumes", i)
            spec = self.table(spec, here, fix)
            self.keys(spec, _VOLUME_KEYS, here)
            for key in ("host", "guest"):
                if key not in spec:
                    raise self.error((*here, key), "is missing", fix)
            host = self.string(spec["host"], (*here, "host"), fix)
            if not host:
                raise self.error((*here, "host"), "is empty", fix)
            # Relative to the manifest, not to wherever mvmctl happens to run.
            host_path = os.path.normpath(self.base_dir / os.path.expanduser(host))
            guest = self.guest_path(
                self.string(spec["guest"], (*here, "guest"), fix), (*here, "guest"), "/data"
            )
            if any(v.guest == guest for v in volumes):
                raise self.error(
                    (*here, "guest"),
                    f"{guest} is already a volume",
                    "give each volume its own guest path",
                )
            readonly = (
                self.boolean(spec["readonly"], (*here, "readonly")) if "readonly" in spec else True
            )
            volumes.append(Volume(host=host_path, guest=guest, readonly=readonly))
        return tuple(volumes)


def _port(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


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
