"""Admission: what a policy file forbids a plan (runtime/plan.py) to do, checked before anything
is built into a VM or booted.

The policies are ``$MVM_HOME/policy.toml`` when it exists and every ``--policy FILE`` given;
a plan must pass all of them (a ``--policy`` adds rules, it cannot lift the home's). A refusal
names the rule and the file:line that set it, so whoever reads the error can find and argue
with the rule rather than guess. The policy file is hostile input like any other: an unknown
table or key, or a value of the wrong type, is an error with its line, never ignored.

    [backend]
    forbid = ["docker"]                 # backends that may not run a VM (docker: reduced isolation)
    [network]
    open = false                        # forbid "open"; "allow-list" only with allow_patterns
    allow_patterns = ["*.debian.org"]   # every allow entry must match one (fnmatch), at start
                                        # and on every later change (`mvmctl network --allow`)
    [volumes]
    rw = false                          # forbid read-write volumes
    broad = false                       # forbid host paths like /, /home, /etc, a home directory
    [entrypoint]
    root = false                        # forbid what runs as uid 0
    [image]
    accessible = false                  # forbid accessible (dev) images: only sealed ones run
    [resources]
    max_vcpus = 4
    max_memory_mib = 2048
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvm.core.errors import MvmError

POLICY_FILE = "policy.toml"
BROAD_PATHS = ("/", "/home", "/root", "/etc", "/var", "/usr", "/boot", "/dev", "/proc", "/sys", "/tmp", "/run")
# table -> key -> the type its value must have
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "backend": {"forbid": list},
    "network": {"open": bool, "allow_patterns": list},
    "volumes": {"rw": bool, "broad": bool},
    "entrypoint": {"root": bool},
    "image": {"accessible": bool},
    "resources": {"max_vcpus": int, "max_memory_mib": int},
}


class PolicyError(MvmError):
    """A policy file that cannot be read or says something this version does not know."""

    exit_code = 2


class PolicyRefused(MvmError):
    """The plan breaks a rule of a policy."""

    exit_code = 4

    def __init__(self, rule: str, where: str, why: str) -> None:
        super().__init__(f"refused by policy rule {rule} ({where}): {why}",
                         f"change the plan, or the rule at {where}")
        self.rule = rule
        self.where = where
        self.why = why


@dataclass(frozen=True)
class Rule:
    table: str
    key: str
    value: Any
    where: str  # file:line

    @property
    def name(self) -> str:
        return f"{self.table}.{self.key}"


@dataclass(frozen=True)
class Policy:
    files: tuple[str, ...]
    rules: tuple[Rule, ...]

    def get(self, table: str, key: str) -> list[Rule]:
        return [r for r in self.rules if r.table == table and r.key == key]


def load(home_root: Path, extra: list[str | Path] | tuple[str | Path, ...] = ()) -> Policy:
    """The home's policy (when it exists) and every ``extra`` file (which must exist)."""
    files: list[Path] = []
    home_policy = home_root / POLICY_FILE
    if home_policy.exists():
        files.append(home_policy)
    for path in extra:
        if not Path(path).is_file():
            raise PolicyError(f"--policy {path}: there is no such file", "give the path of a policy.toml")
        files.append(Path(path))
    rules: list[Rule] = []
    for path in files:
        rules += _read(path)
    return Policy(tuple(str(p) for p in files), tuple(rules))


def _read(path: Path) -> list[Rule]:
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"cannot read the policy {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"the policy {path} is not TOML: {err}", "see docs/audit.md for its rules") from None
    lines = _key_lines(text)
    rules = []
    for table, body in data.items():
        if table not in SCHEMA or not isinstance(body, dict):
            raise PolicyError(f"{path}:{lines.get((table, ''), 1)}: unknown policy table [{table}]",
                              f"the tables are {', '.join(SCHEMA)}")
        for key, value in body.items():
            where = f"{path}:{lines.get((table, key), lines.get((table, ''), 1))}"
            kind = SCHEMA[table].get(key)
            if kind is None:
                raise PolicyError(f"{where}: unknown rule {table}.{key}",
                                  f"[{table}] knows {', '.join(SCHEMA[table])}")
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise PolicyError(f"{where}: {table}.{key} must be a {kind.__name__}")  # type: ignore[union-attr]
            if kind is list and not all(isinstance(v, str) for v in value):
                raise PolicyError(f"{where}: {table}.{key} must be a list of strings")
            rules.append(Rule(table, key, value, where))
    return rules


