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
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from pocketlm.data.text import read_documents
from pocketlm.eval.loglik import resolve_precision, score_continuations
from pocketlm.models.load import load_model
from pocketlm.core.results import Metric, Results
from pocketlm.core.stats import ratio_ci, transformed_ci

DEFAULT_MAX_LENGTH = 2048  # lm-eval HFLM's fallback when neither config nor tokenizer states a context length
_TOKENIZER_UNSET = int(1e29)  # transformers' VERY_LARGE_INTEGER: "model_max_length not set"
DEFAULT_MAX_BATCH_TOKENS = 16384  # padded tokens per forward: bounds the [b, t, vocab] logits (3.2 GB at 49k fp32)
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


def wikitext_detokenize(text: str) -> str:
    """lm-eval's ``wikitext`` task detokeniser (``preprocess_wikitext.wikitext_detokenizer``), rule for rule."""
    string = text
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    for mark in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {mark} ", f"{mark} ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


DETOKENIZERS: dict[str, Callable[[str], str]] = {"wikitext": wikitext_detokenize}


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


def model_context_length(model: torch.nn.Module, tokenizer=None) -> int | None:
    """The model's context length as lm-eval's ``resolve_max_length`` finds it; None when nothing states one.

    The nested ``text_config`` first, then the config's ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``,
    then the tokenizer's ``model_max_length`` unless it is the "unset" sentinel.
    """
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in _SEQLEN_ATTRS:
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < _TOKENIZER_UNSET:
        return limit
    return None


def default_max_length(model: torch.nn.Module, tokenizer=None) -> int:
    """lm-eval HFLM's ``max_length``: the model's context length, or 2048 when nothing states one."""
    return model_context_length(model, tokenizer) or DEFAULT_MAX_LENGTH


