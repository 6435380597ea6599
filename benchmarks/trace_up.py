"""Run `mvmctl up ...` in this process with wall-clock timestamps around its phases.

    python benchmarks/trace_up.py LOGFILE up DIR --name NAME [--hypervisor docker]

The parent sets BENCH_T0 (time.time() just before it exec'd us). Each line appended to
LOGFILE is JSON {"what", "start", "end"} in time.time() seconds; the forked launcher child
appends its own line (backend spawn) before it execs the supervisor.
Nothing in mvm is changed: functions are wrapped from outside, for this process only.
"""

from __future__ import annotations

import json
import os
import sys
import time

LOG = sys.argv[1]


def log(what: str, start: float, end: float) -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps({"what": what, "start": start, "end": end}) + "\n").encode())
    finally:
        os.close(fd)


def wrap(owner: object, attr: str, label: str) -> None:
    original = getattr(owner, attr)

    def timed(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            log(label, start, time.time())

    setattr(owner, attr, timed)


def main() -> None:
    started = time.time()
    import mvm.cli.commands as cli_commands
    import mvm.cli.vm as cli_vm  # what `up` loads lazily; loaded here so it is timed as imports
    from mvm.runtime import kvm, launcher, lifecycle  # launcher: what `up` imports before forking
    from mvm.runtime.backends import docker, qemu
    from mvm.runtime.client import VmClient

    log("imports (click, mvm.cli.vm, lifecycle, launcher, backends)", started, time.time())
    wrap(cli_vm, "boot_image", "find the image (its stamp, else a build or cache check)")
    wrap(lifecycle, "choose_backend", "choose backend")
    wrap(kvm, "select_accel", "select accel (KVM verdict)")
    wrap(docker, "ensure_image", "docker image inspect (ensure_image)")
    wrap(docker, "remove", "docker rm --force leftover")
    wrap(launcher, "launch", "fork + launch (parent side)")
    wrap(qemu, "create_overlay", "qemu-img create overlay")
    wrap(qemu, "spawn_tied", "child: spawn QEMU")
    wrap(docker, "spawn_tied", "child: spawn the docker CLI")
    original_call = VmClient.call
    original_connect = VmClient.connect.__func__

    def call(self, kind, *args, **kwargs):
        start = time.time()
        try:
            return original_call(self, kind, *args, **kwargs)
        finally:
            log(f"client call {kind!r}", start, time.time())

    waiting: dict[str, float] = {}

    def connect(cls, paths):
        waiting.setdefault("first", time.time())
        client = original_connect(cls, paths)
        log("wait for supervisor ctl.sock", waiting.pop("first"), time.time())
        return client

    VmClient.call = call
    VmClient.connect = classmethod(connect)
    try:
        cli_commands.cli.main(sys.argv[2:], prog_name="mvmctl", standalone_mode=False)
    finally:
        log("cli main returned", time.time(), time.time())


if __name__ == "__main__":
    main()
