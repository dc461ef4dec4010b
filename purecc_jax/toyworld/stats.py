"""Statistics across training seeds: mean and spread of a rate, two-sided t-tests with confidence
intervals, and Holm's correction for a family of tests.

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
    """A two-sided test: difference of means (a - b), t statistic, degrees of freedom, p-value, and the
    standard error of the difference (for its confidence interval)."""

    diff: float
    t: float
    df: float
    p: float
    se: float = math.nan

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p < alpha

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The two-sided `level` confidence interval of the difference (t quantile at df degrees of freedom)."""
        if not math.isfinite(self.se) or not math.isfinite(self.df):
            return (self.diff, self.diff) if self.se == 0 else (math.nan, math.nan)
        half = float(special.stdtrit(self.df, 0.5 + level / 2)) * self.se
        return self.diff - half, self.diff + half


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
    return Test(diff, 0.0 if diff == 0 else math.copysign(math.inf, diff), math.nan, 1.0 if diff == 0 else 0.0, 0.0)


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
    return Test(diff, t, df, _two_sided_p(t, df), math.sqrt(va + vb))


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
    return Test(diff, t, df, _two_sided_p(t, df), s / math.sqrt(len(a)))


def paired(a: Sequence[float], b: Sequence[float]) -> Test:
    """Paired t-test of mean(a - b) = 0 (the same seeds, e.g. two stage-B arms on one stage A)."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} and {len(b)} values; a paired test needs one pair per seed")
    return one_sample([x - y for x, y in zip(a, b)], 0.0)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (the family-wise error rate of the whole list is held at alpha
    by comparing each adjusted p with alpha)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def compare(a: Sequence[float], b: Sequence[float]) -> Test | None:
    """Welch's test when both sides have >= 2 values, a one-sample test when one side is a single
    value (the base model), None when neither has two."""
    if len(a) >= 2 and len(b) >= 2:
        return welch(a, b)
    if len(a) >= 2 and len(b) == 1:
        return one_sample(a, b[0])
    if len(b) >= 2 and len(a) == 1:
        r = one_sample(b, a[0])
        return Test(-r.diff, -r.t, r.df, r.p, r.se)
    return None
