"""Statistics over seeds: mean, std and a 95% t-interval per variant, and each variant's difference to a baseline."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

CONFIDENCE = 0.95


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile. scipy is a dependency for this one function: no closed form exists for
    fractional degrees of freedom (Welch's), and a table would be another thing to get wrong."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Summary:
    """One variant's metric over its seeds. std and the interval are None below 2 values (shown as —)."""

    n: int
    mean: Optional[float]
    std: Optional[float]  # sample standard deviation (n - 1)
    ci_low: Optional[float]
    ci_high: Optional[float]

    @property
    def half_width(self) -> Optional[float]:
        return None if self.ci_high is None else self.ci_high - self.mean


@dataclass(frozen=True)
class Difference:
    """variant minus baseline, with Welch's interval; `within_noise` when the interval contains 0.
    Every field is None when either side has fewer than 2 values (the difference itself needs only 1 each)."""

    diff: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    df: Optional[float]

    @property
    def within_noise(self) -> Optional[bool]:
        if self.ci_low is None:
            return None
        return self.ci_low <= 0.0 <= self.ci_high

    @property
    def verdict(self) -> str:
        """The text the report prints: within noise, higher, lower, or why there is no verdict."""
        if self.diff is None:
            return "no baseline"
        if self.within_noise is None:
            return "one seed: no interval"
        if self.within_noise:
            return "within noise"
        return "higher" if self.diff > 0 else "lower"


def _clean(values: Sequence[Optional[float]]) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def summarize(values: Sequence[Optional[float]], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample std and the two-sided t-interval of the mean; missing values (None/NaN) are dropped."""
    xs = _clean(values)
    n = len(xs)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = sum(xs) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def difference(values: Sequence[Optional[float]], baseline: Sequence[Optional[float]],
               confidence: float = CONFIDENCE) -> Difference:
    """mean(values) - mean(baseline) with Welch's t-interval (unequal variances, Welch–Satterthwaite df).

    Two identical constant samples give a zero-width interval at 0: within noise. Constant but different
    samples give a zero-width interval away from 0: a difference (as exact as the inputs)."""
    a, b = _clean(values), _clean(baseline)
    if not a or not b:
        return Difference(None, None, None, None)
    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, None, None, None)
    va, vb = summarize(a).std ** 2 / len(a), summarize(b).std ** 2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Difference(diff, diff, diff, None)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(0.5 + confidence / 2, df) * se
    return Difference(diff, diff - half, diff + half, df)
