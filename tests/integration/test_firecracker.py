"""The VM lifecycle on Firecracker: up --hypervisor firecracker, exec, down.

Runs only where a firecracker binary is on PATH and KVM can run an ordinary guest; on the
host this was written on neither holds, so it skips and says why. See docs/firecracker.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil
import pytest

from tests.conftest import Mvmctl

SLEEPER = """
    name = "fc-sleeper"
    [entrypoint]
    command = ["/bin/sh", "-c", "echo fc-started; while [ ! -f /tmp/stop ]; do sleep 0.2; done; exit 3"]
"""


def _why_not() -> str | None:
    if shutil.which("firecracker") is None:
        return "no firecracker binary on PATH"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not read-writable"
    if Path("/sys/module/kvm_pvm").exists():
        return "/dev/kvm is nested PVM KVM, which cannot run an ordinary guest kernel (DESIGN.md)"
    return None


pytestmark = [pytest.mark.vm, pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")]


def test_up_exec_down_on_firecracker(mvmctl: Mvmctl, workload_dir) -> None:
    directory = workload_dir(SLEEPER, name="fc-sleeper")
    up = mvmctl("up", str(directory), "--hypervisor", "firecracker", timeout=600)
    if up.returncode != 0 and "cannot run under Firecracker" in up.stderr + up.stdout:
        # The backend refuses an artifact whose kernel/initramfs lacks what Firecracker needs
        # (today: the vsock modules are not in mvm's initramfs). That refusal is the designed
        # outcome until the build pipeline ships them.
        pytest.xfail(f"artifact not Firecracker-ready: {(up.stderr or up.stdout).strip()}")
    assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
    try:
        record = json.loads((mvmctl.home / "vms" / "fc-sleeper" / "record.json").read_text())
        assert record["backend"] == "firecracker"
        proc = mvmctl("exec", "fc-sleeper", "--", "/bin/sh", "-c", "echo hello-from-firecracker; id -u")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == "hello-from-firecracker"
        proc = mvmctl("exec", "fc-sleeper", "--", "/bin/sh", "-c", "exit 7")
        assert proc.returncode == 7
        firecracker = psutil.Process(record["qemu_pid"])
    finally:
        down = mvmctl("down", "fc-sleeper", timeout=60)
    assert down.returncode == 0, down.stderr
    assert "VM fc-sleeper is down" in down.stdout
    assert not (mvmctl.home / "vms" / "fc-sleeper").exists()  # down removes what the VM kept
    _, alive = psutil.wait_procs([firecracker], timeout=20)  # and its Firecracker is gone
    assert alive == []
