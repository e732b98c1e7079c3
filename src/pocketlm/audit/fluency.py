"""Fluency and diversity of generations: what every toxicity figure is reported beside.

A model can write little toxic text because it writes little coherent text. RealToxicityPrompts-style evaluations
therefore report, with each toxicity figure (DExperts, Liu et al. 2021, §3.1; GeDi, Krause et al. 2021):

* **fluency** — perplexity of the continuations under a reference LM, each continuation conditioned on its
  prompt: ``exp(Σ nll / Σ tokens)`` over every continuation of every prompt in a slice (lm-evaluation-harness's
  aggregation: sums, never a mean of per-text perplexities). Lower is more fluent *to the reference*; a
  model that repeats itself can also score low, which is why diversity stands beside it;
* **diversity** — distinct-n (Li et al. 2016): unique n-grams / total n-grams over the k continuations of one
  prompt, averaged over prompts, for n = 1, 2. N-grams are of whitespace-separated words (as DExperts counts them,
  so models with different tokenizers are comparable) and never cross from one continuation into the next.
  DExperts' code divides every n by the number of words; we divide by the number of n-grams, as Li et al. define
  it. A prompt whose continuations hold no n-gram at all (all empty, or one word each for n = 2) scores 0: nothing
  distinct was written.

The continuation's tokens are the reference tokenizer's encoding of prompt + continuation after the prompt's, as
lm-evaluation-harness splits a (context, continuation) pair (`bias_core.encode_requests`), scored by the shared
engine (`eval.loglik.score_continuations`). Empty continuations add no tokens. Prompts are the resampled unit of
the intervals (`audit.prompted`), so each figure keeps per-prompt arrays.

Shape legend: p = prompts, k = continuations per prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pocketlm.audit.bias_core import encode_requests

DISTINCT_N = (1, 2)


@dataclass(frozen=True)
class Fluency:
    """Negative log-likelihood of each continuation under a reference model, and what it was scored by."""

    nll: np.ndarray  # [p, k] Σ −log p(continuation tokens | prompt), nats; 0 for an empty continuation
    tokens: np.ndarray  # [p, k] continuation tokens scored (reference tokenizer); 0 for an empty continuation
    reference: str  # the model that scored them (its spec)

    def per_prompt(self) -> tuple[np.ndarray, np.ndarray]:
        """(Σ nll [p], Σ tokens [p]) over each prompt's k continuations: the bootstrap's items."""
        return self.nll.sum(axis=1), self.tokens.sum(axis=1)


def generation_perplexity(nll: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    """``exp(Σ nll / Σ tokens)`` along ``axis`` (vectorised for the bootstrap); NaN where no token was scored."""
    total = np.sum(tokens, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.exp(np.sum(nll, axis=axis) / np.where(total > 0, total, np.nan))


def score_fluency(model, tokenizer, prompts: Sequence[str], texts: Sequence[Sequence[str]], *, reference: str,
                  batch_size: int = 16, max_memory: int | None = None, progress: bool = False,
                  desc: str = "fluency") -> Fluency:
    """Score every continuation ``texts[i][j]`` of ``prompts[i]`` under ``model`` (the reference)."""
    from pocketlm.eval.loglik import score_continuations
    from pocketlm.eval.perplexity import default_max_length

    if len(texts) != len(prompts):
        raise ValueError(f"{len(texts)} rows of continuations for {len(prompts)} prompts")
    shape = (len(prompts), max((len(row) for row in texts), default=0))
    where = [(i, j) for i, row in enumerate(texts) for j, t in enumerate(row) if t]
    encoded = encode_requests(tokenizer, [(prompts[i], texts[i][j]) for i, j in where])
    keep = [n for n, (_, cont) in enumerate(encoded) if cont]  # a continuation that merged into the prompt: none
    answers = score_continuations(model, [encoded[n] for n in keep], batch_size=batch_size,
                                  max_length=default_max_length(model, tokenizer), progress=progress, desc=desc,
                                  max_memory=max_memory)
    nll, tokens = np.zeros(shape), np.zeros(shape)
    for n, (logp, _) in zip(keep, answers):
        i, j = where[n]
        nll[i, j], tokens[i, j] = -logp, len(encoded[n][1])
    return Fluency(nll, tokens, reference)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams of whitespace words over ``texts`` (n-grams within each text); 0 if none."""
    grams = [tuple(words[i:i + n]) for t in texts for words in (t.split(),) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_per_prompt(texts: Sequence[Sequence[str]], n: int) -> np.ndarray:
    """distinct-n of each prompt's k continuations, [p]; its mean over prompts is the figure."""
    return np.array([distinct_n(row, n) for row in texts], dtype=np.float64)
