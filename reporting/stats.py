"""Confidence intervals for conversion rates and their differences (stdlib only).

A campaign's uplift is the difference of two proportions: the conversion rate of the
contacted recipients minus that of the held-out ones. Its interval is Newcombe's hybrid
score interval (method 10 of Newcombe, *Statistics in Medicine* 1998), built from the two
groups' Wilson score intervals: unlike the Wald interval it stays inside [-1, 1] and
behaves with zero conversions or small groups, which is where campaigns' tiers live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # 1.959963984540054


def wilson(successes: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of ``successes / n`` (n > 0)."""
    if n <= 0:
        raise ValueError("a proportion needs at least one observation")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n} is not a proportion")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # clamp rounding noise: the interval of 0/n starts at exactly 0
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Uplift:
    """Contacted over held out: absolute (percentage points as a fraction), its
    interval, and relative to the held-out rate (None when that rate is 0)."""

    absolute: float
    low: float
    high: float
    relative: float | None

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | bool | None]:
        return {"absolute": self.absolute, "ci_low": self.low, "ci_high": self.high,
                "relative": self.relative, "significant": self.significant,
                "confidence": CONFIDENCE}


def uplift(x1: int, n1: int, x2: int, n2: int, z: float = Z) -> Uplift:
    """Uplift of group 1 (``x1`` of ``n1`` converted) over group 2 (``x2`` of ``n2``)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Uplift(d, low, high, d / p2 if p2 > 0 else None)


# -- tests of a difference (content experiments) ----------------------------------------
def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """The pooled two-proportion z-test: (z, two-sided p-value). With no conversions (or
    only conversions) in both groups there is no difference to see: (0, 1)."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("each group needs at least one observation")
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / se
    return z, min(1.0, 2 * normal_sf(abs(z)))


def chi_squared_sf(x: float, df: int) -> float:
    """P(X > x) for a chi-squared variable with ``df`` degrees of freedom, in closed form
    (the regularized upper incomplete gamma function at integer or half-integer order):
    even df, a Poisson sum; odd df, the normal tail plus a finite series."""
    if df < 1:
        raise ValueError("degrees of freedom must be at least 1")
    if x <= 0:
        return 1.0
    half = x / 2
    if df % 2 == 0:
        term = total = math.exp(-half)
        for i in range(1, df // 2):
            term *= half / i
            total += term
        return min(1.0, total)
    total = 2 * normal_sf(math.sqrt(x))
    term = math.sqrt(2 * x / math.pi) * math.exp(-half)  # i = 1: sqrt(2/pi) x^(1/2) e^(-x/2)
    for i in range(1, (df - 1) // 2 + 1):
        total += term
        term *= x / (2 * i + 1)
    return min(1.0, total)


def chi_squared_test(arms: list[tuple[int, int]]) -> tuple[float, int, float]:
    """Pearson's chi-squared test of a 2 x k table (converted or not, per arm, given as
    (converted, recipients)): (statistic, degrees of freedom, p-value). No continuity
    correction, so with two arms the statistic is the square of the pooled z."""
    if len(arms) < 2 or any(n <= 0 for _, n in arms):
        raise ValueError("the test needs at least two arms with recipients")
    total = sum(n for _, n in arms)
    pooled = sum(x for x, _ in arms) / total
    df = len(arms) - 1
    if pooled in (0.0, 1.0):
        return 0.0, df, 1.0
    stat = 0.0
    for x, n in arms:
        expected_yes, expected_no = n * pooled, n * (1 - pooled)
        stat += (x - expected_yes) ** 2 / expected_yes
        stat += ((n - x) - expected_no) ** 2 / expected_no
    return stat, df, chi_squared_sf(stat, df)


def mean_difference(n1: int, sum1: float, squares1: float, n2: int, sum2: float,
                    squares2: float, z: float = Z) -> tuple[float, float, float]:
    """Difference of two groups' means with a normal (Welch) interval, from each group's
    size, sum and sum of squares: (difference, low, high)."""
    m1, m2 = sum1 / n1, sum2 / n2
    v1 = max(squares1 / n1 - m1 * m1, 0.0) * n1 / max(n1 - 1, 1)
    v2 = max(squares2 / n2 - m2 * m2, 0.0) * n2 / max(n2 - 1, 1)
    half = z * math.sqrt(v1 / n1 + v2 / n2)
    return m1 - m2, m1 - m2 - half, m1 - m2 + half
