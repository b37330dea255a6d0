"""The arithmetic of comparisons: medians, and ratios paired by round."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values, so a missing measurement is visible, not zero."""
    return statistics.median(values) if values else float("nan")


def pairedRatios(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """
    ``ours[i] / theirs[i]`` for each round i.

    On a noisy machine the load drifts over a run; the two servers measured
    in the same round saw the same drift, so their ratio is the quantity
    that means something.
    """
    if len(ours) != len(theirs):
        raise ValueError(f"rounds differ: {len(ours)} against {len(theirs)}")
    return [a / b for a, b in zip(ours, theirs) if b]


def medianRatio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """The median of the per-round ratios (not the ratio of medians)."""
    return median(pairedRatios(ours, theirs))


def percentileFromHistogram(histogram: Sequence[tuple[float, int]], q: float) -> float:
    """The q-quantile (0..1) of a (upper bound, count) histogram; upper bounds never flatter."""
    total = sum(n for _, n in histogram)
    if not total:
        return float("nan")
    rank = min(int(q * total), total - 1)
    seen = 0
    for upper, n in sorted(histogram):
        seen += n
        if seen > rank:
            return upper
    return sorted(histogram)[-1][0]


def mergeHistograms(histograms: Sequence[Sequence[tuple[float, int]]]) -> list[tuple[float, int]]:
    """One histogram holding the counts of all of them."""
    merged: dict[float, int] = {}
    for histogram in histograms:
        for upper, n in histogram:
            merged[upper] = merged.get(upper, 0) + n
    return sorted(merged.items())
