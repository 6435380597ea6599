"""Admission policy: each rule refuses the plan that breaks it, naming the rule and file:line, and
admits the plan that does not; both verdicts are audit records; a bad policy is a one-line
error with its line."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from mvm.core.state import MvmHome
from mvm.runtime.plan import Plan, admit
from mvm.security import admission, audit_verify


def plan(**changes: dict) -> Plan:
    """A plan as make_plan makes it: a sealed image on qemu, no network, no volumes."""
    base = Plan(
        name="web",
        artifact={"key": "k" * 64, "name": "web", "path": "/x", "sealed": True, "accessible": False,
                  "kernel_release": "6.1"},
        backend={"name": "qemu", "reason": "first available", "accel": "tcg", "isolation": "microvm"},
        resources={"vcpus": 2, "memory_mib": 512, "data_disk_bytes": None},
        entrypoint={"kind": "command", "override": False, "argv": ["app"], "services": [], "uid": 1000,
                    "agent_uid": 990},
        network={"mode": "deny", "allow": [], "effective": "deny: no network device", "forwards": []},
        mounts=[],
    )
    return dataclasses.replace(base, **{k: {**getattr(base, k), **v} if isinstance(v, dict) else v
                                        for k, v in changes.items()})


@pytest.fixture
def home(tmp_path: Path) -> MvmHome:
    return MvmHome(tmp_path / "home")


def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return path


# (policy, the plan it refuses, the plan it admits, the rule, the line of the rule)
CASES = [
    ("[backend]\nforbid = ['docker']\n",
     plan(backend={"name": "docker", "isolation": "container"}), plan(), "backend.forbid", 2),
    ("# no open networks\n[network]\nopen = false\n",
     plan(network={"mode": "allow"}), plan(), "network.open", 3),
    ("[network]\nopen = false\n", plan(network={"mode": "open"}), plan(), "network.open", 2),
    ("[network]\nopen = false\n", plan(network={"mode": "allow-list", "allow": ["pypi.org:443"]}), plan(),
     "network.open", 2),  # (open = false alone still means "deny" only, as it always did)
    ("[network]\nopen = false\nallow_patterns = ['pypi.org:*']\n", plan(network={"mode": "open"}),
     plan(network={"mode": "allow-list", "allow": ["pypi.org:443"]}), "network.open", 2),
    ("[network]\nallow_patterns = ['*.debian.org', 'pypi.org']\n",
     plan(network={"mode": "allow", "allow": ["deb.debian.org", "evil.example"]}),
     plan(network={"mode": "allow", "allow": ["deb.debian.org", "pypi.org"]}), "network.allow_patterns", 2),
    ("[volumes]\nrw = false\n",
     plan(mounts=[{"host": "/srv/data", "guest": "/data", "readonly": False}]),
     plan(mounts=[{"host": "/srv/data", "guest": "/data", "readonly": True}]), "volumes.rw", 2),
    ("[volumes]\n\nbroad = false\n",
     plan(mounts=[{"host": "/etc", "guest": "/h", "readonly": True}]),
     plan(mounts=[{"host": "/srv/project", "guest": "/p", "readonly": True}]), "volumes.broad", 3),
    ("[entrypoint]\nroot = false\n",
     plan(entrypoint={"uid": 0}), plan(), "entrypoint.root", 2),
    ("[image]\naccessible = false\n",
     plan(artifact={"accessible": True, "sealed": False}), plan(), "image.accessible", 2),
    ("[resources]\nmax_vcpus = 2\nmax_memory_mib = 1024\n",
     plan(resources={"vcpus": 3}), plan(resources={"vcpus": 2}), "resources.max_vcpus", 2),
    ("[resources]\nmax_vcpus = 2\nmax_memory_mib = 1024\n",
     plan(resources={"memory_mib": 2048}), plan(resources={"memory_mib": 1024}), "resources.max_memory_mib", 3),
]


@pytest.mark.parametrize(("text", "refused", "admitted", "rule", "line"), CASES,
                         ids=[f"{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_refuses_what_breaks_it_and_admits_the_rest(home: MvmHome, tmp_path: Path, text: str,
                                                              refused: Plan, admitted: Plan, rule: str,
                                                              line: int) -> None:
    path = policy_file(tmp_path, text)
    with pytest.raises(admission.PolicyRefused) as caught:
        admit(home, refused, (path,))
    assert caught.value.rule == rule and caught.value.where == f"{path}:{line}"
    assert f"rule {rule} ({path}:{line})" in str(caught.value)
    verdict = admit(home, admitted, (path,))
    assert verdict.admission["admitted"] and verdict.admission["policies"] == [str(path)]
    plans = [e for e in audit_verify.entries(home) if e["operation"] == "plan"]
    assert [e["result"] for e in plans] == ["refused", "admitted"]
    assert plans[0]["detail"]["rule"] == rule and plans[1]["id"] == verdict.admission["receipt"]


def test_the_home_policy_applies_and_a_policy_option_cannot_lift_it(home: MvmHome, tmp_path: Path) -> None:
    home.root.mkdir(parents=True)
    (home.root / "policy.toml").write_text("[image]\naccessible = false\n")
    lenient = policy_file(tmp_path, "[image]\naccessible = true\n")
    with pytest.raises(admission.PolicyRefused) as caught:
        admit(home, plan(artifact={"accessible": True}), (lenient,))
    assert caught.value.where == f"{home.root / 'policy.toml'}:2"
    assert admit(home, plan()).admission["policies"] == [str(home.root / "policy.toml")]


def test_no_policy_admits_everything(home: MvmHome) -> None:
    wild = plan(backend={"name": "docker"}, entrypoint={"uid": 0}, artifact={"accessible": True},
                resources={"vcpus": 64})
    verdict = admit(home, wild)
    assert verdict.admission["admitted"] and verdict.admission["policies"] == []
    assert [e["result"] for e in audit_verify.entries(home)] == ["admitted"]


@pytest.mark.parametrize(("text", "says"), [
    ("[network\nopen = false\n", "not TOML"),
    ("[firewall]\nopen = false\n", ":1: unknown policy table [firewall]"),
    ("[image]\n\naccessible = 'no'\n", ":3: image.accessible must be a bool"),
    ("[resources]\nmax_vcpus = true\n", ":2: resources.max_vcpus must be a int"),
    ("[backend]\nforbid = [1]\n", ":2: backend.forbid must be a list of strings"),
    ("[backend]\nallow = ['qemu']\n", ":2: unknown rule backend.allow"),
])
def test_a_bad_policy_is_one_line_with_its_line(home: MvmHome, tmp_path: Path, text: str, says: str) -> None:
    path = policy_file(tmp_path, text)
    with pytest.raises(admission.PolicyError) as caught:
        admit(home, plan(), (path,))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_policy_file_is_an_error(home: MvmHome, tmp_path: Path) -> None:
    with pytest.raises(admission.PolicyError, match="no such file"):
        admit(home, plan(), (tmp_path / "nope.toml",))


def test_broad_paths() -> None:
    assert admission.is_broad("/") and admission.is_broad("/home/alice") and admission.is_broad("~")
    assert admission.is_broad("/etc/") and not admission.is_broad("/home/alice/project")
    assert not admission.is_broad("/srv/data")


def test_a_running_vms_list_change_is_held_to_the_policy_and_a_refusal_recorded(home: MvmHome,
                                                                                tmp_path: Path) -> None:
    from mvm.core.state import VmRecord
    from mvm.runtime.allow_list import admit_change

    started_under = policy_file(tmp_path, "[network]\nallow_patterns = ['*.debian.org:443']\n")
    vm = VmRecord(name="web", artifact_key="k" * 64, artifact_name="web", backend="qemu", accel="tcg",
                  mode="detached", vcpus=1, memory_mib=256, accessible=False, sealed=True, uids={},
                  network="allow-list", allow=["deb.debian.org:443"], policies=[str(started_under)])
    admit_change(home, vm, ("security.debian.org:443",), (), {})  # matches: admitted, nothing written
    with pytest.raises(admission.PolicyRefused) as caught:
        admit_change(home, vm, ("evil.example:443",), (), {"allow": ["evil.example:443"]})
    assert caught.value.rule == "network.allow_patterns" and caught.value.where == f"{started_under}:2"
    [entry] = audit_verify.entries(home)
    assert entry["operation"] == "network" and entry["result"] == "refused" and entry["vm"] == "web"
    assert entry["detail"]["where"] == f"{started_under}:2" and entry["detail"]["allow"] == ["evil.example:443"]
    home.root.mkdir(parents=True, exist_ok=True)  # the home's policy as it is now applies too
    (home.root / "policy.toml").write_text("[network]\nopen = false\n")
    unbound = dataclasses.replace(vm, policies=[])
    with pytest.raises(admission.PolicyRefused) as caught:
        admit_change(home, unbound, ("deb.debian.org:80",), (), {})
    assert caught.value.rule == "network.open" and "allow_patterns" in caught.value.why
    admit_change(home, vm, (), ("deb.debian.org:443",), {})  # open = false + allow_patterns: allow-list admitted


def test_a_dry_run_plans_the_network_options_and_holds_them_to_the_policy(tmp_path: Path) -> None:
    """`up/run --dry-run --network/--allow` show the network the VM would really get, and a
    policy refuses it as `up` would; nothing is built (the workload is planned from mvm.toml)."""
    import json
    import os
    import subprocess
    import sys

    work = tmp_path / "w"
    work.mkdir()
    (work / "mvm.toml").write_text('name = "dr"\n[entrypoint]\ncommand = ["/bin/true"]\n')
    env = {**os.environ, "MVM_HOME": str(tmp_path / "home")}

    def mvmctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mvm.cli.main", *args], env=env, capture_output=True, text=True)

    planned = mvmctl("run", "--dry-run", "--json", str(work), "--network", "allow-list", "--allow", "example.com:443")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["network"]["mode"] == "allow-list" and plan["network"]["allow"] == ["example.com:443"]
    assert plan["artifact"]["built"] is False and not (tmp_path / "home" / "store").exists()
    (tmp_path / "policy.toml").write_text("[network]\nopen = false\n")
    refused = mvmctl("up", "--dry-run", str(work), "--network", "open", "--policy", str(tmp_path / "policy.toml"))
    assert refused.returncode == 4 and "network.open" in refused.stderr and "policy.toml:2" in refused.stderr
    assert mvmctl("up", "--dry-run", str(work)).stdout.count("deny") >= 1
