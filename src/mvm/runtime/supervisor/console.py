"""The guest's console and its boot markers, as the supervisor relays them.

The console carries the workload's bytes and nothing the host believes: they go to
console.log (rotated at a size cap), to attached clients and `logs -f` followers, and into a
bounded replay buffer for a client that attaches late. Keystrokes of an attached client go
back to it. Boot markers arrive on their own channel (runtime/boot_markers.py) and update
the record: phases for the boot report, services, the entrypoint's exit status.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import TYPE_CHECKING, Any

from mvm.core import protocol
from mvm.runtime.boot_markers import BootLog, BootMarker, ConsoleFilter

if TYPE_CHECKING:
    from mvm.runtime.supervisor.supervisor import Supervisor

REPLAY_LIMIT = 1 << 20  # console bytes kept in memory for a client that attaches late
STDERR_TAIL = 4096  # the end of the process's stderr, for the stop reason
LOG_SEGMENT = 8 << 20  # console.log is rotated to console.log.1 beyond this: at most ~16 MiB on disk
READ_SIZE = 65536
SETTLE_S = 0.05
SETTLE_MAX_S = 2.0
POWER_DOWN = re.compile(rb"\[ *\d+\.\d+\] reboot: Power down\r?\n")
POWER_DOWN_WORDS = b" reboot: Power down\r"
_POWER_DOWN_START = re.compile(rb"\[ *(?:\d+(?:\.(?:\d+(?:\](.*))?)?)?)?", re.DOTALL)


def power_down_start(partial: bytes) -> bool:
    """Whether an incomplete line may still become the kernel's power-down line."""
    match = _POWER_DOWN_START.fullmatch(partial)
    return match is not None and (match[1] is None or POWER_DOWN_WORDS.startswith(match[1]))


