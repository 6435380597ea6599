"""A private dockerd for tests and benchmarks, started only when none answers.

Flags from DESIGN.md ("This machine"): no iptables, no bridge, vfs storage, its own data
and exec roots and socket, so it touches nothing of a dockerd the host may run. Stopped by
its PID, which we started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Dockerd:
    host: str  # a DOCKER_HOST value
    proc: subprocess.Popen | None  # None when an existing daemon is used

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def answers(host: str) -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                          env={**os.environ, "DOCKER_HOST": host}, timeout=20, stdin=subprocess.DEVNULL)
    return proc.returncode == 0


def start_dockerd(root: Path) -> Dockerd | None:
    """An answering dockerd (the host's, or our own under ``root``); None when there is no dockerd binary."""
    existing = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if answers(existing):
        return Dockerd(existing, None)
    if shutil.which("dockerd") is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    host = f"unix://{sock}"
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none", "--storage-driver=vfs",
         "--data-root", str(root / "data"), "--exec-root", str(root / "exec"), "--pidfile", str(root / "dockerd.pid"),
         "-H", host],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {proc.returncode}; see {root / 'dockerd.log'}")
        if sock.exists() and answers(host):
            return Dockerd(host, proc)
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"dockerd did not answer within 60 s; see {root / 'dockerd.log'}")
