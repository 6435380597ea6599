"""The guest's serial console: user output, with /init's boot markers taken out.

/init prints ``mvm-boot: <phase> [args] <guest uptime>`` lines. The host notes when each
arrives (for boot reports) and reads the entrypoint's exit status from ``exit N``; everything
else passes through untouched, as soon as it arrives (an interactive prompt has no newline).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

MARKER = b"mvm-boot: "


@dataclass
class BootMarker:
    phase: str
    args: list[str]
    guest_uptime: float | None
    host_time: float  # time.monotonic() when the line arrived


@dataclass
class ConsoleFilter:
    """Feed raw console bytes; user bytes go to ``sink``, markers to ``markers``."""

    sink: Callable[[bytes], None]
    crlf_to_lf: bool = True
    markers: list[BootMarker] = field(default_factory=list)
    after_exit: bytearray = field(default_factory=bytearray)
    output_after_entrypoint: int = 0  # an interactive entrypoint is ready once it has spoken
    _pending: bytes = b""
    _mid_line: bool = False

    @property
    def finished(self) -> bool:
        return self.exit_status() is not None

    def feed(self, data: bytes) -> None:
        data = self._pending + data
        self._pending = b""
        out = bytearray()
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            line = data[start:] if end < 0 else data[start : end + 1]
            at_line_start = not self._mid_line
            if end < 0 and at_line_start and (MARKER.startswith(line) or line.startswith(MARKER)):
                self._pending = line  # may become a marker: wait for the rest of it
                break
            if end < 0 and self.crlf_to_lf and line.endswith(b"\r"):
                line, self._pending = line[:-1], b"\r"  # half of a CRLF split across two reads
            if at_line_start and line.startswith(MARKER):
                self._record(line)
            elif not self.finished:
                out += line
            else:
                self.after_exit += line  # shutdown noise after the entrypoint ended
            self._mid_line = end < 0 and not self._pending
            if end < 0:
                break
            start = end + 1
        if out and self.seen("entrypoint") is not None:
            self.output_after_entrypoint += len(out)
        if out:
            self.sink(bytes(out).replace(b"\r\n", b"\n") if self.crlf_to_lf else bytes(out))

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, b""
            if pending.startswith(MARKER):
                self._record(pending)
            else:
                self.sink(pending)

    def _record(self, line: bytes) -> None:
        words = line[len(MARKER):].decode(errors="replace").split()
        if not words:
            return
        uptime = None
        try:
            uptime = float(words[-1])
            words = words[:-1]
        except ValueError:
            pass
        if words:
            self.markers.append(BootMarker(words[0], words[1:], uptime, time.monotonic()))

    def exit_status(self) -> int | None:
        for marker in reversed(self.markers):
            if marker.phase == "exit" and marker.args:
                try:
                    return int(marker.args[0])
                except ValueError:
                    return None
        return None

    def seen(self, phase: str) -> BootMarker | None:
        return first_marker(self.markers, phase)


def first_marker(markers: list[BootMarker], phase: str) -> BootMarker | None:
    return next((m for m in markers if m.phase == phase), None)
