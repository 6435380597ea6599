"""What the host lends the guest: ``vcpus``, memory, ``data_disk``, ``[network]``, ``[[volumes]]``.

Sizes come from the host's CPUs, RAM and disk; the network mode, allow-list and port
forwards decide what the guest reaches and what reaches it; volumes share host directories.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from mvm.core.manifest_wording import ManifestChecks, kind_of, quote
from mvm.core.sizes import MIB, parse_mib, parse_size
from mvm.core.workload import Forward, Network, NetworkMode, Volume

MIN_MEMORY_MIB = 64
MAX_VCPUS = 64

_NETWORK_KEYS = ("mode", "allow", "forward")
_VOLUME_KEYS = ("host", "guest", "mode", "readonly")


class HostSections(ManifestChecks):
    """Readers of the sizes, network and volumes the host gives the guest."""

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
            # mode = "ro" | "rw" (readonly = true | false, the older spelling, says the same)
            if "mode" in spec and "readonly" in spec:
                raise self.error(
                    (*here, "readonly"), "says again what mode says", 'keep only mode = "ro" or "rw"'
                )
            if "mode" in spec:
                readonly = self.choice(spec["mode"], ("ro", "rw"), (*here, "mode")) == "ro"
            else:
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
