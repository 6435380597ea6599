"""Is KVM usable here? Only a real boot can tell.

On some hosts /dev/kvm exists but cannot run an ordinary guest (nested PVM KVM: the guest
crawls, then dies with an emulation failure). So the probe boots a built image's kernel and
initramfs under KVM and waits a few seconds for the initramfs marker. The verdict is cached
per host boot (``/proc/sys/kernel/random/boot_id``) in ``cache/host/kvm-probe.json``.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mvm.core.arch import is_native
from mvm.core.bootimage import ARTIFACT_FILE, BootImage
from mvm.core.state import MvmHome, write_json_atomic
from mvm.runtime.backends import qemu
from mvm.runtime.boot_markers import BootLog, ConsoleFilter
from mvm.runtime.process import spawn_tied

KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")
PROBE_DEADLINE_S = 5.0  # a working KVM reaches the initramfs in well under a second


@dataclass(frozen=True)
class KvmProbe:
    """``usable`` is None when no probe could run (no kernel built yet, or not asked to)."""

    device_present: bool
    pvm_hint: bool
    usable: bool | None
    reason: str
    boot_ms: int | None = None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _newest_image(home: MvmHome) -> BootImage | None:
    """The newest image with an initramfs: the probe's marker comes from it."""
    found = sorted(home.store.glob(f"*/{ARTIFACT_FILE}"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        image = BootImage.open(path.parent)
        if image.initrd is not None and is_native(image.arch):  # (an aarch64 image cannot probe x86 KVM)
            return image
    return None


def probe_kvm(home: MvmHome, *, run_if_needed: bool = True) -> KvmProbe:
    """The cached verdict for this host boot, or a fresh probe boot when ``run_if_needed``."""
    present, pvm = KVM_DEVICE.exists(), PVM_MODULE.exists()
    hint = " (kvm_pvm is loaded: nested PVM KVM, which ordinary guest kernels cannot use)" if pvm else ""
    if not present:
        return KvmProbe(False, pvm, False, "/dev/kvm does not exist")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return KvmProbe(True, pvm, False, "no permission to open /dev/kvm (join the kvm group)")
    cache = home.host_cache / "kvm-probe.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.pop("boot_id") == _boot_id():
            return KvmProbe(**cached)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not run_if_needed:
        return KvmProbe(True, pvm, None, "not probed yet since the host booted" + hint)
    image = _newest_image(home)
    if image is None:
        return KvmProbe(True, pvm, None, "no image built yet to probe with (run `mvmctl build`)" + hint)
    result = _probe_boot(image, pvm, hint)
    write_json_atomic(cache, {"boot_id": _boot_id(), **asdict(result)})
    return result


def _probe_boot(image: BootImage, pvm: bool, hint: str) -> KvmProbe:
    spec = qemu.QemuSpec(kernel=image.vmlinux, initrd=image.initrd, root_disk=None, accel="kvm", arch=image.arch,
                         memory_mib=128, boot_args="mvm.probe")  # its initramfs marks on the console
    started = time.monotonic()
    proc = spawn_tied(spec.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    boot = BootLog()  # no boot port on a probe: the initramfs marks on the console
    console = ConsoleFilter(sink=lambda _: None, boot_log=boot)
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while boot.seen("initramfs") is None:
            left = PROBE_DEADLINE_S - (time.monotonic() - started)
            if left <= 0 or not selector.select(left):
                return KvmProbe(True, pvm, False, f"a probe boot under KVM did not reach the initramfs in "
                                f"{PROBE_DEADLINE_S:.0f} s{hint}")
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                code = proc.wait()
                assert proc.stderr is not None
                said = proc.stderr.read().decode(errors="replace").strip().splitlines()
                detail = f": {said[-1][:160]}" if said else ""
                return KvmProbe(True, pvm, False, f"QEMU exited during the KVM probe boot (code {code}{detail}){hint}")
            console.feed(data)
        boot_ms = round((time.monotonic() - started) * 1000)
        return KvmProbe(True, pvm, True, f"a probe boot under KVM reached the initramfs in {boot_ms} ms", boot_ms)
    finally:
        selector.close()
        proc.kill()
        proc.wait()


def select_accel(home: MvmHome, *, may_probe: bool = True) -> tuple[str, str]:
    """("kvm" | "tcg", why). ``MVM_ACCEL`` forces one, for benchmarks and tests. Without
    ``may_probe`` only a cached verdict counts (no probe boot)."""
    forced = os.environ.get("MVM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced, f"MVM_ACCEL={forced}"
    probe = probe_kvm(home, run_if_needed=may_probe)
    if probe.usable:
        return "kvm", probe.reason
    return "tcg", f"KVM not usable: {probe.reason}"
