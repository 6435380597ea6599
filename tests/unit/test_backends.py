"""The backend interface: one registry, one class per backend, and nobody outside
runtime/backends/ deciding by a backend's name."""

from __future__ import annotations

import ast
import asyncio
import inspect
import typing
from pathlib import Path

import pytest

from mvm.core.errors import BackendUnavailable, UsageError
from mvm.core.state import MvmHome, VmPaths, VmRecord
from mvm.core.workload import Hypervisor
from mvm.runtime import backends
from mvm.runtime.backends.base import VmBackend

SRC = Path(__file__).resolve().parents[2] / "src" / "mvm"
BACKENDS_PACKAGE = SRC / "runtime" / "backends"
NAMES = frozenset(backends.ALL_BACKENDS)


def _literals(node: ast.AST) -> list[str]:
    """String constants in ``node``, also inside a tuple, list or set display."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for element in node.elts for s in _literals(element)]
    return []


def backend_name_decisions(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every place that compares with, matches on or keys a dict by a backend name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            operands = [key for key in node.keys if key is not None]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        found += [(node.lineno, s) for operand in operands for s in _literals(operand) if s in NAMES]
    return found


def test_no_code_outside_the_backends_package_decides_by_backend_name() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if BACKENDS_PACKAGE in path.parents:
            continue
        for line, name in backend_name_decisions(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(SRC)}:{line} decides by {name!r}")
    assert offenders == [], "ask the backend object instead (runtime/backends/):\n" + "\n".join(offenders)


def test_the_checker_catches_each_form_it_looks_for() -> None:
    code = """
if record.backend == "docker": pass
if name in ("qemu", "firecracker"): pass
label = {"qemu": "QEMU"}.get(name)
match name:
    case "lima": pass
