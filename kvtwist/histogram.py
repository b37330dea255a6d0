"""A histogram of plain counts, for the figures the server exports (no Twisted, no locks)."""

from __future__ import annotations

from bisect import bisect_left


class Histogram:
    """Counts of observations by upper bound, plus their sum: what a Prometheus histogram exports."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # One count per bound, and one for everything above the last.
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)
