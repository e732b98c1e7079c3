"""Bootstrap intervals against a hand-written percentile bootstrap (same definition, another RNG stream).

Tolerance: with 4000 resamples the two percentile intervals agree to 0.02 (about 2 % of the interval width here).
"""
from __future__ import annotations

import numpy as np
import pytest

from pocketlm.core.stats import mean_ci, paired_delta_ci, ratio_ci, transformed_ci


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
    from pocketlm.core.stats import paired_statistic_delta_ci

    rng = np.random.default_rng(2)
    a, b = rng.random(40), rng.random(40)
    mean = lambda x, axis=-1: np.mean(x, axis=axis)  # noqa: E731
    assert paired_statistic_delta_ci(mean, (a,), (b,), seed=5) == pytest.approx(paired_delta_ci(a, b, seed=5))
    with pytest.raises(ValueError, match="same number of samples"):
        paired_statistic_delta_ci(mean, (a,), (b, b))


# ---------------------------------------------------------------------------------------------- mutation survivors
# Tests added for mutants that survived (docs/MUTATION.md): each pins a documented default or option.


def test_two_items_give_an_interval():
    assert mean_ci([0.0, 1.0]) is not None


def test_skewed_data_use_the_percentile_method_at_the_default_resamples():
    """The percentile interval (not scipy's BCa default, which shifts it on skewed data), with 1000 resamples."""
    x = np.random.default_rng(6).exponential(1.0, 40) ** 3
    assert mean_ci(x) == mean_ci(x, n_resamples=1000, method="percentile")
    assert mean_ci(x) != mean_ci(x, method="BCa")
    lo, hi = mean_ci(x, n_resamples=4000)
    assert np.allclose([lo, hi], manual_percentile(np.mean, (x,)), atol=0.1 * (hi - lo))


def test_confidence_level_is_passed_on():
    x = np.random.default_rng(7).normal(0.0, 1.0, 100)
    lo, hi = mean_ci(x, n_resamples=4000, confidence=0.5)
    rng = np.random.default_rng(123)
    means = x[rng.integers(0, 100, size=(4000, 100))].mean(axis=1)
    assert np.allclose([lo, hi], np.percentile(means, [25, 75]), atol=0.02)


def test_ratio_and_unpaired_options_are_passed_on():
    rng = np.random.default_rng(8)
    num, den = rng.gamma(2.0, 1.0, 30), rng.integers(5, 30, 30).astype(float)
    assert ratio_ci(num, den, seed=3) != ratio_ci(num, den, seed=4)
    # unpaired: the two samples are resampled independently, so the delta of two unrelated means is much wider
    # than the paired one when b is a shifted copy of a
    from pocketlm.core.stats import bootstrap_ci

    a = rng.normal(0.0, 1.0, 60)
    b = a + 0.3
    diff = lambda p, q, axis=-1: np.mean(p, axis=axis) - np.mean(q, axis=axis)  # noqa: E731
    paired_lo, paired_hi = bootstrap_ci((a, b), diff)
    lo, hi = bootstrap_ci((a, b), diff, paired=False)
    assert paired_hi - paired_lo < 1e-9 < 0.2 < hi - lo


def test_paired_statistic_delta_passes_the_axis():
    """The statistic is called with axis=-1, whatever its own default."""
    from pocketlm.core.stats import paired_statistic_delta_ci

    rng = np.random.default_rng(9)
    a, b = rng.random(40), rng.random(40)
    mean_all = lambda x, axis=None: np.mean(x, axis=axis)  # noqa: E731
    assert paired_statistic_delta_ci(mean_all, (a,), (b,), seed=5) == pytest.approx(paired_delta_ci(a, b, seed=5))
