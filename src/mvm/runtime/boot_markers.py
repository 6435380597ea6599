"""Boot markers: what the guest's PID 1 tells the host about the boot and the entrypoint's end.

/init writes ``mvm-boot: <phase> [args] <guest uptime>`` lines on a channel only root in the
guest can write (a virtio-serial port on QEMU, a FIFO under Docker), never on the console,
which carries the workload's bytes and nothing the host believes. Even so, each line is
parsed as hostile input: a dev image's root workload can reach that channel too. Only known
phases with well-formed arguments are kept; everything else is counted and dropped.

Firecracker has no such channel here (one serial port, vsock only for the agent), so its
markers still ride the console and :class:`ConsoleFilter` takes them out; on that backend a
workload can forge them (docs/firecracker.md says so).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MARKER = b"mvm-boot: "
MAX_LINE = 512  # a marker line is short; longer is not a marker
MAX_SERVICES = 64  # distinct service names tracked (a services image declares a handful)
PHASES = frozenset({"initramfs", "root-mounted", "init", "agent-started", "entrypoint", "exit", "shutdown",
                    "service-start", "service-exit", "fatal"})
SERVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def reported_uptime(value: object) -> float | None:
    """A guest uptime the agent put in its hello (hostile input): a plain, finite, sane
    number of seconds, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 <= value < 1e9 else None  # (NaN fails both comparisons; inf the second)


@dataclass
class BootMarker:
    phase: str
    args: list[str]
    guest_uptime: float | None
    host_time: float  # time.monotonic() when the line arrived


def _status(word: str) -> int | None:
    return int(word) if word.isdigit() and int(word) <= 255 else None


def parse_marker(line: bytes, host_time: float | None = None) -> BootMarker | None:
    """The marker in one line (with or without the prefix), or None if it is not a valid one."""
    line = line.removeprefix(MARKER).rstrip(b"\r\n")
    if len(line) > MAX_LINE:
        return None
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if not words or words[0] not in PHASES:
        return None
    phase, args, uptime = words[0], words[1:], None
    if args and re.fullmatch(r"\d{1,9}(\.\d{1,9})?", args[-1]) and phase != "fatal":
        uptime = float(args.pop())
    well_formed = {
        "exit": len(args) == 1 and _status(args[0]) is not None,
        "service-start": len(args) == 1 and SERVICE_NAME.fullmatch(args[0]) is not None,
        "service-exit": len(args) == 2 and SERVICE_NAME.fullmatch(args[0]) is not None
                        and _status(args[1]) is not None,
        "fatal": True,
    }.get(phase, not args)
    if not well_formed:
        return None
    return BootMarker(phase, args, uptime, time.monotonic() if host_time is None else host_time)


@dataclass
class BootLog:
    """The markers received so far: the first of each phase (for the boot report), the last
    exit status, and each service's state. Bounded however many lines arrive."""

    markers: list[BootMarker] = field(default_factory=list)
    services: dict[str, dict[str, object]] = field(default_factory=dict)  # name -> {state, restarts, last_exit}
    rejected: int = 0  # lines that were not valid markers
    last_exit: int | None = None
    changes: int = 0  # grows with every marker that changed something (a cheap "anything new?")
    _partial: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> int:
        """Bytes from the boot channel; returns how many markers changed something."""
        self._partial += data
        changed = 0
        while (end := self._partial.find(b"\n")) >= 0:
            line = bytes(self._partial[:end])
            del self._partial[: end + 1]
            changed += self.add_line(line)
        if len(self._partial) > MAX_LINE:  # no newline in sight: not a marker, drop it
            self._partial.clear()
            self.rejected += 1
        return changed

    def add_line(self, line: bytes) -> int:
        # From the last prefix on: bytes a root workload left without a newline must not
        # swallow the line /init writes next.
        marker = parse_marker(line[max(0, line.rfind(MARKER)):])
        if marker is None:
            self.rejected += 1
            return 0
        return self.add(marker)

    def add(self, marker: BootMarker) -> int:
        changed = self._apply(marker)
        self.changes += changed
        return changed

    def _apply(self, marker: BootMarker) -> int:
        if marker.phase == "exit":
            self.last_exit = int(marker.args[0])
        elif marker.phase.startswith("service-"):
            return self._service(marker)
        if self.seen(marker.phase) is None:
            self.markers.append(marker)
            return 1
        return 1 if marker.phase == "exit" else 0

    def _service(self, marker: BootMarker) -> int:
        name = marker.args[0]
        if name not in self.services and len(self.services) >= MAX_SERVICES:
            self.rejected += 1
            return 0
        service = self.services.setdefault(name, {"state": "starting", "restarts": -1, "last_exit": None})
        if marker.phase == "service-start":
            service["state"], service["restarts"] = "running", int(service["restarts"]) + 1  # type: ignore[call-overload]
        else:
            service["state"], service["last_exit"] = "exited", int(marker.args[1])
        return 1

    def exit_status(self) -> int | None:
        return self.last_exit

    def seen(self, phase: str) -> BootMarker | None:
        return next((m for m in self.markers if m.phase == phase), None)