class ConsoleRelay:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.log = sup.paths.console_log.open("ab")
        self.boot = BootLog()
        markers_on_console = sup.backend.markers_on_console
        self.filter = ConsoleFilter(sink=self.on_user_output, boot_log=self.boot if markers_on_console else None,
                                    hold_line=POWER_DOWN.fullmatch, hold_start=power_down_start,
                                    drop_held=self.ended)
        self.replay = bytearray()
        self.input = bytearray()  # held until an interactive entrypoint speaks
        self.output_after_entrypoint = 0
        self.stderr_tail = bytearray()
        self.agent_ready_marker: BootMarker | None = None  # the host's own observation: the hello
        self.agent_imported_marker: BootMarker | None = None  # what the agent's hello says
        self.host_markers: list[BootMarker] = []  # a clone's restored and identity: the host's own

    async def pump(self, fd: int) -> None:
        reader = await _reader_for(fd)
        while data := await reader.read(READ_SIZE):
            changes = self.boot.changes
            self.filter.feed(data)
            if self.boot.changes != changes:
                self.on_markers()
            await self.sup.clients.wait_for_slow_readers()

    async def pump_stderr(self, fd: int) -> None:
        reader = await _reader_for(fd)
        while data := await reader.read(READ_SIZE):
            self.stderr_tail = (self.stderr_tail + data)[-STDERR_TAIL:]

    async def serve_boot_channel(self) -> None:
        sup = self.sup
        if not sup.backend.markers_on_console:
            await sup.backend.serve_boot_channel(sup.paths, self.on_boot_bytes)

    def on_boot_bytes(self, data: bytes) -> None:
        if self.boot.feed(data):
            self.on_markers()

    async def settle(self) -> None:
        """After the VM's process has exited: let the last bytes of the console and the boot
        channel arrive. While the kernel's power-down line is held and /init's exit marker has
        not come yet, wait for it (up to SETTLE_MAX_S): under load the marker can trail the
        console, and without it the held line would pass for the workload's output."""
        await asyncio.sleep(SETTLE_S)
        deadline = asyncio.get_running_loop().time() + SETTLE_MAX_S
        while self.filter.holding and not self.ended() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    def flush(self) -> None:
        self.filter.flush()

    def close(self) -> None:
        self.log.close()

    # -- the workload's bytes ------------------------------------------------------------------

    def ended(self) -> bool:
        """PID 1 reported the end: then a held "[ 3.16] reboot: Power down" (the kernel's last
        word, printed at emergency level whatever the loglevel) is not the workload's output."""
        return self.boot.exit_status() is not None or self.boot.seen("shutdown") is not None

    def on_user_output(self, data: bytes) -> None:
        self.write_log(data)
        self.replay += data
        if len(self.replay) > REPLAY_LIMIT:
            del self.replay[: len(self.replay) - REPLAY_LIMIT]
        if self.boot.seen("entrypoint") is not None:
            self.output_after_entrypoint += len(data)
        for client in self.sup.clients.clients:
            if client.attached and client.attach_id is not None:
                client.send(protocol.encode({"type": "stdout", "id": client.attach_id}, data))
            if client.follow_id is not None:
                client.follow(data)
        self.flush_input()

    def write_log(self, data: bytes) -> None:
        if self.log.tell() + len(data) > LOG_SEGMENT and self.log.tell() > 0:
            self.log.close()
            os.replace(self.sup.paths.console_log, self.sup.paths.console_log_previous)
            self.log = self.sup.paths.console_log.open("ab")
        self.log.write(data)
        self.log.flush()

    def type_in(self, data: bytes) -> None:
        """An attached client's keystrokes, for the guest's console (bounded: a console that
        never reads its input does not grow the supervisor)."""
        self.input += data
        del self.input[:-REPLAY_LIMIT]
        self.flush_input()

    def flush_input(self) -> None:
        if self.input and self.output_after_entrypoint:
            try:
                written = os.write(self.sup.watch.proc.stdin, bytes(self.input))
            except BlockingIOError:
                return
            except OSError:
                written = len(self.input)
            del self.input[:written]

    # -- boot markers -------------------------------------------------------------------------

    def on_markers(self) -> None:
        record = self.sup.record
        record.services = {name: dict(state) for name, state in self.boot.services.items()}
        self.record_markers()
        record.save(self.sup.paths)

    def record_markers(self) -> None:
        """The markers with ms since the VM's process was spawned. A marker says when the guest
        reached it (its uptime), which is not when it arrived: /init reports the initramfs's
        start only once it has a channel. So the guest's clock is put on the host's through the
        marker that arrived soonest after it was made, and every marker is placed by its uptime."""
        spawned = self.sup.spec.spawned
        timed = [m for m in self.boot.markers if m.guest_uptime is not None]
        kernel_start = min((m.host_time - spawned - m.guest_uptime for m in timed), default=None)  # type: ignore[operator]
        markers = [_marker_json(m, spawned, kernel_start) for m in self.boot.markers]
        markers += [_marker_json(m, spawned, None) for m in self.host_markers]
        if self.agent_ready_marker is not None:
            ready = _marker_json(self.agent_ready_marker, spawned, None)
            markers.append(ready)
            imported = self._agent_imported(spawned, kernel_start, ready["ms"])
            if imported is not None:
                markers.append(imported)
        markers.sort(key=lambda m: m["ms"])
        self.sup.record.markers = markers

    def _agent_imported(self, spawned: float, kernel_start: float | None, ready_ms: int) -> dict[str, Any] | None:
        """The agent's own word on when it had imported its modules, on the host's clock
        through /init's markers; only if it lies between /init starting the agent and the
        agent's hello reaching us (one 10 ms tick of the guest's uptime either side)."""
        started = self.boot.seen("agent-started")
        if self.agent_imported_marker is None or kernel_start is None or started is None:
            return None
        marker = _marker_json(self.agent_imported_marker, spawned, kernel_start)
        started_ms = _marker_json(started, spawned, kernel_start)["ms"]
        return marker if started_ms - 10 <= marker["ms"] <= ready_ms + 10 else None


async def _reader_for(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader


def _marker_json(marker: BootMarker, spawned: float, kernel_start: float | None) -> dict[str, Any]:
    if kernel_start is not None and marker.guest_uptime is not None:
        seconds = kernel_start + marker.guest_uptime
    else:
        seconds = marker.host_time - spawned
    return {"phase": marker.phase, "args": marker.args, "guest_uptime": marker.guest_uptime, "ms": round(seconds * 1000)}
