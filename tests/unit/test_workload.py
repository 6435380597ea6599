"""The IR's own invariants: whatever front end builds a Workload gets these for free."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mvm.core.workload import (
    AGENT_UID,
    Entrypoint,
    EntrypointKind,
    Forward,
    Network,
    NetworkMode,
    RestartPolicy,
    Service,
    Uids,
    Workload,
    validate_name,
)

SHELL = Entrypoint(kind=EntrypointKind.SHELL, shell="/bin/sh")


def workload(**fields: object) -> Workload:
    base: dict[str, object] = {
        "name": "t",
        "entrypoint": SHELL,
        "uids": Uids(entrypoint=0),
        "dev": True,
    }
    return Workload(**{**base, **fields})  # type: ignore[arg-type]


def test_minimal_workload_has_documented_defaults() -> None:
    w = workload()
    assert (w.vcpus, w.memory_mib, w.data_disk_bytes) == (1, 256, None)
    assert w.uids.agent == AGENT_UID == 990
    assert w.network == Network(mode=NetworkMode.DENY)
    assert w.hypervisor == "auto"
    assert (w.packages, w.extra_files, w.volumes) == ((), (), ())


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        (EntrypointKind.SHELL, {"command": ("/bin/true",)}),
        (EntrypointKind.COMMAND, {}),
        (EntrypointKind.SHELL, {"shell": "/bin/sh", "command": ("/bin/true",)}),
        (EntrypointKind.SERVICES, {"services": ()}),
    ],
)
def test_entrypoint_is_exactly_its_one_form(kind: EntrypointKind, fields: dict) -> None:
    with pytest.raises(ValidationError, match="exactly one of shell, command or services"):
        Entrypoint(kind=kind, **fields)


def test_entrypoint_forms() -> None:
    assert Entrypoint(kind=EntrypointKind.COMMAND, command=("/bin/true",)).command == ("/bin/true",)
    svc = Service(name="web", command=("/srv/web",))
    assert svc.restart is RestartPolicy.ON_FAILURE
    ep = Entrypoint(kind=EntrypointKind.SERVICES, services=(svc,))
    assert ep.services[0].name == "web"


def test_service_needs_a_command() -> None:
    with pytest.raises(ValidationError):
        Service(name="web", command=())


def test_workload_is_frozen_and_strict() -> None:
    w = workload()
    with pytest.raises(ValidationError):
        w.vcpus = 4  # type: ignore[misc]
    with pytest.raises(ValidationError):
        workload(colour="blue")


@pytest.mark.parametrize(
    "fields",
    [{"vcpus": 0}, {"vcpus": 65}, {"memory_mib": 63}, {"data_disk_bytes": 1024}],
)
def test_workload_resource_bounds(fields: dict) -> None:
    with pytest.raises(ValidationError):
        workload(**fields)


@pytest.mark.parametrize("port", [0, 65536])
def test_forward_ports_are_bounded(port: int) -> None:
    with pytest.raises(ValidationError):
        Forward(host_port=port, guest_port=80)
    assert Forward(host_port=8080, guest_port=80).host_addr == "127.0.0.1"


def test_dev_decides_sealed_and_accessible() -> None:
    assert workload(dev=True).accessible and not workload(dev=True).sealed
    assert workload(dev=False).sealed and not workload(dev=False).accessible


def test_default_dev_and_entrypoint_uid() -> None:
    assert Workload.default_dev(EntrypointKind.SHELL) is True
    assert Workload.default_dev(EntrypointKind.COMMAND) is False
    assert Workload.default_dev(EntrypointKind.SERVICES) is False
    assert Workload.default_entrypoint_uid(True) == 0
    assert Workload.default_entrypoint_uid(False) == 1000


def test_canonical_json_is_stable_and_round_trips() -> None:
    w = workload(packages=("python3", "busybox-static"), vcpus=2)
    text = w.canonical_json()
    assert text == workload(vcpus=2, packages=("python3", "busybox-static")).canonical_json()
    assert " " not in text.replace("/bin/sh", "")
    assert Workload.model_validate_json(text) == w
    assert text != workload(vcpus=3).canonical_json()


@pytest.mark.parametrize("name", ["web", "a", "my-app_1.2", "0day", "x" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Web", "-x", ".hidden", "a b", "x" * 64, "a/b", "é"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        validate_name(name)


# Invariants that hold for every producer of a Workload (SDK, templates), not only mvm.toml.
def test_ir_refuses_agent_as_root() -> None:
    from mvm.core.workload import Uids
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Uids(agent=0, entrypoint=1000)


def test_ir_refuses_shared_agent_uid() -> None:
    from mvm.core.workload import Uids
    with pytest.raises(ValidationError, match="must not share the agent"):
        Uids(agent=990, entrypoint=990)


@pytest.mark.parametrize("path", ["etc/motd", "/etc/../root/x"])
def test_ir_refuses_relative_extra_file(path: str) -> None:
    from mvm.core.workload import ExtraFile
    with pytest.raises(ValidationError, match="must be absolute"):
        ExtraFile(path=path, content="x")
