"""What every log-likelihood bias suite shares: text requests encoded as lm-evaluation-harness encodes them, a
batched scorer, and corpus statistics with bootstrap intervals and teacher-vs-student deltas.

A suite turns its items into ``(context, continuation)`` text requests; a *scorer* answers each with
``(Σ log p(continuation | context), continuation tokens)``; the suite turns the answers into per-item arrays; its
statistics are vectorised functions of those arrays. Intervals resample items (every array of an item together);
a delta resamples the same items for both models (`pocketlm.core.stats.paired_statistic_delta_ci`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from pocketlm.core.results import Metric
from pocketlm.core.stats import DEFAULT_RESAMPLES, bootstrap_ci, paired_statistic_delta_ci

TextRequest = tuple[str, str]  # (context, continuation)
Scorer = Callable[[Sequence[TextRequest]], list[tuple[float, int]]]  # -> (sum log-prob, continuation tokens)
# A scorer whose ``refine`` is true also has ``error_bound(tokens)`` and ``rescore(requests)`` (see `ModelScorer`).
Arrays = dict[str, np.ndarray]  # per-item arrays, each [n_items]


# ---------------------------------------------------------------------------------------------------- encoding


def _encode(tokenizer, texts: list[str], prefix_text: str) -> list[list[int]]:
    """lm-eval HFLM ``tok_encode``: the tokenizer's default special tokens, none if the text starts with BOS."""
    out: list[list[int] | None] = [None] * len(texts)
    for with_special in (True, False):
        idx = [i for i, t in enumerate(texts) if bool(prefix_text and t.startswith(prefix_text)) != with_special]
        if idx:
            kwargs = {} if with_special else {"add_special_tokens": False}
            for i, ids in zip(idx, tokenizer([texts[i] for i in idx], **kwargs)["input_ids"]):
                out[i] = list(ids)
    return out  # type: ignore[return-value]  # every slot filled


def encode_requests(tokenizer, requests: Sequence[TextRequest]) -> list[tuple[list[int], list[int]]]:
    """Token ids for text requests, exactly as lm-evaluation-harness 0.4's ``LM.loglikelihood`` makes them.

    * Empty context: the continuation without special tokens, conditioned on the prefix token (BOS, else EOS);
      if the continuation already starts with that token, its first token becomes the context.
    * Otherwise (``_encode_pair``): trailing whitespace of the context moves to the continuation; the whole text
      and the context are encoded, and the continuation is the whole's tokens after the context's.
    """
    from pocketlm.eval.perplexity import prefix_token_id

    prefix = prefix_token_id(tokenizer)
    prefix_text = tokenizer.decode([prefix])
    out: list[tuple[list[int], list[int]] | None] = [None] * len(requests)

    empty = [i for i, (ctx, _) in enumerate(requests) if ctx == ""]
    if empty:
        encoded = tokenizer([requests[i][1] for i in empty], add_special_tokens=False)["input_ids"]
        for i, ids in zip(empty, encoded):
            ids = list(ids)
            if not ids:
                raise ValueError(f"request {i}: the continuation {requests[i][1]!r} encodes to no tokens")
            out[i] = ([prefix], ids) if ids[0] != prefix else (ids[:1], ids[1:])

    full = [i for i, (ctx, _) in enumerate(requests) if ctx != ""]
    if full:
        contexts, wholes = [], []
        for i in full:
            ctx, cont = requests[i]
            n_spaces = len(ctx) - len(ctx.rstrip())
            if n_spaces:
                ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
            contexts.append(ctx)
            wholes.append(ctx + cont)
        ctx_ids, whole_ids = _encode(tokenizer, contexts, prefix_text), _encode(tokenizer, wholes, prefix_text)
        for i, c, w in zip(full, ctx_ids, whole_ids):
            out[i] = (c, w[len(c):])
    return out  # type: ignore[return-value]


