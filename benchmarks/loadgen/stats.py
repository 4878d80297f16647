"""Percentiles and summaries, exact and without numpy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

KEYS = ("p50", "p90", "p99", "mean", "max")


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``ordered`` (sorted ascending, not empty), by
    linear interpolation between the closest ranks: rank ``(n - 1) * q / 100``, as
    numpy's default ``method="linear"`` (Hyndman & Fan type 7)."""
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    if low + 1 >= len(ordered):
        return float(ordered[-1])
    frac = rank - low
    return ordered[low] + (ordered[low + 1] - ordered[low]) * frac


def summarize(values: Iterable[float], digits: int = 3) -> dict[str, float | None]:
    """{p50, p90, p99, mean, max} of ``values``, rounded; all None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return dict.fromkeys(KEYS)
    return {
        "p50": round(percentile(ordered, 50), digits),
        "p90": round(percentile(ordered, 90), digits),
        "p99": round(percentile(ordered, 99), digits),
        "mean": round(sum(ordered) / len(ordered), digits),
        "max": round(ordered[-1], digits),
    }