if tool == "builder": pass
"""
    assert sorted(backend_name_decisions(ast.parse(code))) == [(2, "docker"), (3, "firecracker"), (3, "qemu"),
                                                               (4, "qemu"), (6, "lima")]


def test_the_workload_hypervisor_names_are_the_registry() -> None:
    assert set(typing.get_args(Hypervisor)) == {"auto", *backends.ALL_BACKENDS}


def test_every_backend_is_a_vm_backend_named_as_registered() -> None:
    for name in backends.ALL_BACKENDS:
        backend = backends.get(name)
        assert isinstance(backend, VmBackend) and backend.name == name
        assert backend.process_label and backend.capabilities.isolation in ("microvm", "container")
        assert backends.get(name) is backend  # one instance per name


def test_backends_up_can_start_implement_the_whole_interface() -> None:
    for name in backends.PRIORITY:
        backend = type(backends.get(name))
        assert backend.supported
        for method in ("availability", "spawn", "serve_agent_channel", "doctor"):
            assert getattr(backend, method) is not getattr(VmBackend, method), f"{name} lacks {method}"
        if backend.capabilities.pause_resume:
            assert backend.pause is not VmBackend.pause and backend.resume is not VmBackend.resume, name
        if backend.capabilities.snapshots:
            assert backend.snapshot is not VmBackend.snapshot, name
    others = set(backends.ALL_BACKENDS) - set(backends.PRIORITY)
    assert others and not any(backends.get(name).supported for name in others)


def _record(backend: str) -> VmRecord:
    return VmRecord(name="t", artifact_key="k", artifact_name="t", backend=backend, accel="tcg", mode="detached",
                    vcpus=1, memory_mib=128, accessible=False, sealed=True, uids={"agent": 990, "entrypoint": 1000})


@pytest.mark.parametrize("name", backends.ALL_BACKENDS)
def test_optional_hooks_refuse_with_the_capability_they_lack(name: str, tmp_path: Path) -> None:
    backend = backends.get(name)
    paths, record = VmPaths(tmp_path / "t"), _record(name)
    hooks = {"snapshots": backend.snapshot(paths, record, tmp_path)}
    if not backend.capabilities.pause_resume:
        hooks["pause/resume"] = backend.pause(paths, record)
    for capability, call in hooks.items():
        if capability == "snapshots" and backend.capabilities.snapshots:
            call.close()
            continue
        with pytest.raises(UsageError, match=f"runs on {name}, which has no {capability}"):
            asyncio.run(call)
    with pytest.raises(UsageError, match=f"runs on {name}"):
        asyncio.run(backend.network(paths, record, "open"))


def test_require_refuses_a_missing_capability_before_anything_is_done() -> None:
    with pytest.raises(UsageError, match="VM web runs on docker, which has no snapshots capability"):
        backends.get("docker").require("snapshots", "web")
    backends.get("qemu").require("snapshots", "web")
    backends.get("qemu").require("pause_resume", "web")


def test_selection_walks_the_priority_order_and_says_what_it_skipped() -> None:
    seen = []

    def available(backend: VmBackend) -> tuple[bool, str]:
        seen.append(backend.name)
        return backend.name == "docker", f"{backend.name} said no"

    choice = backends.select_backend(None, available)
    assert choice.name == "docker" and seen == list(backends.PRIORITY)
    assert "firecracker: firecracker said no" in choice.reason and "qemu: qemu said no" in choice.reason


def test_selection_of_a_named_backend_that_cannot_run_gives_its_reason() -> None:
    with pytest.raises(BackendUnavailable, match="lima is not available here: no limactl"):
        backends.select_backend("lima", lambda b: (False, "no limactl"))
    with pytest.raises(BackendUnavailable, match="no backend can run a VM here: firecracker: x; qemu: x; docker: x"):
        backends.select_backend("auto", lambda b: (False, "x"))
    with pytest.raises(UsageError, match="unknown hypervisor 'vmware'"):
        backends.select_backend("vmware", lambda b: (True, ""))


def test_the_supervisor_and_up_import_no_asyncio_or_http_before_they_need_them() -> None:
    """`up` imports the backends to spawn QEMU; asyncio (~40 ms) and http.client (~40 ms,
    Firecracker's API) must wait until the supervisor or a Firecracker VM needs them."""
    import subprocess
    import sys

    code = ("import sys, mvm.runtime.lifecycle, mvm.runtime.launcher\n"
            "from mvm.runtime import backends\n"
            "[backends.get(n) for n in backends.ALL_BACKENDS]\n"
            "print(sorted(m for m in ('asyncio', 'http.client', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_backend_modules_keep_their_signatures_in_step_with_the_base() -> None:
    for name in backends.ALL_BACKENDS:
        backend = type(backends.get(name))
        for method, base_fn in inspect.getmembers(VmBackend, inspect.isfunction):
            mine = getattr(backend, method)
            if mine is base_fn:
                continue
            assert list(inspect.signature(mine).parameters) == list(inspect.signature(base_fn).parameters), \
                f"{name}.{method}"


def test_settings_this_version_would_not_carry_out_are_refused_before_anything_starts(tmp_path: Path) -> None:
    from dataclasses import replace

    from mvm.core.bootimage import BootImage
    from mvm.runtime import lifecycle

    image = BootImage(path=tmp_path, key="k" * 64, name="w", vcpus=1, memory_mib=128, data_disk_bytes=None,
                      expected_boot_ms=2000, kernel_release="6.1", accessible=False, sealed=True,
                      entrypoint_kind="command", agent_uid=990, entrypoint_uid=1000, hypervisor="auto", forwards=())
    lifecycle.refuse_unenforced_settings(image)
    lifecycle.refuse_unenforced_settings(replace(image, network_mode="open"))  # carried out: a user-mode NIC
    lifecycle.refuse_unenforced_settings(replace(image, network_mode="allow-list", allow=("127.0.0.1:5432",)))
    for changed, words in ((replace(image, network_mode="allow-list", allow=("10.0.0.1/8:80",)),
                            "allow entry '10.0.0.1/8:80'"),
                           (replace(image, network_mode="mesh"), "mode = 'mesh'")):
        with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("]", r"\]")):
            lifecycle.refuse_unenforced_settings(changed)
        with pytest.raises(UsageError):  # and `up` says so before it takes the name or touches a backend
            lifecycle.start_vm(MvmHome(tmp_path / "home"), changed, name="w")
    # Volumes are carried out now; one that may not be shared is refused just as early.
    with pytest.raises(UsageError, match="does not exist"):
        lifecycle.start_vm(MvmHome(tmp_path / "home"), replace(image, volumes=((str(tmp_path / "no"), "/d", True),)),
                           name="w", workload_dir=tmp_path)
    assert not (tmp_path / "home").exists()


def test_an_image_without_the_real_agent_starts_only_when_allowed(tmp_path: Path) -> None:
    from dataclasses import replace

    from mvm.core.bootimage import BootImage
    from mvm.runtime import lifecycle

    image = BootImage(path=tmp_path, key="k" * 64, name="w", vcpus=1, memory_mib=128, data_disk_bytes=None,
                      expected_boot_ms=2000, kernel_release="6.1", accessible=False, sealed=True,
                      entrypoint_kind="command", agent_uid=990, entrypoint_uid=1000, hypervisor="auto", forwards=())
    lifecycle.refuse_stub_agent(image, allow_stub=False)
    stub = replace(image, agent_binary="stub")
    lifecycle.refuse_stub_agent(stub, allow_stub=True)
    with pytest.raises(UsageError, match="agent_binary = 'stub', not 'real'.*--allow-stub"):
        lifecycle.refuse_stub_agent(stub, allow_stub=False)
    with pytest.raises(UsageError, match="agent_binary"):
        lifecycle.start_vm(MvmHome(tmp_path / "home"), stub, name="w")
    assert not (tmp_path / "home").exists()


def test_status_flags_a_guest_process_under_a_uid_the_image_does_not_name() -> None:
    from mvm.cli.vm_state import _process_check

    record = _record("qemu")
    assert _process_check(record, [[1, 0, "init"], [50, 990, "python3"], [60, 1000, "sh"]]) == [
        "processes: all 3 run as root or the image's uids"]
    flagged = _process_check(record, [[1, 0, "init"], [77, 4242, "miner\x1b[2J"], "junk", [8, "x", "y"]])
    assert len(flagged) == 1 and "PROCESS 77" in flagged[0] and "uid 4242" in flagged[0] and "\x1b" not in flagged[0]
    assert _process_check(record, None) == ["processes: the agent did not list them"]
    setuid = _process_check(record, [[1, 0, "init", 0], [60, 1000, "sh", 1000], [61, 1000, "su", 4242]])
    assert len(setuid) == 1 and "PROCESS 61" in setuid[0] and "effective uid 4242" in setuid[0]
    both = _process_check(record, [[62, 4242, "x", 4243], [63, 1000, "y", True]])
    assert len(both) == 1 and "PROCESS 62" in both[0] and "runs as uid 4242" in both[0]


def test_qemu_seccomp_is_off_only_for_the_benchmark_on_a_dev_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from mvm.runtime.backends import qemu

    def record(sealed: bool) -> VmRecord:
        return VmRecord(name="b", artifact_key="k" * 64, artifact_name="b", backend="qemu", accel="tcg",
                        mode="detached", vcpus=1, memory_mib=256, accessible=not sealed, sealed=sealed, uids={})

    spec = qemu.QemuSpec(kernel=Path("/k"), initrd=None, root_disk=None)
    monkeypatch.setattr(qemu, "qemu_binary", lambda arch="x86_64": "/usr/bin/qemu-system-x86_64")
    assert spec.argv()[spec.argv().index("-sandbox") + 1] == qemu.SANDBOX
    assert qemu.seccomp_wanted(record(sealed=False)) and qemu.seccomp_wanted(record(sealed=True))
    monkeypatch.setenv(qemu.SECCOMP_OFF_FOR_BENCHMARK, "1")
    assert qemu.seccomp_wanted(record(sealed=True))  # a sealed image's QEMU always has its filter
    assert not qemu.seccomp_wanted(record(sealed=False))
    spec.seccomp = False
    assert "-sandbox" not in spec.argv()
