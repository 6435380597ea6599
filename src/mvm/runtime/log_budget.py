"""A bound on how fast the guest can make the supervisor write its log.

Whatever the guest can provoke at will (a refused egress connection, an agent connection that
is not the agent's) is logged one line at a time up to a burst per window; the rest are
counted, and summed up in one line by the first event of that kind after the window. A
guest that hammers cannot fill the host's disk, and the log still says it happened.
"""

from __future__ import annotations

import sys
import time

LOG_BURST = 20  # lines of one kind per LOG_WINDOW_S
LOG_WINDOW_S = 10.0


class LogBudget:
    def __init__(self, what: str, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S) -> None:
        self.what = what  # the plural noun of the summary line: "egress refusals"
        self.burst, self.window_s = burst, window_s
        self.window_start, self.count, self.unlogged = 0.0, 0, 0

    def allow(self) -> bool:
        """May one more line be written now? (A refusal counts as one of the rest.)"""
        now = time.monotonic()
        if now - self.window_start > self.window_s:
            if self.unlogged:
                print(f"mvm-supervisor: {self.unlogged} more {self.what} (not logged one by one)",
                      file=sys.stderr, flush=True)
            self.window_start, self.count, self.unlogged = now, 0, 0
        self.count += 1
        if self.count > self.burst:
            self.unlogged += 1
            return False
        return True