_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """(table, key) -> the line that sets it ((table, "") for the header): tomllib keeps none."""
    found: dict[tuple[str, str], int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if header := _HEADER.match(line):
            table = header.group(1)
            found.setdefault((table, ""), number)
        elif key := _KEY.match(line):
            found.setdefault((table, key.group(1)), number)
    return found


def check(policy: Policy, plan: dict[str, Any]) -> None:
    """Raise PolicyRefused at the first rule ``plan`` (Plan.as_dict()) breaks."""
    backend = plan["backend"]["name"]
    for rule in policy.get("backend", "forbid"):
        if backend in rule.value:
            raise PolicyRefused(rule.name, rule.where, f"the plan runs on {backend} "
                                f"({plan['backend']['isolation']} isolation), which it forbids")
    check_network(policy, plan["network"]["mode"], plan["network"]["allow"])
    for mount in plan["mounts"]:
        for rule in policy.get("volumes", "rw"):
            if not rule.value and not mount["readonly"]:
                raise PolicyRefused(rule.name, rule.where, f"volume {mount['host']} -> {mount['guest']} is read-write")
        for rule in policy.get("volumes", "broad"):
            if not rule.value and is_broad(mount["host"]):
                raise PolicyRefused(rule.name, rule.where, f"volume host path {mount['host']} is too broad")
    for rule in policy.get("entrypoint", "root"):
        if not rule.value and plan["entrypoint"]["uid"] == 0:
            raise PolicyRefused(rule.name, rule.where, "its entrypoint (and every exec) would run as root (uid 0)")
    for rule in policy.get("image", "accessible"):
        if not rule.value and plan["artifact"]["accessible"]:
            raise PolicyRefused(rule.name, rule.where, f"image {plan['artifact']['name']} is accessible (dev); "
                                "only sealed images are allowed")
    for rule, field, unit in ((policy.get("resources", "max_vcpus"), "vcpus", "vCPUs"),
                              (policy.get("resources", "max_memory_mib"), "memory_mib", "MiB")):
        for limit in rule:
            if plan["resources"][field] > limit.value:
                raise PolicyRefused(limit.name, limit.where, f"{plan['resources'][field]} {unit} is above the "
                                    f"limit of {limit.value}")


def check_network(policy: Policy, mode: str, allow: list[str], *, changed: bool = False) -> None:
    """The [network] rules, for a plan and for a running VM's list as `mvmctl network` (or the
    SDK's ``network.allow``) would leave it (``changed``). ``open = false`` forbids "open";
    it also forbids "allow-list" unless the policies give ``allow_patterns`` for its entries
    (which is what a file with ``open = false`` alone always meant: "deny" only)."""
    what = "the new allow-list would hold" if changed else "the image asks for"
    patterns = policy.get("network", "allow_patterns")
    for rule in policy.get("network", "open"):
        if rule.value or mode == "deny" or (mode == "allow-list" and patterns):
            continue
        if mode == "allow-list":
            raise PolicyRefused(rule.name, rule.where, "the image asks for network mode 'allow-list', and no "
                                "[network] allow_patterns says which entries may be listed (add them to admit it)")
        raise PolicyRefused(rule.name, rule.where, f"the image asks for network mode {mode!r}; only \"deny\" "
                            "and an \"allow-list\" whose entries match [network] allow_patterns are allowed")
    for rule in patterns:
        outside = [e for e in allow if not any(fnmatch.fnmatch(e, p) for p in rule.value)]
        if outside:
            raise PolicyRefused(rule.name, rule.where, f"{what} entries {outside[:5]} that match none of "
                                f"{rule.value}")


def is_broad(host_path: str) -> bool:
    """A host directory whose sharing exposes far more than a project: /, a system tree, or a
    home directory (and anything above one)."""
    path = os.path.normpath(os.path.expanduser(host_path))
    if path in BROAD_PATHS:
        return True
    home = os.path.normpath(os.path.expanduser("~"))
    parts = Path(path).parts
    return path == home or (len(parts) == 3 and parts[1] == "home")