class ModelScorer:
    """A scorer backed by a causal LM: lm-eval's encoding, then `score_continuations` (batched, longest first).

    ``precision``: ``fp32``; ``bf16`` (the model body in bf16 autocast, the output layer and log-softmax in fp32,
    see `pocketlm.eval.loglik`); or ``auto``: where the hardware runs bf16 natively, bf16 first, and then — through
    ``refine``, ``error_bound`` and ``rescore``, which `pocketlm.audit.bias.score_items` uses — fp32 again for the
    requests of the items whose decision lies within the bf16 error bound (`pocketlm.eval.bf16_bound`), so that every
    decision is fp32's; fp32 elsewhere. Called, it answers each request with ``(Σ log p, continuation tokens)``.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                 precision: str = "fp32", progress: bool = False, desc: str = "scoring",
                 max_memory: int | None = None):
        import torch

        from pocketlm.eval.loglik import model_device, resolve_precision
        from pocketlm.eval.perplexity import default_max_length

        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.first = resolve_precision(precision, model_device(model))  # the first pass: "fp32" or "bf16"
        self.weights = next(model.parameters()).dtype
        # re-scoring in fp32 needs fp32 weights: with bf16 weights the second pass would be bf16 again
        self.refine = precision == "auto" and self.first == "bf16" and self.weights == torch.float32
        limit = max_length if max_length is not None else default_max_length(model, tokenizer)
        self._kwargs = dict(batch_size=batch_size, max_length=limit, progress=progress, desc=desc,
                            max_memory=max_memory)

    def _score(self, requests: Sequence[TextRequest], precision: str, desc: str) -> list[tuple[float, int]]:
        from pocketlm.eval.loglik import score_continuations

        encoded = encode_requests(self.tokenizer, requests)
        answers = score_continuations(self.model, encoded, precision=precision, **{**self._kwargs, "desc": desc})
        return [(ll, len(cont)) for (ll, _), (_, cont) in zip(answers, encoded)]

    def __call__(self, requests: Sequence[TextRequest]) -> list[tuple[float, int]]:
        return self._score(requests, self.first, self._kwargs["desc"])

    def error_bound(self, tokens: np.ndarray) -> np.ndarray:
        """Each first-pass answer's share of the bound on a compared difference's bf16 error, by its continuation
        tokens (elementwise; `pocketlm.eval.bf16_bound`)."""
        from pocketlm.eval.bf16_bound import bf16_error_bound

        return bf16_error_bound(tokens)

    def rescore(self, requests: Sequence[TextRequest]) -> list[tuple[float, int]]:
        """The same answers in fp32."""
        return self._score(requests, "fp32", f"{self._kwargs['desc']}: fp32 near ties")

    def describe(self) -> dict[str, Any]:
        """What this scorer computes, for ``results.settings``."""
        from pocketlm.eval.bf16_bound import describe_bound

        scoring = {"fp32": "fp32", "bf16": "bf16 body (each sequence's first 2 positions in fp32), fp32 output "
                                           "layer and log-softmax"}[self.first]
        import torch

        if self.weights != torch.float32:
            scoring += (f"; weights in {str(self.weights).removeprefix('torch.')}: no item is re-scored in fp32, "
                        "decisions are those of these weights")
        if self.refine:
            scoring += ("; items whose decision lies within the bf16 error bound re-scored in fp32: every decision "
                        "is fp32's, the other items' log-likelihoods are bf16's (means of them, such as "
                        "likelihood_diff, move by about 1e-3 nats: benchmarks/bf16_error.py)")
        return {"precision": self.precision, "scoring": scoring,
                "bound": describe_bound() if self.refine else None}


def model_scorer(model, tokenizer, **kwargs: Any) -> ModelScorer:
    """`ModelScorer` (kept as the name callers know)."""
    return ModelScorer(model, tokenizer, **kwargs)


# ---------------------------------------------------------------------------------------------------- near ties


def pair_near_ties(scores: np.ndarray, bound: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Items [n] where the order of some compared pair of answers could differ from fp32's: ``|s_i − s_j| <=
    b_i + b_j`` (``scores``, ``bound`` [n, k]; a tie counts, since strict and non-strict decisions part there)."""
    near = np.zeros(len(scores), dtype=bool)
    for i, j in pairs:
        near |= np.abs(scores[:, i] - scores[:, j]) <= bound[:, i] + bound[:, j]
    return near


