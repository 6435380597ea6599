"""The guest's console as the supervisor relays it: to console.log, to attached clients and
`logs -f` followers, with a replay buffer for a client that attaches late; keystrokes from an
attached client go back to it. Boot markers are taken out here and applied to the record.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from mvm.core import protocol
from mvm.runtime.console import BootMarker, ConsoleFilter

if TYPE_CHECKING:
    from mvm.runtime.supervisor.supervisor import Supervisor

REPLAY_LIMIT = 1 << 20  # console bytes kept in memory for a client that attaches late
STDERR_TAIL = 4096  # the end of the process's stderr, for the stop reason


class ConsoleRelay:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.log = sup.paths.console_log.open("ab")
        self.filter = ConsoleFilter(sink=self.on_user_output)
        self.replay = bytearray()
        self.input = bytearray()  # held until an interactive entrypoint speaks
        self.stderr_tail = bytearray()
        self.markers_seen = 0  # markers already applied to the record
        self.agent_ready_marker: BootMarker | None = None

    async def pump(self, fd: int) -> None:
        reader = await _reader_for(fd)
        while data := await reader.read(65536):
            self.filter.feed(data)
            self.on_markers()

    async def pump_stderr(self, fd: int) -> None:
        reader = await _reader_for(fd)
        while data := await reader.read(65536):
            self.stderr_tail = (self.stderr_tail + data)[-STDERR_TAIL:]

    def flush(self) -> None:
        self.filter.flush()

    def close(self) -> None:
        self.log.close()

    def on_user_output(self, data: bytes) -> None:
        self.log.write(data)
        self.log.flush()
        self.replay += data
        if len(self.replay) > REPLAY_LIMIT:
            del self.replay[: len(self.replay) - REPLAY_LIMIT]
        for client in self.sup.clients.clients:
            if client.attached and client.attach_id is not None:
                client.send(protocol.encode({"type": "stdout", "id": client.attach_id}, data))
            if client.follow_id is not None:
                client.send(protocol.encode({"type": "data", "id": client.follow_id}, data))
        self.flush_input()

    def type_in(self, data: bytes) -> None:
        """An attached client's keystrokes, for the guest's console."""
        self.input += data
        self.flush_input()

    def flush_input(self) -> None:
        if self.input and self.filter.output_after_entrypoint:
            try:
                os.write(self.sup.watch.proc.stdin, bytes(self.input))
            except OSError:
                pass
            self.input.clear()

    # -- boot markers -------------------------------------------------------------------------

    def on_markers(self) -> None:
        record = self.sup.record
        seen = self.markers_seen  # not len(record.markers): that also holds agent-ready
        if len(self.filter.markers) == seen:
            return
        self.markers_seen = len(self.filter.markers)
        for marker in self.filter.markers[seen:]:
            if marker.phase in ("service-start", "service-exit") and marker.args:
                service = record.services.setdefault(marker.args[0], {"state": "starting", "restarts": -1,
                                                                      "last_exit": None})
                if marker.phase == "service-start":
                    service["state"], service["restarts"] = "running", service["restarts"] + 1
                else:
                    service["state"] = "exited"
                    service["last_exit"] = int(marker.args[1]) if len(marker.args) > 1 else None
        self.record_markers()
        record.save(self.sup.paths)

    def record_markers(self) -> None:
        spawned = self.sup.spec.spawned
        markers = [_marker_json(m, spawned) for m in self.filter.markers]
        if self.agent_ready_marker is not None:
            markers.append(_marker_json(self.agent_ready_marker, spawned))
            markers.sort(key=lambda m: m["ms"])
        self.sup.record.markers = markers


async def _reader_for(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader


def _marker_json(marker: BootMarker, spawned: float) -> dict[str, Any]:
    return {"phase": marker.phase, "args": marker.args, "guest_uptime": marker.guest_uptime,
            "ms": round((marker.host_time - spawned) * 1000)}
