"""What `up`/`run` would do, said before doing it: `mvmctl run --dry-run [--json]`.

The plan names the artifact, the backend and its isolation, the resources, what runs and as
whom, the network and the mounts. It is made without booting anything (not even the KVM
probe: a cached verdict or "not probed yet"), and refuses what `up` would refuse.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from mvm.core.bootimage import ARTIFACT_FILE, BootImage, PortForward
from mvm.core.state import MvmHome
from mvm.runtime import backends, sizing


@dataclass(frozen=True)
class Plan:
    name: str
    artifact: dict[str, Any]
    backend: dict[str, Any]
    resources: dict[str, Any]
    entrypoint: dict[str, Any]
    network: dict[str, Any]
    mounts: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan for a person."""
        net = self.network
        return [
            f"VM {self.name} would run {self.artifact['name']} ({self.artifact['key'][:16]}, "
            f"{'sealed' if self.artifact['sealed'] else 'accessible'})",
            f"  backend     {self.backend['name']} ({self.backend['accel']}, {self.backend['isolation']}): "
            f"{self.backend['reason']}",
            f"  resources   {self.resources['vcpus']} vCPU, {self.resources['memory_mib']} MiB"
            + (f", data disk {self.resources['data_disk_bytes']} bytes" if self.resources["data_disk_bytes"] else ""),
            f"  runs        {shlex.join(self.entrypoint['argv']) or self.entrypoint['kind']} as uid "
            f"{self.entrypoint['uid']}" + (" (instead of the image's entrypoint)" if self.entrypoint["override"] else ""),
            f"  network     {net['effective']}",
            *[f"  forward     {f['host_addr']}:{f['host_port']} -> guest port {f['guest_port']}" for f in net["forwards"]],
        ]


def make_plan(home: MvmHome, image: BootImage, *, name: str, vcpus: int | None = None,
              memory_mib: int | None = None, hypervisor: str | None = None, argv: list[str] | None = None,
              forwards: tuple[PortForward, ...] = (), overcommit: bool = False) -> Plan:
    """The plan for starting ``image`` as VM ``name``; raises what `up` would (a backend that
    cannot run here, a command too long)."""
    from mvm.runtime import lifecycle

    lifecycle.check_argv(argv)
    lifecycle.refuse_unenforced_settings(image)  # as `up` would
    sizing.check_fits(vcpus or image.vcpus, memory_mib or image.memory_mib, overcommit=overcommit)
    host = backends.Host(home, may_probe=False)
    choice = lifecycle.choose_backend(home, image, hypervisor, host)
    workload = json.loads((image.path / ARTIFACT_FILE).read_text())["workload"]
    entry = workload["entrypoint"]
    network = workload["network"]
    all_forwards = [*image.forwards, *forwards]
    return Plan(
        name=name,
        artifact={"key": image.key, "name": image.name, "path": str(image.path), "sealed": image.sealed,
                  "accessible": image.accessible, "kernel_release": image.kernel_release},
        backend={"name": choice.name, "reason": choice.reason, "accel": choice.backend.accel(host),
                 "isolation": choice.backend.capabilities.isolation},
        resources={"vcpus": vcpus or image.vcpus, "memory_mib": memory_mib or image.memory_mib,
                   "data_disk_bytes": image.data_disk_bytes},
        entrypoint={"kind": "command" if argv else image.entrypoint_kind, "override": argv is not None,
                    "argv": list(argv or entry.get("command") or ([entry["shell"]] if entry.get("shell") else [])),
                    "services": [s.get("name") for s in entry.get("services") or []],
                    "uid": image.entrypoint_uid, "agent_uid": image.agent_uid},
        network={"mode": network["mode"], "effective": "deny: no network device",
                 "forwards": [asdict(f) for f in all_forwards]},
        mounts=[],  # (an image that declares volumes is refused above: this version mounts none)
    )