def argmax_near_ties(scores: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Items [n] whose argmax (first on ties) could differ from fp32's: some other answer within the two bounds of
    the top one (``s_top − s_j <= b_top + b_j``)."""
    top = np.argmax(scores, axis=1)  # [n]
    rows = np.arange(len(scores))
    gap = scores[rows, top][:, None] - scores  # [n, k]
    reach = bound[rows, top][:, None] + bound  # [n, k]
    others = np.ones(scores.shape, dtype=bool)
    others[rows, top] = False
    return np.any(others & (gap <= reach), axis=1)


# ---------------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Statistic:
    """A corpus figure: ``fn(*arrays[inputs], axis=-1)``, vectorised over items (the bootstrap's axis).

    ``over`` names a 0/1 array selecting the items the figure is about (e.g. BBQ's ambiguous contexts): it is
    computed over, and its interval resamples, those items only (their number is fixed by the suite's design, and
    a resample without any would have no value). None: all items.
    """

    name: str
    fn: Callable[..., np.ndarray]
    inputs: tuple[str, ...]
    higher_is_better: bool | None
    unit: str | None = None
    over: str | None = None


def _value(stat: Statistic, arrays: Arrays) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(stat.fn(*(arrays[k] for k in stat.inputs), axis=-1))


def _safe(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def wrapped(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return fn(*arrays, axis=axis)

    return wrapped


def _finite(x: float) -> bool:
    return bool(np.isfinite(x))


@dataclass(frozen=True)
class Delta:
    """model − baseline for one figure, with its paired-bootstrap interval; significant when it excludes 0."""

    name: str
    group: str | None
    value: float | None
    ci: tuple[float, float] | None
    n: int

    @property
    def significant(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "value": self.value,
                "ci": None if self.ci is None else list(self.ci), "n": self.n, "significant": self.significant}


def compute_metrics(
    statistics: Sequence[Statistic],
    arrays: Arrays,
    groups: Sequence[str],
    *,
    baseline: Arrays | None = None,
    seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
) -> tuple[list[Metric], list[Delta]]:
    """Every statistic overall (group None) and per group, each with a 95 % bootstrap interval; with a baseline
    (arrays of the same items), ``delta_<name>`` metrics = model − baseline with paired-bootstrap intervals."""
    groups_arr = np.asarray(groups, dtype=object)
    slices: list[tuple[str | None, np.ndarray]] = [(None, np.ones(len(groups_arr), dtype=bool))]
    slices += [(g, groups_arr == g) for g in sorted(set(groups))]
    metrics: list[Metric] = []
    deltas: list[Delta] = []
    for group, mask in slices:
        sub = {k: v[mask] for k, v in arrays.items()}
        base = None if baseline is None else {k: v[mask] for k, v in baseline.items()}
        for stat in statistics:
            keep = slice(None) if stat.over is None else sub[stat.over] == 1
            mod = {k: sub[k][keep] for k in stat.inputs}
            ref = None if base is None else {k: base[k][keep] for k in stat.inputs}
            n = len(next(iter(mod.values())))
            value = _value(stat, mod) if n else float("nan")
            ci = None
            fn = _safe(stat.fn)
            if _finite(value):
                ci = bootstrap_ci(tuple(mod[k] for k in stat.inputs), fn, seed=seed, n_resamples=n_resamples)
            metrics.append(Metric(name=stat.name, value=value if _finite(value) else None, n=n, ci=ci,
                                  higher_is_better=stat.higher_is_better, group=group, unit=stat.unit))
            if ref is None:
                continue
            b_value = _value(stat, ref) if n else float("nan")
            d_value = value - b_value if _finite(value) and _finite(b_value) else None
            d_ci = None
            if d_value is not None:
                d_ci = paired_statistic_delta_ci(fn, [mod[k] for k in stat.inputs], [ref[k] for k in stat.inputs],
                                                 seed=seed, n_resamples=n_resamples)
            delta = Delta(name=f"delta_{stat.name}", group=group, value=d_value, ci=d_ci, n=n)
            deltas.append(delta)
            metrics.append(Metric(name=delta.name, value=d_value, n=n, ci=d_ci,
                                  higher_is_better=stat.higher_is_better, group=group, unit=stat.unit))
    return metrics, deltas


# ------------------------------------------------------------------------------------------ vectorised helpers


def share(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Percentage of items where the 0/1 indicator ``x`` is 1."""
    return 100.0 * np.mean(x, axis=axis)


def mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def masked_mean(x: np.ndarray, mask: np.ndarray, axis: int = -1) -> np.ndarray:
    """Σ x·mask / Σ mask: a mean over the items a 0/1 mask selects (NaN when it selects none)."""
    return np.sum(x * mask, axis=axis) / np.sum(mask, axis=axis)


def mean_per_code(x: np.ndarray, codes: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean over codes (e.g. StereoSet target terms) of the per-code mean of ``x`` — a macro average, over
    the codes present in each resample. ``codes`` are small non-negative integers stored as floats."""
    x, codes = np.moveaxis(x, axis, -1), np.moveaxis(codes, axis, -1).astype(np.int64)
    lead, n = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    k = int(codes.max()) + 1 if codes.size else 1
    flat = (np.arange(rows)[:, None] * k + codes.reshape(rows, n)).ravel()  # [rows·n] bin per (row, code)
    sums = np.bincount(flat, weights=x.reshape(rows, n).ravel(), minlength=rows * k).reshape(rows, k)
    counts = np.bincount(flat, minlength=rows * k).reshape(rows, k)
    present = counts > 0
    per_code = np.where(present, sums / np.maximum(counts, 1), 0.0)  # [rows, k]
    out = per_code.sum(-1) / present.sum(-1)
    return out.reshape(lead) if lead else out[0]
