"""Confidence intervals, through `scipy.stats.bootstrap`: every figure pocketlm reports carries one.

All intervals are two-sided, 95 % by default, seeded (the same inputs and seed give the same interval), and
resample *items* (documents, pairs, prompts) — the unit that was drawn from a population. Corpus-level ratios
(perplexity, accuracy over weighted items) resample items and recompute the ratio of sums, never a mean of ratios.
Fewer than two items give no interval (None): nothing can be said about the spread of one observation.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import stats

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95

Interval = tuple[float, float]


def bootstrap_ci(
    data: Sequence[Sequence[float]] | np.ndarray,
    statistic: Callable[..., np.ndarray],
    *,
    paired: bool = True,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    method: str = "percentile",
) -> Interval | None:
    """Bootstrap interval of ``statistic(*samples, axis=-1)`` over one or more equal-length samples.

    ``data`` is a tuple of 1-D samples (one per argument of ``statistic``); with ``paired`` they are resampled
    together (item i of every sample stays together). ``statistic`` must be vectorised over ``axis``.
    """
    samples = tuple(np.asarray(s, dtype=np.float64) for s in data)
    n = len(samples[0])
    if any(len(s) != n for s in samples):
        raise ValueError(f"samples must have equal lengths for a paired bootstrap, got {[len(s) for s in samples]}")
    if n < 2:
        return None
    point = float(statistic(*samples, axis=-1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # degenerate samples: handled below
        res = stats.bootstrap(
            samples, statistic, paired=paired or len(samples) == 1, vectorized=True, n_resamples=n_resamples,
            confidence_level=confidence, method=method, random_state=np.random.default_rng(seed),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # every resample equal (e.g. all items score 1.0)
        return (point, point)
    return (min(lo, point), max(hi, point))


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _ratio(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(num, axis=axis) / np.sum(den, axis=axis)


def _mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def mean_ci(values: Sequence[float], **kwargs) -> Interval | None:
    """Interval of the mean of per-item values (ROUGE F1 per summary, max toxicity per prompt, ...)."""
    return bootstrap_ci((values,), _mean, **kwargs)


def ratio_ci(numerators: Sequence[float], denominators: Sequence[float], **kwargs) -> Interval | None:
    """Interval of ``Σ num / Σ den`` with items resampled (e.g. nats per word over documents)."""
    return bootstrap_ci((numerators, denominators), _ratio, **kwargs)


def paired_delta_ci(a: Sequence[float], b: Sequence[float], **kwargs) -> Interval | None:
    """Interval of ``mean(a - b)`` for paired items (student vs teacher on the same prompts)."""
    return bootstrap_ci((a, b), _mean_diff, **kwargs)


def paired_statistic_delta_ci(
    statistic: Callable[..., np.ndarray],
    model_samples: Sequence[Sequence[float]],
    baseline_samples: Sequence[Sequence[float]],
    **kwargs,
) -> Interval | None:
    """Interval of ``statistic(model items) - statistic(baseline items)`` on the same items, resampled jointly.

    For teacher-vs-student deltas of any corpus figure (pct_stereotype, icat, s_AMB, ...): both models were scored
    on item i, so item i is drawn for both. ``statistic(*samples, axis=-1)`` must be vectorised over ``axis``.
    """
    k = len(model_samples)
    if len(baseline_samples) != k:
        raise ValueError(f"model and baseline need the same number of samples, got {k} and {len(baseline_samples)}")

    def delta(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*arrays[:k], axis=axis) - statistic(*arrays[k:], axis=axis)

    return bootstrap_ci((*model_samples, *baseline_samples), delta, **kwargs)


def transformed_ci(interval: Interval | None, fn: Callable[[float], float]) -> Interval | None:
    """Map an interval through a monotone function (e.g. nats per word → perplexity = exp)."""
    if interval is None:
        return None
    lo, hi = fn(interval[0]), fn(interval[1])
    return (min(lo, hi), max(lo, hi))
