"""VM lifecycle functions shared by the CLI, the SDK and MCP.

``run_attached`` boots an artifact in the foreground: the console streams to the caller, the
entrypoint's exit status becomes the result, and the VM never outlives the call (Ctrl-C, an
exception, even SIGKILL of this process all end QEMU).
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mvm.core.artifact import Artifact
from mvm.core.errors import BackendUnavailable, VmError
from mvm.core.state import MvmHome
from mvm.runtime import qemu
from mvm.runtime.client import AgentChannel
from mvm.runtime.console import BootMarker, ConsoleFilter, first_marker
from mvm.runtime.kvm import select_accel

DETACH_KEY = b"\x1d"  # Ctrl-]: leave an interactive console (stops the VM in attached mode)
STOP_GRACE_S = 5.0
BOOT_TIMEOUT_FACTOR = 20  # give up when no /init marker after 20x the expected boot time


@dataclass
class RunResult:
    exit_code: int
    accel: str
    accel_reason: str
    started: float
    markers: list[BootMarker] = field(default_factory=list)
    console_log: Path | None = None
    agent_hello: dict | None = None  # the agent's greeting over its channel, if it came in time
    agent_pong: bool = False  # whether it answered a ping on that channel

    def phase_ms(self, phase: str) -> int | None:
        marker = first_marker(self.markers, phase)
        return None if marker is None else round((marker.host_time - self.started) * 1000)


@contextmanager
def _raw_terminal(fd: int | None) -> Iterator[None]:
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_attached(
    home: MvmHome,
    artifact: Artifact,
    *,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    output: Callable[[bytes], None] | None = None,
    stdin_fd: int | None = None,
) -> RunResult:
    """Boot ``artifact``, stream its console to ``output``, return the entrypoint's status.

    ``stdin_fd`` (for accessible images) is relayed to the console; a terminal is put in raw
    mode and Ctrl-] stops the VM.
    """
    hypervisor = artifact.meta.workload.hypervisor
    if hypervisor not in ("auto", "qemu"):
        raise BackendUnavailable(f"hypervisor {hypervisor!r} (from mvm.toml) is not supported by this mvm version; "
                                 "only qemu is", "set hypervisor = \"qemu\" or remove it; `mvmctl doctor` lists backends")
    sink = output or (lambda data: (sys.stdout.buffer.write(data), sys.stdout.buffer.flush()))
    accel, accel_reason = select_accel(home)
    scratch = home.root / "run" / f"{artifact.meta.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    log_path = home.root / "logs" / f"{artifact.meta.name}.console.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        overlay = scratch / "overlay.qcow2"
        qemu.create_overlay(artifact.rootfs, overlay)
        spec = qemu.artifact_spec(artifact, overlay, accel, vcpus=vcpus, memory_mib=memory_mib)
        spec.agent_socket = scratch / "agent.sock"
        if artifact.meta.data_disk_bytes:
            spec.data_disk = scratch / "data.ext4"
            qemu.create_data_disk(spec.data_disk, artifact.meta.data_disk_bytes)
        with log_path.open("wb") as log, _raw_terminal(stdin_fd):
            def tee(data: bytes) -> None:
                log.write(data)
                sink(data)

            console = ConsoleFilter(sink=tee, crlf_to_lf=stdin_fd is None or not os.isatty(stdin_fd))
            started = time.monotonic()
            proc = qemu.spawn(spec.argv(), stdin=subprocess.PIPE if stdin_fd is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            agent = AgentChannel(spec.agent_socket)
            status = _pump(proc, console, agent, stdin_fd, started, artifact.meta.expected_boot_ms)
        exit_code = console.exit_status()
        if exit_code is None:
            if status == "interrupted":
                exit_code = 130
            else:
                raise VmError(f"the VM stopped before its entrypoint finished ({status})",
                              f"see the console log {log_path}")
        return RunResult(exit_code, accel, accel_reason, started, console.markers, log_path,
                         agent_hello=agent.hello, agent_pong=agent.pong is not None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _pump(proc: subprocess.Popen, console: ConsoleFilter, agent: AgentChannel, stdin_fd: int | None,
          started: float, expected_boot_ms: int) -> str:
    """Move bytes until QEMU exits. Returns how it ended: "exited", "interrupted", or why not."""
    assert proc.stdout is not None and proc.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, "console")
    selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
    stdin_waiting = stdin_fd is not None  # input typed before the shell's first prompt is lost
    errors = bytearray()
    boot_deadline = started + expected_boot_ms * BOOT_TIMEOUT_FACTOR / 1000
    ended = "exited"
    try:
        open_streams = 2
        while open_streams:
            if stdin_waiting and console.output_after_entrypoint:
                selector.register(stdin_fd, selectors.EVENT_READ, "stdin")  # type: ignore[arg-type]
                stdin_waiting = False
            if agent.sock is None and agent.try_connect():
                selector.register(agent.sock, selectors.EVENT_READ, "agent")  # type: ignore[arg-type]
            if console.seen("init") is None and time.monotonic() > boot_deadline:
                ended = f"no sign of /init after {expected_boot_ms * BOOT_TIMEOUT_FACTOR / 1000:.0f} s"
                break
            for key, _ in selector.select(timeout=0.5):
                if key.data == "stdin":
                    data = os.read(stdin_fd, 4096)  # type: ignore[arg-type]
                    if not data or DETACH_KEY in data:
                        selector.unregister(stdin_fd)
                        if DETACH_KEY in data:
                            _stop(proc)
                            return "interrupted"
                        continue
                    assert proc.stdin is not None
                    proc.stdin.write(data)
                    proc.stdin.flush()
                    continue
                if key.data == "agent":
                    if not agent.on_readable():
                        selector.unregister(key.fileobj)
                        agent.close()
                    elif agent.hello_at is not None and console.seen("agent-ready") is None:
                        console.markers.append(BootMarker("agent-ready", [f"uid={agent.hello.get('uid')}"],
                                                          agent.hello.get("uptime"), agent.hello_at))
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
                elif key.data == "console":
                    console.feed(data)
                else:
                    errors += data
        console.flush()
        if ended != "exited":
            _stop(proc)
            return ended
        code = proc.wait(timeout=STOP_GRACE_S)
        if console.exit_status() is None:
            detail = errors.decode(errors="replace").strip().splitlines()
            return f"QEMU exited with code {code}" + (f": {detail[-1]}" if detail else "")
        return ended
    except KeyboardInterrupt:
        _stop(proc)
        return "interrupted"
    finally:
        selector.close()
        agent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM lets QEMU close its files; SIGKILL if it does not within the grace time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