def check_max_length(model: torch.nn.Module, tokenizer, max_length: int) -> None:
    """Refuse windows longer than the model's context, before any model work."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    context = model_context_length(model, tokenizer)
    if context is not None and max_length > context:
        raise ValueError(
            f"max_length={max_length} is longer than the model's context of {context} tokens; "
            f"pass --max-length {context} or less"
        )


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


def document_perplexities(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    detokenize: str | None = None,
    batch_size: int = 8,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    precision: str = "fp32",
    progress: bool = True,
    max_memory: int | None = None,
) -> list[PerplexityResult]:
    """Per-document sums (one :class:`PerplexityResult` per document, in order; empty ones are skipped).

    ``detokenize`` names a :data:`DETOKENIZERS` entry applied to the text the model scores; words and bytes are
    counted on the original text, as lm-eval's wikitext task counts them. Windows of all documents are batched
    together (longest first, at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens per forward).
    ``precision="bf16"`` runs the model body in bf16 and its output layer and log-softmax in fp32. ``max_memory``
    (bytes) shrinks batches to fit weights + one batch's estimated peak (see ``score_continuations``).
    """
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of strings, not one string")
    if len(documents) == 0:
        raise ValueError("perplexity needs at least one document; got an empty list")
    if detokenize is not None and detokenize not in DETOKENIZERS:
        raise ValueError(f"unknown detokenizer {detokenize!r}; valid: {', '.join(DETOKENIZERS)}")
    max_length = default_max_length(model, tokenizer) if max_length is None else max_length
    check_max_length(model, tokenizer, max_length)
    prefix = prefix_token_id(tokenizer)

    texts = [DETOKENIZERS[detokenize](d) for d in documents] if detokenize else list(documents)
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    kept = [(doc, ids) for doc, ids in zip(documents, encoded) if len(ids) > 0]
    if not kept:
        raise ValueError(f"all {len(documents)} documents are empty after tokenization; there is nothing to score")

    requests: list[Window] = []
    owner: list[int] = []  # document index of each window
    for d, (_, ids) in enumerate(kept):
        windows = rolling_windows(ids, prefix, max_length) if stride is None else strided_windows(
            ids, prefix, max_length, stride)
        requests.extend(windows)
        owner.extend([d] * len(windows))

    scores = score_continuations(
        model, requests, batch_size=batch_size, max_length=max_length, max_batch_tokens=max_batch_tokens,
        precision=precision, progress=progress, desc="perplexity", max_memory=max_memory,
    )
    per_doc: list[list[float]] = [[] for _ in kept]
    for d, (ll, _) in zip(owner, scores):
        per_doc[d].append(ll)
    return [
        PerplexityResult(
            loglikelihood=math.fsum(lls), tokens=len(ids), words=count_words(doc),
            bytes=len(doc.encode("utf-8")), documents=1,
        )
        for lls, (doc, ids) in zip(per_doc, kept)
    ]


def perplexity(model: torch.nn.Module, tokenizer, documents: Sequence[str], **kwargs) -> PerplexityResult:
    """Corpus perplexity of a causal LM over whole documents, each token scored once (lm-eval's definition).

    ``max_length`` defaults to the model's context length as lm-eval resolves it; ``stride`` switches to
    overlapping windows; ``detokenize="wikitext"`` is the harness's wikitext task. Keywords as
    :func:`document_perplexities`; the corpus figure is the sum of the documents' sums.
    """
    return sum(document_perplexities(model, tokenizer, documents, **kwargs), PerplexityResult(0.0, 0, 0, 0, 0))


_HIGHER_IS_BETTER = {"token_perplexity": False, "word_perplexity": False, "byte_perplexity": False,
                     "bits_per_byte": False}


def perplexity_metrics(per_document: Sequence[PerplexityResult], *, seed: int = 0) -> list[Metric]:
    """The corpus figures with 95 % bootstrap intervals over documents (ratio of sums, recomputed per resample)."""
    total = sum(per_document, PerplexityResult(0.0, 0, 0, 0, 0))
    nll = [-r.loglikelihood for r in per_document]
    metrics = []
    for name, unit_count, to_figure in (
        ("token_perplexity", "tokens", math.exp),
        ("word_perplexity", "words", math.exp),
        ("byte_perplexity", "bytes", math.exp),
        ("bits_per_byte", "bytes", lambda v: v / math.log(2)),
    ):
        counts = [getattr(r, unit_count) for r in per_document]
        ci = transformed_ci(ratio_ci(nll, counts, seed=seed), to_figure) if sum(counts) else None
        metrics.append(Metric(name, getattr(total, name), n=total.documents, ci=ci,
                              higher_is_better=_HIGHER_IS_BETTER[name]))
    return metrics


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


def perplexity_results(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[str],
    *,
    model_spec: str,
    data_source: str,
    max_length: int | None = None,
    stride: int | None = None,
    detokenize: str | None = None,
    batch_size: int = 8,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
    max_memory: int | None = None,
) -> Results:
    """Perplexity as a typed ``results.json`` document: figures with intervals, sums, settings, provenance."""
    from pocketlm.data.text import hash_documents
    from pocketlm.core.provenance import provenance
    from pocketlm.models.load import model_info

    start = time.perf_counter()
    max_length = default_max_length(model, tokenizer) if max_length is None else max_length
    per_doc = document_perplexities(
        model, tokenizer, documents, max_length=max_length, stride=stride, detokenize=detokenize,
        batch_size=batch_size, max_batch_tokens=max_batch_tokens, precision=precision, progress=progress,
        max_memory=max_memory,
    )
    total = sum(per_doc, PerplexityResult(0.0, 0, 0, 0, 0))
    dtype = next(model.parameters()).dtype
    return Results(
        kind="perplexity",
        model=model_info(model_spec, model, tokenizer),
        data={"source": str(data_source), "hash": hash_documents(documents), "n": len(documents)},
        settings={
            "max_length": max_length, "stride": stride, "windows": "rolling" if stride is None else "strided",
            "detokenize": detokenize, "prefix_token_id": prefix_token_id(tokenizer), "dtype": str(dtype),
            "precision": resolve_precision(precision, next(model.parameters()).device),
            "batch_size": batch_size, "max_batch_tokens": max_batch_tokens, "max_memory": max_memory,
            "bootstrap_seed": seed,
        },
        metrics=perplexity_metrics(per_doc, seed=seed),
        details={"sums": asdict(total), "per_document": [asdict(r) for r in per_doc]},
        provenance=provenance(),
        wall_time_s=time.perf_counter() - start,
    )


def evaluate_perplexity(
    model_spec: str,
    data: str,
    *,
    field: str = "text",
    split: str = "test",
    txt_split: str = "blank_lines",
    max_documents: int | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    detokenize: str | None = None,
    batch_size: int = 8,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    max_memory: int | None = None,
    dtype: str = "float32",
    precision: str = "auto",
    progress: bool = True,
    trust_remote_code: bool | None = None,
) -> Results:
    """`pocketlm eval perplexity`: read the documents, load the model (every input checked before the model
    work), score, → ``Results(kind="perplexity")``."""
    if detokenize is not None and detokenize not in DETOKENIZERS:
        raise ValueError(f"unknown --detokenize {detokenize!r}; valid: {', '.join(DETOKENIZERS)}")
    docs = read_documents(data, field=field, split=split, max_documents=max_documents, txt_split=txt_split)
    model, tokenizer = load_model(model_spec, dtype=dtype, max_memory=max_memory, trust_remote_code=trust_remote_code)
    if max_length is not None:
        check_max_length(model, tokenizer, max_length)
    res = perplexity_results(
        model, tokenizer, docs, model_spec=model_spec, data_source=data, max_length=max_length, stride=stride,
        detokenize=detokenize, batch_size=batch_size, max_batch_tokens=max_batch_tokens, precision=precision,
        progress=progress, max_memory=max_memory,
    )
    res.settings["txt_split"] = txt_split
    return res