@dataclass
class ConsoleFilter:
    """Console bytes -> ``sink``, with CRLF line ends made LF (a prompt with no newline passes
    at once). With a ``boot_log`` (Firecracker only) marker lines are taken out into it."""

    sink: Callable[[bytes], None]
    boot_log: BootLog | None = None
    crlf_to_lf: bool = True
    # A whole line this matches is held back until more output follows (then it is passed on)
    # or the stream ends (then ``drop_held`` decides): for the kernel's last words at power-off.
    hold_line: Callable[[bytes], bool] | None = None
    drop_held: Callable[[], bool] | None = None
    # A line start this matches may still become such a line: it waits for the rest, since a
    # console read can end anywhere (QEMU's UART writes byte by byte).
    hold_start: Callable[[bytes], bool] | None = None
    _held: bytes = b""
    _pending: bytes = b""
    _mid_line: bool = False

    def feed(self, data: bytes) -> None:
        data = self._pending + data
        self._pending = b""
        out = bytearray()
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            line = data[start:] if end < 0 else data[start : end + 1]
            at_line_start = not self._mid_line
            markers_here = self.boot_log is not None and at_line_start
            if end < 0 and markers_here and len(line) <= MAX_LINE and (MARKER.startswith(line) or line.startswith(MARKER)):
                self._pending = line  # may become a marker: wait for the rest of it
                break
            if end < 0 and at_line_start and self.hold_start is not None and len(line) <= MAX_LINE \
                    and self.hold_start(line):
                self._pending = line  # may become the held line: wait for the rest of it
                break
            if end < 0 and self.crlf_to_lf and line.endswith(b"\r"):
                line, self._pending = line[:-1], b"\r"  # half of a CRLF split across two reads
            if markers_here and line.startswith(MARKER) and self.boot_log is not None:
                self.boot_log.add_line(line)
            elif at_line_start and end >= 0 and self.hold_line is not None and self.hold_line(line):
                out += self._held
                self._held = line
            else:
                out += self._held + line
                self._held = b""
            self._mid_line = end < 0 and not self._pending
            if end < 0:
                break
            start = end + 1
        if out:
            self.sink(bytes(out).replace(b"\r\n", b"\n") if self.crlf_to_lf else bytes(out))

    @property
    def holding(self) -> bool:
        """A held line (or the start of one) waits for what follows it (or for the stream's end)."""
        return bool(self._held) or bool(self._pending and self.hold_start is not None and self.hold_start(self._pending))

    def flush(self) -> None:
        held, self._held = self._held, b""
        if held and not (self.drop_held is not None and self.drop_held()):
            self.sink(held.replace(b"\r\n", b"\n") if self.crlf_to_lf else held)
        if self._pending:
            pending, self._pending = self._pending, b""
            if pending.startswith(MARKER) and self.boot_log is not None:
                self.boot_log.add_line(pending)
            elif self.hold_start is not None and self.hold_start(pending) and self.drop_held is not None \
                    and self.drop_held():
                pass  # the start of the held line, cut off by the end
            else:
                self.sink(pending)
