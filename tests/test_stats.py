"""The intervals against published values: Newcombe (1998), "Interval estimation for the
difference between independent proportions" (Table II, method 10) and "Two-sided
confidence intervals for the single proportion" (Table I, Wilson score method 3)."""

from __future__ import annotations

import pytest

from herald.reporting.stats import Z, uplift, wilson


@pytest.mark.parametrize(("x", "n", "low", "high"), [
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_newcombe(x, n, low, high) -> None:
    got = wilson(x, n)
    assert got == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


@pytest.mark.parametrize(("counts", "low", "high"), [
    ((56, 70, 48, 80), 0.0524, 0.3339), ((9, 10, 3, 10), 0.1705, 0.8090),
    ((6, 7, 2, 7), 0.0582, 0.8062), ((5, 56, 0, 29), -0.0381, 0.1926),
    ((0, 10, 0, 20), -0.1611, 0.2775), ((0, 10, 0, 10), -0.2775, 0.2775),
    ((10, 10, 0, 20), 0.6791, 1.0), ((10, 10, 0, 10), 0.6075, 1.0)])
def test_difference_matches_newcombe_method_10(counts, low, high) -> None:
    got = uplift(*counts)
    assert (got.low, got.high) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))
    x1, n1, x2, n2 = counts
    assert got.absolute == pytest.approx(x1 / n1 - x2 / n2)


def test_relative_uplift_and_significance() -> None:
    got = uplift(56, 70, 48, 80)
    assert got.relative == pytest.approx(0.2 / 0.6)
    assert got.significant
    assert uplift(5, 56, 0, 29).relative is None  # no held-out conversions
    assert not uplift(0, 10, 0, 10).significant


def test_guards() -> None:
    assert abs(Z - 1.959964) < 1e-6
    with pytest.raises(ValueError):
        wilson(1, 0)
    with pytest.raises(ValueError):
        wilson(3, 2)
