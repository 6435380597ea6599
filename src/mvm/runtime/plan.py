"""What `up`/`run` would do, said before doing it: `mvmctl up|run --dry-run [--json]`.

The plan names the artifact, the backend and its isolation, the resources, what runs and as
whom, the network and the mounts. It is made without booting anything (not even the KVM
probe: a cached verdict or "not probed yet"). :func:`admit` holds it to the admission policy
(security/admission.py) and writes the verdict to the audit chain; `up` and `run` admit the
same plan before they start anything, so a dry run says what they would do.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mvm.core.bootimage import ARTIFACT_FILE, BootImage, PortForward, declared_volumes
from mvm.core.state import MvmHome
from mvm.runtime import backends, sizing
from mvm.runtime.volumes import Mount


@dataclass(frozen=True)
class Plan:
    name: str
    artifact: dict[str, Any]
    backend: dict[str, Any]
    resources: dict[str, Any]
    entrypoint: dict[str, Any]
    network: dict[str, Any]
    mounts: list[dict[str, Any]]
    admission: dict[str, Any] = field(default_factory=dict)  # {policies, admitted, receipt}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan for a person."""
        net = self.network
        return [
            f"VM {self.name} would run {self.artifact['name']} "
            f"({self.artifact['key'][:16] if self.artifact['built'] else 'not built yet: up would build it first'}, "
            f"{'sealed' if self.artifact['sealed'] else 'accessible'})",
            f"  backend     {self.backend['name']} ({self.backend['accel']}, {self.backend['isolation']}): "
            f"{self.backend['reason']}",
            f"  resources   {self.resources['vcpus']} vCPU, {self.resources['memory_mib']} MiB, "
            f"{self.artifact.get('arch', 'x86_64')}"
            + (f", data disk {self.resources['data_disk_bytes']} bytes" if self.resources["data_disk_bytes"] else ""),
            f"  runs        {shlex.join(self.entrypoint['argv']) or self.entrypoint['kind']} as uid "
            f"{self.entrypoint['uid']}" + (" (instead of the image's entrypoint)" if self.entrypoint["override"] else ""),
            f"  network     {net['effective']}",
            *[f"  forward     {f['host_addr']}:{f['host_port']} -> guest port {f['guest_port']}" for f in net["forwards"]],
            *[f"  volume      {m['host']} -> {m['guest']} ({'ro' if m['readonly'] else 'rw'}, {m['via']})"
              for m in self.mounts],
            *([f"  admitted    by {', '.join(self.admission['policies']) or 'no policy (none is set)'}"
               + (f"; receipt {self.admission['receipt']}" if self.admission.get("receipt") else "")]
              if self.admission else []),
        ]


def unbuilt_image(directory: Path, workload: dict[str, Any]) -> BootImage:
    """What a dry run plans with when the workload is not built yet (a build would come
    first): the image's facts as its Workload IR says, with no key or kernel yet."""
    uids, network = workload["uids"], workload["network"]
    return BootImage(
        path=directory, key="", name=workload["name"], vcpus=workload["vcpus"], memory_mib=workload["memory_mib"],
        data_disk_bytes=workload.get("data_disk_bytes"), expected_boot_ms=0, kernel_release="",
        accessible=bool(workload["dev"]), sealed=not workload["dev"], entrypoint_kind=workload["entrypoint"]["kind"],
        agent_uid=uids["agent"], entrypoint_uid=uids["entrypoint"], hypervisor=workload.get("hypervisor") or "auto",
        forwards=tuple(PortForward(f["host_addr"], f["host_port"], f["guest_port"]) for f in network["forward"]),
        network_mode=network.get("mode", "deny"), allow=tuple(network.get("allow") or ()),
        volumes=declared_volumes(workload), arch=workload.get("arch") or "x86_64")


def _kernel_of(home: MvmHome, workload: dict[str, Any], arch: str) -> str:
    """debian or mvm: what the image boots, or (not built yet) what `kernel = "auto"` would pick."""
    kernel = workload.get("kernel") or "debian"  # (images from before `kernel` existed: Debian's)
    if kernel == "auto":
        from mvm.build import kernel_source

        kernel = kernel_source.default_kernel(home, arch)
    return str(kernel)


EFFECTIVE = {"deny": "deny: no network device",
             "allow-list": "allow-list: no network device; the listed destinations, checked on the host",
             "open": "open: ordinary outbound networking"}


