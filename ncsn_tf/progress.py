"""Progress of long work: how much is done, the rate, the time left, and when to report.

One reporter for every long-running loop (training logs, sampling bars, feature extraction), so
rates and ETAs are computed and printed the same way everywhere.
"""
from __future__ import annotations

import math
import time
from typing import Callable


def duration(seconds: float | None) -> str:
    """h:mm:ss, or "?" when unknown (None, NaN or infinite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Units done (fractions allowed) towards an optional `total`, since construction.

    `due()` says whether a report is due: at most every `every_s` seconds (0: always), and
    always once the total is reached or when `final`.
    """

    def __init__(self, total: float | None = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.every_s, self.clock = total, every_s, clock
        self.done = 0.0
        self.start = self.last_report = clock()

    def advance(self, units: float) -> None:
        self.done += units

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        elapsed = self.clock() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        """Seconds left at the current rate (NaN without a total or a rate)."""
        rate = self.rate
        if self.total is None or rate <= 0:
            return float("nan")
        return max(self.total - self.done, 0.0) / rate

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total - 1e-6

    def due(self, final: bool = False) -> bool:
        """Whether to report now; if so, the next one is due `every_s` from now."""
        now = self.clock()
        if final or self.finished or now - self.last_report >= self.every_s:
            self.last_report = now
            return True
        return False
