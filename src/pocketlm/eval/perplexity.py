"""Perplexity as lm-evaluation-harness defines it, and the strided variant of the transformers guide.

Each document is tokenized on its own (no special tokens) and every one of its tokens is predicted exactly once:

* **disjoint rolling windows** (the default; lm-eval's ``loglikelihood_rolling``): ``get_rolling_token_windows``
  with ``context_len=1`` then ``make_disjoint_window``. Window 0 predicts tokens ``[0, L)`` from the prefix
  token; window w >= 1 predicts ``[wL, min(n, (w+1)L))`` and its model input is the L tokens that end just before
  its last predicted token, so only the last window of a long document gets more than one token of context;
* **strided windows** (``stride=s``, the transformers "Perplexity of fixed-length models" guide): model inputs of at
  most L tokens of ``[prefix] + tokens`` starting at 0, s, 2s, ...; each window scores only the tokens no earlier
  window scored, the rest of it is context. Smaller s means more context per token and more compute.

Here L is ``max_length``, the most tokens the model is fed at once (lm-eval's meaning). Windows from all documents
are batched together through :func:`score_continuations`.

Corpus figures come from sums (lm-eval's ``weighted_perplexity``), never from averaging per-document ratios:
token perplexity ``exp(-Σ ll / Σ tokens)``, word perplexity ``exp(-Σ ll / Σ words)``, byte perplexity
``exp(-Σ ll / Σ bytes)``, bits per byte ``-Σ ll / (Σ bytes · ln 2)``; words and bytes counted as lm-eval's wikitext
task counts them.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from pocketlm.eval.loglik import score_continuations

DEFAULT_MAX_LENGTH = 2048  # lm-eval HFLM's fallback, and our cap on the model's own limit
_SEQLEN_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval HFLM's lookup order

Window = tuple[list[int], list[int]]  # (context, continuation) as score_continuations takes them


@dataclass(frozen=True)
class PerplexityResult:
    """Sums over a corpus; derived figures are properties so shards and documents combine with ``+``."""

    loglikelihood: float  # Σ log p(token | context), nats
    tokens: int  # tokens predicted
    words: int  # lm-eval wikitext word count; 0 where not counted (token blocks)
    bytes: int  # UTF-8 bytes; 0 where not counted
    documents: int  # documents (or blocks) that contributed tokens

    @property
    def token_perplexity(self) -> float:
        return _exp_neg_per(self.loglikelihood, self.tokens)

    @property
    def word_perplexity(self) -> float:
        return _exp_neg_per(self.loglikelihood, self.words)

    @property
    def byte_perplexity(self) -> float:
        return _exp_neg_per(self.loglikelihood, self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / (self.bytes * math.log(2)) if self.bytes else math.nan

    def to_dict(self) -> dict[str, float | int | None]:
        """Sums and derived figures; an undefined figure (nothing to divide by) is None, so the JSON stays valid."""
        derived = {
            "token_perplexity": self.token_perplexity,
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
        }
        return {**asdict(self), **{k: (None if math.isnan(v) else v) for k, v in derived.items()}}

    def __add__(self, other: PerplexityResult) -> PerplexityResult:
        if not isinstance(other, PerplexityResult):
            return NotImplemented
        return PerplexityResult(
            loglikelihood=self.loglikelihood + other.loglikelihood,
            tokens=self.tokens + other.tokens,
            words=self.words + other.words,
            bytes=self.bytes + other.bytes,
            documents=self.documents + other.documents,
        )

    def __radd__(self, other: object) -> PerplexityResult:
        if other == 0:  # lets sum(results) start from its default 0
            return self
        return NotImplemented


def _exp_neg_per(loglikelihood: float, count: int) -> float:
    return math.exp(-loglikelihood / count) if count else math.nan


def count_words(document: str) -> int:
    """lm-eval's wikitext word count: ``len(re.split(r"\\s+", doc))`` (leading/trailing whitespace adds one)."""
    return len(re.split(r"\s+", document))