def make_plan(home: MvmHome, image: BootImage, *, name: str, vcpus: int | None = None,
              memory_mib: int | None = None, hypervisor: str | None = None, argv: list[str] | None = None,
              forwards: tuple[PortForward, ...] = (), workload: dict[str, Any] | None = None,
              overcommit: bool = False, mounts: tuple[Mount, ...] = ()) -> Plan:
    """The plan for starting ``image`` as VM ``name``, as its mvm.toml declares it; raises what
    `up` would before admission (a backend that cannot run here, a command too long, a size
    beyond the host). ``mounts``: the volumes, checked (lifecycle.check_volumes)."""
    from mvm.runtime import lifecycle

    lifecycle.check_argv(argv)
    sizing.check_fits(vcpus or image.vcpus, memory_mib or image.memory_mib, overcommit=overcommit)
    host = backends.Host(home, may_probe=False)
    choice = lifecycle.choose_backend(home, image, hypervisor, host)
    choice.backend.check_volumes(mounts)  # (what this backend cannot share as asked)
    built = workload is None  # (else: `unbuilt_image`, and its Workload IR as JSON)
    if workload is None:
        workload = json.loads((image.path / ARTIFACT_FILE).read_text())["workload"]
    entry = workload["entrypoint"]
    all_forwards = [*image.forwards, *forwards]
    return Plan(
        name=name,
        artifact={"built": built, "key": image.key or None, "name": image.name,
                  "path": str(image.path) if built else None, "sealed": image.sealed,
                  "accessible": image.accessible, "kernel": _kernel_of(home, workload, image.arch),
                  "kernel_release": image.kernel_release or None, "arch": image.arch},
        backend={"name": choice.name, "reason": choice.reason, "accel": choice.backend.accel_for(image, host),
                 "isolation": choice.backend.capabilities.isolation},
        resources={"vcpus": vcpus or image.vcpus, "memory_mib": memory_mib or image.memory_mib,
                   "data_disk_bytes": image.data_disk_bytes},
        entrypoint={"kind": "command" if argv else image.entrypoint_kind, "override": argv is not None,
                    "argv": list(argv or entry.get("command") or ([entry["shell"]] if entry.get("shell") else [])),
                    "services": [s.get("name") for s in entry.get("services") or []],
                    "uid": image.entrypoint_uid, "agent_uid": image.agent_uid},
        # (the image's mode and list: mvm.toml's, or what `up --network/--allow` put over them)
        network={"mode": image.network_mode, "allow": list(image.allow), "effective": EFFECTIVE.get(image.network_mode,
                 image.network_mode), "forwards": [asdict(f) for f in all_forwards]},
        mounts=[{**m.as_dict(), "via": choice.backend.volume_kind} for m in mounts],
    )


def admit(home: MvmHome, plan: Plan, policies: tuple[str | Path, ...] = (), *, sealed: bool = False,
          dry_run: bool = False, record: bool = True) -> Plan:
    """Hold ``plan`` to the home's policy and ``policies``; the verdict, either way, is an audit
    record. Returns the plan with its admission; raises PolicyRefused. ``record=False`` leaves
    the admitted record to :func:`record_admitted` (`up` writes it while the guest boots)."""
    from mvm.security import admission, audit

    policy = admission.load(home.root, policies)
    try:
        admission.check(policy, plan.as_dict())
    except admission.PolicyRefused as err:
        audit.record(home, operation="plan", sealed=sealed, **_plan_fields(plan, list(policy.files)),
                     result="refused", detail={"rule": err.rule, "where": err.where, "why": err.why[:300],
                                               "dry_run": dry_run})
        raise
    admitted = replace(plan, admission={"policies": list(policy.files), "admitted": True, "receipt": None})
    return record_admitted(home, admitted, sealed=sealed, dry_run=dry_run) if record else admitted


def record_admitted(home: MvmHome, plan: Plan, *, sealed: bool = False, dry_run: bool = False) -> Plan:
    """The audit record of an admitted plan (AuditError for a sealed image when it cannot be
    written); returns the plan with the record's id as its receipt."""
    from mvm.security import audit

    receipt = audit.record(home, operation="plan", sealed=sealed, **_plan_fields(plan, plan.admission["policies"]),
                           result="admitted", detail={"dry_run": dry_run})
    return replace(plan, admission={**plan.admission, "receipt": receipt})


def _plan_fields(plan: Plan, policy_files: list[str]) -> dict[str, Any]:
    return {"vm": plan.name, "artifact": plan.artifact["key"], "backend": plan.backend["name"],
            "isolation": plan.backend["isolation"], "paths": policy_files}
