"""The handover from the launcher to the supervisor it execs: plain JSON on the command line.

Its own module so that `up`, which writes it, does not import the supervisor (and asyncio)
before QEMU has started.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class LaunchSpec:
    """What the launcher hands over through exec: QEMU is already running as our child."""

    vm_dir: str
    qemu_pid: int
    qemu_stdin: int  # file descriptors of QEMU's serial console pipes
    qemu_stdout: int
    qemu_stderr: int
    spawned: float  # time.monotonic() just before QEMU's exec (the clock is system-wide)
    commit_fd: int  # read end of a pipe from `up`: b"k" = keep the VM; EOF first = abandon it
    lock_fd: int  # flock on supervisor.lock: held for as long as this process lives
    expected_boot_ms: int
    agent_listen_fd: int | None = None  # docker: the agent connects to us on this socket
    agent_fd: int | None = None  # a clone's agent channel, connected, its hello and identity sent
    restored: float | None = None  # time.monotonic() when the launcher had restored a clone (no restore then)
    replaced: str | None = None  # a resumed VM's suspended directory, set aside until `up` commits (launcher.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LaunchSpec:
        return cls(**json.loads(text))
