"""Bootstrap intervals against a hand-written percentile bootstrap (same definition, another RNG stream).

Tolerance: with 4000 resamples the two percentile intervals agree to 0.02 (about 2 % of the interval width here).
"""
from __future__ import annotations

import numpy as np
import pytest

from pocketlm.stats import mean_ci, paired_delta_ci, ratio_ci, transformed_ci


def manual_percentile(stat, arrays, n_resamples=4000, seed=123):
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    idx = rng.integers(0, n, size=(n_resamples, n))
    values = np.array([stat(*(a[i] for a in arrays)) for i in idx])
    return np.percentile(values, [2.5, 97.5])


def test_mean_ratio_and_paired_intervals_match_a_manual_bootstrap():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 120)
    lo, hi = mean_ci(x, n_resamples=4000)
    assert np.allclose([lo, hi], manual_percentile(np.mean, (x,)), atol=0.02)

    num, den = rng.gamma(2.0, 1.0, 80), rng.integers(5, 30, 80).astype(float)
    lo, hi = ratio_ci(num, den, n_resamples=4000)
    ref = manual_percentile(lambda a, b: a.sum() / b.sum(), (num, den))
    assert np.allclose([lo, hi], ref, atol=0.01)
    assert lo < num.sum() / den.sum() < hi

    a, b = x[:60], x[:60] + rng.normal(0.3, 0.1, 60)  # b is a shifted copy: a paired test sees a tight delta
    lo, hi = paired_delta_ci(a, b, n_resamples=4000)
    assert np.allclose([lo, hi], manual_percentile(lambda p, q: np.mean(p - q), (a, b)), atol=0.02)
    assert hi < 0 and hi - lo < 0.1


def test_intervals_are_seeded_and_degenerate_cases_are_defined():
    x = np.random.default_rng(1).random(50)
    assert mean_ci(x, seed=3) == mean_ci(x, seed=3)
    assert mean_ci(x, seed=3) != mean_ci(x, seed=4)
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert mean_ci([0.5]) is None
    with pytest.raises(ValueError, match="equal lengths"):
        ratio_ci([1, 2], [1, 2, 3])
    assert transformed_ci((1.0, 2.0), lambda v: -v) == (-2.0, -1.0)


def test_paired_statistic_delta_equals_paired_mean_delta_for_the_mean():
    from pocketlm.stats import paired_statistic_delta_ci

    rng = np.random.default_rng(2)
    a, b = rng.random(40), rng.random(40)
    mean = lambda x, axis=-1: np.mean(x, axis=axis)  # noqa: E731
    assert paired_statistic_delta_ci(mean, (a,), (b,), seed=5) == pytest.approx(paired_delta_ci(a, b, seed=5))
    with pytest.raises(ValueError, match="same number of samples"):
        paired_statistic_delta_ci(mean, (a,), (b, b))
