"""Debian's cloud kernel: what `kernel = "debian"` boots, and the default wherever mvm's own is
not built (a fresh $MVM_HOME, an aarch64 guest). The suite's default is ours once the session
has built it, so this module keeps the initramfs path booting."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import Mvmctl

pytestmark = pytest.mark.vm


def test_debians_kernel_boots_through_its_initramfs(mvmctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir("""
        name = "debk"
        kernel = "debian"
        [entrypoint]
        command = ["/bin/sh", "-c", "uname -r; grep -c . /proc/modules; exit 4"]
    """)
    record = json.loads(mvmctl("build", str(directory), "--json", check=True).stdout)
    assert record["kernel"]["name"] == "debian" and record["hashes"]["initrd"]
    proc = mvmctl("run", "--attached", str(directory), "--boot-report")
    assert proc.returncode == 4, proc.stderr
    release, modules = proc.stdout.split()
    assert release.endswith("-cloud-amd64")
    assert int(modules) > 0  # the initramfs loaded virtio's modules before switch_root
    order = []
    for line in proc.stderr.splitlines():
        match = re.match(r"\s+([a-z-]+)\s+(\d+) ms", line)
        if match:
            order.append((match.group(1), int(match.group(2))))
    phases = dict(order)
    # (up to the entrypoint's start: a workload this short may end before its agent answers)
    chain = ["kernel", "initramfs", "root-mounted", "init", "agent-started", "entrypoint"]
    assert all(phase in phases for phase in chain), proc.stderr
    assert [phases[p] for p in chain] == sorted(phases[p] for p in chain), proc.stderr
