"""Every mvmctl command line the documentation shows, run as written against real VMs.

The table is the documentation: each row is a line word for word (only names, directories
and `python` -> `python3` substituted, as a reader would), the page it comes from, and what
the text around it says happens. None may end in a usage error. The next documented command
is one row to add. Rows run in order: later ones use the VMs earlier ones started.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm

Check = Callable[[subprocess.CompletedProcess], None]


def ok(*words: str) -> Check:
    def check(proc: subprocess.CompletedProcess) -> None:
        assert proc.returncode == 0, proc.stderr
        for word in words:
            assert word in proc.stdout + proc.stderr, (word, proc.stdout, proc.stderr)
    return check


def refused(*words: str) -> Check:
    """A clear one-line refusal at run time (exit 1), never a usage error (exit 2)."""
    def check(proc: subprocess.CompletedProcess) -> None:
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        for word in words:
            assert word in proc.stderr, (word, proc.stderr)
    return check


def json_with(test: Callable[[object], bool]) -> Check:
    def check(proc: subprocess.CompletedProcess) -> None:
        assert proc.returncode == 0, proc.stderr
        assert test(json.loads(proc.stdout)), proc.stdout
    return check


@dataclass(frozen=True)
class Line:
    page: str
    line: str  # as documented
    where: str  # the directory it is typed in: "." is the test's work directory, or a project's
    check: Check
    stdin: str | None = None


MY_APP = """
    name = "my-app"
    [entrypoint]
    command = ["/bin/sh", "-c", "echo my-app-started; sleep 4; echo my-app-done"]
"""
DEVBOX = """
    name = "{name}"
    dev = true
    [entrypoint]
    command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
"""
AGENT = """
    name = "agent"
    dev = true
    packages = ["python3-minimal"]
    [entrypoint]
    command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
    [extra_files."/work/task.py"]
    content = "print('task done')"
    mode = "0644"
