"""Statistics over seeds on hand-made numbers: known means and intervals, scipy's own values, noise verdicts."""
import math

import pytest
from scipy import stats as sps

from hpml.report.stats import difference, summarize


def test_summary_of_known_numbers():
    s = summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    # t(0.975, df=2) = 4.302652729911275: half width 4.3027 * 1 / sqrt(3)
    assert s.half_width == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    assert (s.ci_low, s.ci_high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), abs=1e-6)


def test_summary_matches_scipy_interval():
    xs = [76.62, 76.10, 77.05, 76.48, 76.91]
    s = summarize(xs)
    low, high = sps.t.interval(0.95, len(xs) - 1, loc=sps.tmean(xs), scale=sps.sem(xs))
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high), rel=1e-12)
    assert s.std == pytest.approx(sps.tstd(xs), rel=1e-12)


def test_below_two_seeds_there_is_no_interval_and_missing_values_do_not_count():
    one = summarize([0.83, None, float("nan")])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 0.83, None, None, None)
    assert summarize([]).mean is None
    d = difference([0.85], [0.83])
    assert d.diff == pytest.approx(0.02) and d.ci_low is None and d.verdict == "one seed: no interval"
    assert difference([0.85, 0.86], []).verdict == "no baseline"


def test_difference_matches_scipy_welch_and_is_within_noise():
    # SST-2-like accuracies that overlap: the seed-to-seed spread hides a 0.004 difference.
    variant, base = [0.826, 0.851, 0.838], [0.834, 0.842, 0.829, 0.845]
    d = difference(variant, base)
    ci = sps.ttest_ind(variant, base, equal_var=False).confidence_interval(0.95)
    assert d.diff == pytest.approx(sum(variant) / 3 - sum(base) / 4, rel=1e-12)
    assert (d.ci_low, d.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert d.within_noise is True and d.verdict == "within noise"


def test_difference_larger_than_noise_both_ways():
    base = [73.2, 73.4, 73.3]
    worse, better = [51.1, 51.6, 50.9], [76.9, 77.3, 77.0]
    lower, higher = difference(worse, base), difference(better, base)
    for d, a in ((lower, worse), (higher, better)):
        ci = sps.ttest_ind(a, base, equal_var=False).confidence_interval(0.95)
        assert (d.ci_low, d.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert d.within_noise is False
    assert lower.verdict == "lower" and lower.ci_high < 0
    assert higher.verdict == "higher" and higher.ci_low > 0


def test_constant_samples_give_exact_differences():
    assert difference([5.0, 5.0], [5.0, 5.0]).verdict == "within noise"
    d = difference([6.0, 6.0], [5.0, 5.0])
    assert (d.diff, d.ci_low, d.ci_high, d.verdict) == (1.0, 1.0, 1.0, "higher")
