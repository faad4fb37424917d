"""The study's statistics: t-intervals over seeds, paired differences, anytime summaries.

Notation: n = seeds, x_1..x_n one operator's results, d_i = x_i - y_i the paired differences to the
reference operator at the same seed (same data order, negatives and initial weights), t = the
Student t quantile with n - 1 degrees of freedom. The 95% interval of the mean is
mean ± t_{0.975, n-1} * s / sqrt(n) (s the sample standard deviation); a paired difference's
interval is that of the d_i. "better"/"worse" only where the interval excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Interval", "t_interval", "paired_difference", "verdict", "time_to_fraction"]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 4) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (1 seed, no interval)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def _t_quantile(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def t_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided ``confidence`` t-interval of ``values`` (ValueError when empty; one
    value: the interval is the point, n = 1)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("t_interval: 'values' should hold at least one value but got none")
    m = sum(xs) / n
    if n == 1:
        return Interval(m, m, m, 1)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = _t_quantile(0.5 + confidence / 2, n - 1) * s / math.sqrt(n)
    return Interval(m, m - h, m + h, n)


def paired_difference(
    values: dict[int, float], reference: dict[int, float], confidence: float = 0.95
) -> Interval | None:
    """t-interval of values[seed] - reference[seed] over the seeds both have; None without any."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    return t_interval([values[s] - reference[s] for s in seeds], confidence)


def verdict(diff: Interval | None) -> str:
    """'better' / 'worse' only where the interval excludes 0."""
    if diff is None or diff.n < 2:
        return "no interval (fewer than 2 paired seeds)"
    if not diff.excludes_zero():
        return "no difference measured"
    return "better" if diff.mean > 0 else "worse"


def time_to_fraction(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first x (training seconds) at which the curve [(x, recall), ...] reaches ``target``;
    None when it never does."""
    for x, y in sorted(curve):
        if y >= target:
            return x
    return None