"""

HOST_THREADS = len(os.sched_getaffinity(0))
LINES = [
    Line("building", "mvmctl validate", "my-app", ok("my-app")),
    Line("limits", "mvmctl build ./my-app --vcpus 4 --mem 2G --data-disk 8G", ".", ok("my-app")),
    Line("building", "mvmctl build", "my-app", ok("my-app")),
    # More vCPUs than the host has threads is refused before boot unless --overcommit (README, "Sizing").
    *([Line("limits", "mvmctl up ./my-app --cpus 4 --memory 2G", ".", ok("VM my-app is up", "4 vCPU", "2048 MiB"))]
      if HOST_THREADS >= 4 else
      [Line("limits", "mvmctl up ./my-app --cpus 4 --memory 2G", ".", refused("4 vCPUs asked for", "--overcommit")),
       Line("README", "mvmctl up ./my-app --cpus 4 --memory 2G --overcommit", ".",
            ok("VM my-app is up", "4 vCPU", "2048 MiB"))]),
    Line("control surfaces", "mvmctl status my-app", ".", ok("my-app: running", "4 vCPU, 2048 MiB")),
    Line("limits", "mvmctl down my-app", ".", ok("VM my-app is down")),
    Line("building", "mvmctl run", "my-app", ok("VM my-app is running (detached)", "mvmctl logs -f my-app")),
    Line("building", "mvmctl detach my-app", ".", ok("already detached")),
    Line("building", "mvmctl wait my-app", ".", ok()),
    Line("building", "mvmctl run --attached", "my-app", ok("my-app-started", "my-app-done")),
    Line("architecture", "mvmctl doctor", ".", ok("qemu", "firecracker", "docker", "can run a VM: yes")),
    Line("architecture", "mvmctl up --flake . --hypervisor apple-container", "flakeapp",
         refused("apple-container is not available here", "macOS")),
    Line("architecture", "mvmctl up --flake . --hypervisor firecracker", "flakeapp",
         refused("firecracker is not available here")),
    Line("architecture", "mvmctl up --flake . --hypervisor docker", "flakeapp", ok("VM flakeapp is up", "docker")),
    Line("architecture", "mvmctl down flakeapp", ".", ok("is down")),
    Line("architecture", "mvmctl up --flake . --hypervisor qemu", "flakeapp", ok("VM flakeapp is up", "qemu")),
    Line("architecture", "mvmctl down flakeapp", ".", ok("is down")),
    Line("architecture", "mvmctl up ./devbox", ".", ok("VM devbox is up")),
    Line("architecture", "mvmctl forward devbox -p 8080:8080", ".", ok("-> VM devbox port 8080")),
    Line("control surfaces", "mvmctl up ./my-vm", ".", ok("VM my-vm is up")),
    Line("control surfaces", "mvmctl console my-vm", ".", ok("console-says-hi"), stdin="echo console-says-hi; exit\n"),
    Line("control surfaces", "mvmctl status my-vm", ".", ok("my-vm: running")),
    Line("control surfaces", "mvmctl build ./agent", ".", ok("agent")),
    Line("control surfaces", "mvmctl up ./agent --name agent-dev", ".", ok("VM agent-dev is up")),
    Line("control surfaces", "mvmctl exec agent-dev -- python3 /work/task.py", ".", ok("task done")),
    Line("control surfaces", "mvmctl logs agent-dev", ".", ok()),
    Line("control surfaces", "mvmctl ls --json", ".",
         json_with(lambda vms: {"agent-dev", "my-vm", "devbox"} <= {vm["name"] for vm in vms})),
    Line("control surfaces", "mvmctl boot-report agent-dev --json", ".",
         json_with(lambda report: report["phases_ms"]["agent-ready"] > 0)),
    Line("control surfaces", "mvmctl run --dry-run --json -- python3 task.py", "agent",
         json_with(lambda plan: plan["entrypoint"]["argv"] == ["python3", "task.py"] and plan["entrypoint"]["override"])),
    Line("control surfaces", 'mvmctl console agent-dev --command "uname -a"', ".", ok("Linux")),
    Line("control surfaces", "mvmctl down agent-dev", ".", ok("is down")),
]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, docker_mvmctl: Mvmctl):
    """The reader's directory: the projects the documentation's lines name."""
    root = tmp_path_factory.mktemp("docs")
    for name, toml in (("my-app", MY_APP), ("flakeapp", DEVBOX.format(name="flakeapp")),
                       ("devbox", DEVBOX.format(name="devbox")), ("my-vm", DEVBOX.format(name="my-vm")),
                       ("agent", AGENT)):
        (root / name).mkdir()
        (root / name / "mvm.toml").write_text(textwrap.dedent(toml))
    (root / "flakeapp" / "flake.nix").write_text("{ outputs = _: { }; }\n")  # a project with both
    yield root
    for name in ("my-app", "flakeapp", "devbox", "my-vm", "agent-dev"):
        docker_mvmctl("down", name, "--force")


@pytest.mark.parametrize("doc", LINES, ids=[f"{d.page}: {d.line}" for d in LINES])
def test_the_documented_line_does_what_the_text_says(doc: Line, work: Path, docker_mvmctl: Mvmctl) -> None:
    words = shlex.split(doc.line)
    assert words[0] == "mvmctl"
    if "8080:8080" in words and not _port_free(8080):
        pytest.skip("port 8080 is taken on this host")
    cwd = work if doc.where == "." else work / doc.where
    proc = subprocess.run(docker_mvmctl.argv(*words[1:]), env=docker_mvmctl.env, cwd=cwd, capture_output=True,
                          text=True, input=doc.stdin, timeout=600,
                          stdin=None if doc.stdin is not None else subprocess.DEVNULL)
    assert proc.returncode != 2, f"a usage error for a documented line: {proc.stderr}"
    doc.check(proc)
