"""Statistics across training seeds: mean and spread of a rate, and two-sided t-tests.

A toy run is chaotic (float reductions differ between CPUs, and a few hundred steps of LoRA
training amplify them), so one run per method says little. Every method is trained with
several seeds; a rate is summarised by its mean and sample standard deviation across seeds,
and two methods differ only when Welch's t-test on their per-seed rates rejects equal means.
The base model is one fixed model, so a method is compared with it by a one-sample t-test.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from scipy import special

ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Test:
    """A two-sided test: difference of means (a - b), t statistic, degrees of freedom, p-value."""

    diff: float
    t: float
    df: float
    p: float

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p < alpha


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    if not values:
        raise ValueError("mean_sd: no values")
    n = len(values)
    m = sum(values) / n
    if max(values) == min(values):  # exactly 0, not the round-off of m = sum / n
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, sd


def _two_sided_p(t: float, df: float) -> float:
    # P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2).
    return float(special.betainc(df / 2, 0.5, df / (df + t * t)))


def _degenerate(diff: float) -> Test:
    # No spread on either side: the means are either equal (p = 1) or exactly separated (p = 0).
    return Test(diff, 0.0 if diff == 0 else math.copysign(math.inf, diff), math.nan, 1.0 if diff == 0 else 0.0)


def welch(a: Sequence[float], b: Sequence[float]) -> Test:
    """Welch's unequal-variance t-test of mean(a) = mean(b); needs >= 2 values on each side."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch: needs >= 2 values per group, got {len(a)} and {len(b)}")
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    diff = ma - mb
    if va + vb == 0:
        return _degenerate(diff)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va * va / (len(a) - 1) if va else 0.0) + (vb * vb / (len(b) - 1) if vb else 0.0))
    return Test(diff, t, df, _two_sided_p(t, df))


def one_sample(a: Sequence[float], mu: float) -> Test:
    """One-sample t-test of mean(a) = mu (a method's seeds against the one base model)."""
    if len(a) < 2:
        raise ValueError(f"one_sample: needs >= 2 values, got {len(a)}")
    m, s = mean_sd(a)
    diff = m - mu
    if s == 0:
        return _degenerate(diff)
    t = diff / (s / math.sqrt(len(a)))
    df = len(a) - 1
    return Test(diff, t, df, _two_sided_p(t, df))


def compare(a: Sequence[float], b: Sequence[float]) -> Test | None:
    """Welch's test when both sides have >= 2 values, a one-sample test when one side is a single
    value (the base model), None when neither has two."""
    if len(a) >= 2 and len(b) >= 2:
        return welch(a, b)
    if len(a) >= 2 and len(b) == 1:
        return one_sample(a, b[0])
    if len(b) >= 2 and len(a) == 1:
        r = one_sample(b, a[0])
        return Test(-r.diff, -r.t, r.df, r.p)
    return None
