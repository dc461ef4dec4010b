"""Seed statistics of the toy report: known inputs give known t statistics, p-values and decisions."""

import math

import pytest

from purecc_jax.toyworld import stats

# Wikipedia's first Welch's t-test example (two samples of 15): t = -2.46, df = 24.99, p = 0.021.
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_welch_reference_example():
    r = stats.welch(A1, A2)
    assert r.t == pytest.approx(-2.4554, abs=1e-4)
    assert r.df == pytest.approx(24.9885, abs=1e-4)
    assert r.p == pytest.approx(0.021378, abs=1e-6)
    assert r.significant(0.05) and not r.significant(0.01)


def test_welch_by_hand():
    # Means 0.7 and 0.3, both sd 0.1 over 3 seeds: t = 0.4 / sqrt(2 * 0.01 / 3) = 4.899 on df = 4,
    # two-sided p = 0.00805 (tables: t_{4, 0.005} = 4.604 < 4.899 < t_{4, 0.0025} = 5.598).
    r = stats.welch([0.6, 0.7, 0.8], [0.2, 0.3, 0.4])
    assert r.diff == pytest.approx(0.4) and r.t == pytest.approx(4.898979, abs=1e-6)
    assert r.df == pytest.approx(4.0) and r.p == pytest.approx(0.0080499, abs=1e-6)
    swapped = stats.welch([0.2, 0.3, 0.4], [0.6, 0.7, 0.8])
    assert swapped.t == pytest.approx(-r.t) and swapped.p == pytest.approx(r.p)


def test_overlapping_seeds_are_not_a_difference():
    # 0.62 vs 0.50 looks like a gap, but the seeds overlap: t = 1.40 on df 3.65, p = 0.24.
    r = stats.welch([0.50, 0.62, 0.74], [0.40, 0.56, 0.54])
    assert r.p == pytest.approx(0.24014, abs=1e-5) and not r.significant()


def test_one_sample_against_the_base():
    r = stats.one_sample([0.5, 0.6, 0.7], 0.3)  # t = 0.3 / (0.1 / sqrt 3) = 5.196 on df 2
    assert r.t == pytest.approx(5.196152, abs=1e-6) and r.p == pytest.approx(0.035099, abs=1e-6)
    assert stats.compare([0.5, 0.6, 0.7], [0.3]) == r
    flipped = stats.compare([0.3], [0.5, 0.6, 0.7])
    assert flipped.diff == pytest.approx(-0.3) and flipped.p == pytest.approx(r.p)
    assert stats.compare([0.3], [0.4]) is None


def test_no_spread():
    assert stats.welch([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]).p == 1.0
    assert stats.welch([0.5, 0.5, 0.5], [0.2, 0.2, 0.2]).p == 0.0
    one_sided_spread = stats.welch([0.5, 0.5, 0.5], [0.2, 0.3, 0.4])  # df from b alone: 2
    assert one_sided_spread.df == pytest.approx(2.0) and one_sided_spread.p == pytest.approx(0.074180, abs=1e-6)


def test_mean_sd_and_bad_input():
    m, sd = stats.mean_sd([0.2, 0.4, 0.9])
    assert m == pytest.approx(0.5) and sd == pytest.approx(math.sqrt(0.13))
    assert stats.mean_sd([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError, match="needs >= 2 values"):
        stats.welch([0.1], [0.2, 0.3])
    with pytest.raises(ValueError, match="no values"):
        stats.mean_sd([])


def test_intervals_and_paired_test_match_scipy():
    """Welch's and the paired test's p-values and 95% intervals equal scipy's."""
    from scipy import stats as ss

    a, b = [0.5, 0.6, 0.55, 0.7, 0.62], [0.4, 0.45, 0.5, 0.42, 0.58]
    for ours, theirs in ((stats.welch(a, b), ss.ttest_ind(a, b, equal_var=False)),
                         (stats.paired(a, b), ss.ttest_rel(a, b))):
        ci = theirs.confidence_interval()
        assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9)
        assert ours.interval() == pytest.approx((ci.low, ci.high), rel=1e-9)
    with pytest.raises(ValueError, match="one pair per seed"):
        stats.paired(a, b[:3])


def test_holm_adjusts_step_down():
    """Holm's adjusted p-values: sorted p times (m - rank), made monotone, capped at 1."""
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []
