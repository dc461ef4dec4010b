"""Timing and printing figures: full precision is kept in every measurement; rounding happens only when printed.

A ratio whose denominator is zero or not finite (a timing too small for the clock, a rate that rounds
to nothing at a smoke test's sizes) prints "n/a" instead of raising or printing inf.
"""

from __future__ import annotations

import math
import statistics
import time


def call_seconds(fn, reps: int, warmup: int = 0) -> list[float]:
    """The wall time of each of `reps` calls of `fn` (which must wait for its result), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn, reps: int, warmup: int = 0) -> float:
    """The median of `call_seconds(fn, reps, warmup)`."""
    return statistics.median(call_seconds(fn, reps, warmup))


def ratio(num: float, den: float) -> float | None:
    """num / den, or None when den is zero or either is not finite."""
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return None
    return num / den


def fmt(value: float | None, spec: str = ".2f") -> str:
    """A figure for a table cell; None (an undefined ratio) prints as n/a."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def fmt_ratio(num: float, den: float, spec: str = ".2f") -> str:
    return fmt(ratio(num, den), spec)
