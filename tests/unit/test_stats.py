"""foundation.stats.quantile: the one quantile the judge, the benchmarks and the soak use."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from foundation.stats import quantile


def test_quantile_interpolates_like_the_inclusive_method() -> None:
    rng = random.Random(0)
    for size in (2, 3, 7, 50):
        values = [rng.gauss(0, 1) for _ in range(size)]
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        for percent in (1, 5, 50, 95, 99):
            assert quantile(values, percent / 100) == pytest.approx(cuts[percent - 1])
        assert quantile(values, 0.0) == min(values) and quantile(values, 1.0) == max(values)


def test_quantile_of_one_or_no_values_and_a_q_out_of_range() -> None:
    assert quantile([3.0], 0.95) == 3.0
    assert math.isnan(quantile([], 0.5))
    with pytest.raises(ValueError, match="q must be in"):
        quantile([1.0, 2.0], 95)  # a percent, not a fraction
