"""Elapsed time and ETA for the long loops (calibration per layer, export per part, build per graph).

The ETA assumes the remaining work runs at the average rate seen so far, measured in a unit the
caller chooses (one per item, or bytes of weights when items differ in size); items that cost
nothing (reused, up to date) are counted as done but not as work, so they do not shorten it.
"""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Eta:
    def __init__(self, total_work: float):
        self.total, self.done, self.timed_work, self.timed_seconds = float(total_work), 0.0, 0.0, 0.0
        self.t0 = time.perf_counter()

    def skip(self, work: float = 1.0):
        """Work that needs no time this run (a layer reused from a file, an engine up to date)."""
        self.total -= work

    def step(self, work: float, seconds: float) -> str:
        """Record one finished item; returns 'elapsed X, ETA Y' for the progress line."""
        self.done += work
        self.timed_work += work
        self.timed_seconds += seconds
        elapsed = time.perf_counter() - self.t0
        left = max(self.total - self.done, 0.0)
        if left <= 0:
            return f"elapsed {duration(elapsed)}, done"
        rate = self.timed_seconds / self.timed_work if self.timed_work > 0 else 0.0
        return f"elapsed {duration(elapsed)}, ETA {duration(rate * left)}"
