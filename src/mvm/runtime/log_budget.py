"""A bound on how fast the guest can make the supervisor write its log.

Whatever the guest can provoke at will (a refused egress connection, an agent connection that
is not the agent's) is logged one line at a time up to a burst per window; the rest are
counted, and summed up in one line when the window ends (or the supervisor does). A guest
that hammers cannot fill the host's disk, and the log still says it happened, soon after.
"""

from __future__ import annotations

import sys
import time
import weakref

LOG_BURST = 20  # lines of one kind per LOG_WINDOW_S
LOG_WINDOW_S = 10.0

_LIVE: weakref.WeakSet[LogBudget] = weakref.WeakSet()  # for flush_all at the supervisor's end


class LogBudget:
    def __init__(self, what: str, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S) -> None:
        self.what = what  # the plural noun of the summary line: "egress refusals"
        self.burst, self.window_s = burst, window_s
        self.window_start, self.count, self.unlogged = 0.0, 0, 0
        _LIVE.add(self)

    def allow(self) -> bool:
        """May one more line be written now? (A refusal counts as one of the rest.)"""
        now = time.monotonic()
        if now - self.window_start > self.window_s:
            self.flush()
            self.window_start, self.count = now, 0
        self.count += 1
        if self.count <= self.burst:
            return True
        self.unlogged += 1
        if self.unlogged == 1:  # the sum is written when the window ends, not at the next event
            import asyncio  # (here: the CLI imports this module too, and not asyncio)

            try:
                asyncio.get_running_loop().call_later(self.window_s - (now - self.window_start), self.flush)
            except RuntimeError:
                pass  # no event loop (a test): the next event or flush_all writes it
        return False

    def flush(self) -> None:
        """Write the sum of what was held back, if anything was."""
        if self.unlogged:
            print(f"mvm-supervisor: {self.unlogged} more {self.what} (not logged one by one)",
                  file=sys.stderr, flush=True)
            self.unlogged = 0


def flush_all() -> None:
    """At the supervisor's end: its log does not stop at a gap that says nothing."""
    for budget in list(_LIVE):
        budget.flush()