def prefix_token_id(tokenizer) -> int:
    """lm-eval HFLM's ``prefix_token_id``: the BOS id if the tokenizer has one, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition a document's first token on")


def default_max_length(model: torch.nn.Module) -> int:
    """The model's context length from its config (as lm-eval looks it up), capped at 2048."""
    config = getattr(model, "config", None)
    for attr in _SEQLEN_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, DEFAULT_MAX_LENGTH)
    return DEFAULT_MAX_LENGTH


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Window]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` followed by ``make_disjoint_window``.

    Window 0 is ``([prefix], tokens[:L])``; after it, with ``p`` tokens predicted, the next window predicts
    ``tokens[p:end]`` with ``end = min(n, p + L)`` and its context is ``tokens[end-L-1:p]``, so context plus
    continuation is L + 1 tokens (the model sees L) and context is one token except on a short last window.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tokens = list(tokens)
    if not tokens:
        return []
    windows = [([prefix_token], tokens[:max_length])]
    predicted = len(windows[0][1])
    while predicted < len(tokens):
        end = min(len(tokens), predicted + max_length)
        windows.append((tokens[end - max_length - 1 : predicted], tokens[predicted:end]))
        predicted = end
    return windows


def strided_windows(tokens: Sequence[int], prefix_token: int, max_length: int, stride: int) -> list[Window]:
    """The transformers guide's sliding windows over ``[prefix] + tokens``, with inputs of at most L tokens.

    Window k feeds ``seq[b:e]`` (``b = k·stride``, ``e = min(b + L, n)``) and scores the targets ``seq[prev_e+1:e+1]``
    that no earlier window scored; it stops after the window that reaches the end. ``stride == L`` makes
    back-to-back windows: the same as :func:`rolling_windows` except that the last, short window gets no
    extra context (identical when ``n <= L`` or ``n`` is a multiple of L).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride} (a larger one skips tokens)")
    seq = [prefix_token, *tokens]
    n = len(tokens)  # targets are seq[1..n]; input position i predicts seq[i + 1]
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        windows.append((seq[begin : prev_end + 1], seq[prev_end + 1 : end + 1]))
        prev_end = end
        if end == n:
            break
    return windows


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Corpus perplexity of a causal LM over whole documents, each token scored once (lm-eval's definition).

    ``max_length`` defaults to the model's context length capped at 2048; ``stride`` switches to overlapping
    windows. Documents that tokenize to nothing are skipped and counted nowhere.
    """
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of strings, not one string")
    if len(documents) == 0:
        raise ValueError("perplexity needs at least one document; got an empty list")
    max_length = default_max_length(model) if max_length is None else max_length
    prefix = prefix_token_id(tokenizer)

    encoded = tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]
    kept = [(doc, ids) for doc, ids in zip(documents, encoded) if len(ids) > 0]
    if not kept:
        raise ValueError(f"all {len(documents)} documents are empty after tokenization; there is nothing to score")

    requests: list[Window] = []
    for _, ids in kept:
        if stride is None:
            requests.extend(rolling_windows(ids, prefix, max_length))
        else:
            requests.extend(strided_windows(ids, prefix, max_length, stride))

    scores = score_continuations(
        model, requests, batch_size=batch_size, max_length=max_length, progress=progress, desc="perplexity"
    )
    return PerplexityResult(
        loglikelihood=math.fsum(ll for ll, _ in scores),
        tokens=sum(len(ids) for _, ids in kept),
        words=sum(count_words(doc) for doc, _ in kept),
        bytes=sum(len(doc.encode("utf-8")) for doc, _ in kept),
        documents=len(kept),
    )


def block_perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> PerplexityResult:
    """Token-level perplexity over pre-packed blocks ``[n, L]``: every token after a block's first is predicted.

    For the trainer's validation: no words or bytes exist here, so those figures are nan; ``documents`` counts
    blocks.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n >= 1, L >= 2] token ids, got shape {tuple(blocks.shape)}")
    rows = blocks.tolist()
    scores = score_continuations(model, [(row[:1], row[1:]) for row in rows], batch_size=batch_size)
    return PerplexityResult(
        loglikelihood=math.fsum(ll for ll, _ in scores),
        tokens=len(rows) * (len(rows[0]) - 1),
        words=0,
        bytes=0,
        documents=len(rows),
    )
