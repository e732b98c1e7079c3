"""ROUGE of generated text: summaries against reference summaries, or a student's continuations against a teacher's.

Scores are Google's ``rouge-score`` (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries"): rouge1,
rouge2, rougeL and rougeLsum, optionally with Porter stemming. rougeLsum is the summary-level LCS over sentences,
and ``rouge-score`` reads sentences from newlines; rather than its nltk ``punkt`` option (a download) we put each
sentence on its own line with our own splitter, for rougeLsum only (rouge1/2/L see the text as given) — the
preparation the ``rouge-score`` README describes. Several references per item (e.g. DialogSum's three) are scored as
``score_multi`` does: per ROUGE type, the reference with the best F1.

Corpus figures are the mean per-item F1 (and precision, recall) with a seeded 95 % bootstrap interval over items
(`pocketlm.core.stats.mean_ci`); ``rouge-score``'s own ``BootstrapAggregator`` mid is kept beside it as a cross-check.

Two tasks share the machinery:
  summarisation — a prompt template over a document field, batched greedy generation, scored against references;
  fidelity      — student and teacher greedily continue the same prompts; the teacher's text is the reference.
"""
from __future__ import annotations

import random
import re
import string
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pocketlm.data.text import DataError, first_line, hash_documents, read_table
from pocketlm.eval.generate import GenerationSettings, generate
from pocketlm.core.results import Metric, Results
from pocketlm.models.load import model_info
from pocketlm.core.stats import DEFAULT_RESAMPLES, mean_ci

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
MEASURES = ("fmeasure", "precision", "recall")  # F1 first: the headline figure of each type
DEFAULT_SUMMARY_TEMPLATE = "Summarize the following text in one or two sentences.\n\n{document}\n\nSummary:"
DEFAULT_CONTINUATION_TEMPLATE = "{prompt}"
DEFAULT_STOP = ("\n\n",)  # a blank line ends a summary / continuation

Reference = str | list[str]  # one reference, or several (scored as the best of them)


# ---------------------------------------------------------------------------------------------- sentence splitting
# Words that end in "." without ending a sentence ("Mr. Smith", "No. 5", "et al. (2019)"). "etc." is left out on
# purpose: followed by a capital it usually does end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms mx dr prof sr jr st mt ft rev hon gen col lt sgt capt cmdr gov sen rep pres supt vs al fig figs eq "  # noqa: SIM905 - a word list reads best as one string
    "no nos vol vols pp ch sec ed eds approx est inc ltd co corp bros dept univ assn ave blvd rd jan feb mar apr "
    "jun jul aug sep sept oct nov dec".split()
)
_DOTTED = re.compile(r"^(?:[^\W\d_]\.)+[^\W\d_]$")  # e.g, i.e, U.S, a.m (the final "." is the candidate)
_OPENERS = "\"'“‘«([#"  # may start a sentence before its first letter ("#Person1#" is DialogSum's speaker tag)
_CANDIDATE = re.compile(r"[.!?]+[\"'”’»)\]]*(?=\s)")  # terminal punctuation, closing quotes/brackets, then space


def _ends_abbreviation(before: str) -> bool:
    """Whether the word ending at a single '.' is an abbreviation or an initial (so no sentence ends there)."""
    words = before.split()
    if not words:
        return True
    word = words[-1].lstrip(_OPENERS)
    if len(word) == 1 and word.isalpha():  # an initial: "J. K. Rowling"
        return True
    return word.lower() in _ABBREVIATIONS or bool(_DOTTED.match(word))


def _starts_sentence(rest: str) -> bool:
    rest = rest.lstrip()
    if not rest:
        return False
    if rest[0] in _OPENERS:
        return True
    return rest[0].isupper() or rest[0].isdigit()


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: every newline ends one; inside a line, '.', '!' or '?' (with any closing quotes)
    followed by whitespace and a capital, a digit or an opening quote ends one, unless the '.' closes an
    abbreviation ("Mr.", "e.g.", "U.S.", an initial). Whitespace at the ends is stripped; empty ones dropped."""
    sentences: list[str] = []
    for line in text.split("\n"):
        start = 0
        for m in _CANDIDATE.finditer(line):
            punct = m.group(0).rstrip("\"'”’»)]")
            if punct == "." and _ends_abbreviation(line[start : m.start()]):
                continue
            if _starts_sentence(line[m.end():]):
                sentences.append(line[start : m.end()])
                start = m.end()
        sentences.append(line[start:])
    return [s.strip() for s in sentences if s.strip()]


def sentences_per_line(text: str) -> str:
    """``text`` with one sentence a line: what ``rouge-score`` expects for rougeLsum (``split_summaries=False``)."""
    return "\n".join(split_sentences(text))


# ---------------------------------------------------------------------------------------------- scoring
Scores = dict  # rouge type -> rouge_score.scoring.Score(precision, recall, fmeasure)


def score_items(
    predictions: Sequence[str], references: Sequence[Reference], *, stem: bool = False
) -> list[Scores]:
    """Per-item ROUGE scores, exactly ``rouge_scorer.RougeScorer``'s: rouge1/2/L on the texts as given, rougeLsum on
    the texts with one sentence a line. With several references, each type takes the best-F1 one (``score_multi``)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem, split_summaries=False)
    lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=stem, split_summaries=False)
    out = []
    for pred, ref in zip(predictions, references):
        targets = [ref] if isinstance(ref, str) else list(ref)
        if not targets:
            raise ValueError("an item has an empty list of references")
        scores = plain.score_multi(targets, pred)
        scores.update(lsum.score_multi([sentences_per_line(t) for t in targets], sentences_per_line(pred)))
        out.append({t: scores[t] for t in ROUGE_TYPES})
    return out


def bootstrap_aggregator_mid(items: Sequence[Scores], *, seed: int = 0, n_samples: int = DEFAULT_RESAMPLES) -> dict:
    """``rouge-score``'s ``BootstrapAggregator`` mid (median of bootstrap means) per type and measure; it draws from
    numpy's global RNG, so it is seeded here and the caller's global state is restored afterwards."""
    from rouge_score import scoring

    agg = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=n_samples)
    for s in items:
        agg.add_scores(s)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        result = agg.aggregate()
    finally:
        np.random.set_state(state)
    return {t: dict(result[t].mid._asdict()) for t in ROUGE_TYPES}


def rouge_metrics(items: Sequence[Scores], *, seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES) -> list[Metric]:
    """Corpus figures: for each type, mean F1 (named e.g. "rouge1"), precision ("rouge1_precision") and recall
    ("rouge1_recall") over items, each with a seeded 95 % bootstrap interval (None below two items)."""
    if not items:
        raise ValueError("no scored items to aggregate")
    metrics = []
    for t in ROUGE_TYPES:
        for measure in MEASURES:
            values = [getattr(s[t], measure) for s in items]
            name = t if measure == "fmeasure" else f"{t}_{measure}"
            metrics.append(Metric(
                name=name, value=float(np.mean(values)), n=len(values),
                ci=mean_ci(values, seed=seed, n_resamples=n_resamples), higher_is_better=True,
            ))
    return metrics


# ---------------------------------------------------------------------------------------------- reading data
def _load_table(source: str, split: str):
    """A `datasets.Dataset` from a .jsonl/.json/.parquet/.csv file, a local dataset folder or a hub name."""
    import datasets

    path = Path(source).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file():
        if path.suffix not in builders:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
        return read_table(path, builders[path.suffix])  # empty, no rows, not UTF-8 or unparseable: named
    if not path.exists() and source.startswith((".", "/", "~")):
        raise DataError(f"data not found: {path}")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load the dataset {source!r} (split {split!r}): {first_line(e)}. "
                        f"Offline? Pass a local file or folder instead.") from None


def _column(ds, name: str, where: str, role: str) -> list:
    if name not in ds.column_names:
        raise DataError(f"{where} has no {role} field {name!r}; its fields are: {', '.join(ds.column_names)}")
    return list(ds[name])


def _text(value, where: str, row: int, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} row {row + 1}: field {name!r} is {'empty' if value in ('', None) else 'not text'}"
                        f" ({str(value)[:40]!r})")
    return value


def read_summarization_data(
    source: str, *, document_field: str = "document", reference_field: str = "summary", split: str = "test"
) -> tuple[list[str], list[Reference]]:
    """(documents, references) from a table; a reference is a string or a list of strings (several references)."""
    ds = _load_table(str(source), split)
    docs = _column(ds, document_field, str(source), "document")
    refs = _column(ds, reference_field, str(source), "reference")
    if not docs:
        raise DataError(f"{source} holds no rows")
    documents = [_text(d, str(source), i, document_field) for i, d in enumerate(docs)]
    references: list[Reference] = []
    for i, r in enumerate(refs):
        if isinstance(r, list):
            if not r:
                raise DataError(f"{source} row {i + 1}: field {reference_field!r} is an empty list")
            references.append([_text(x, str(source), i, reference_field) for x in r])
        else:
            references.append(_text(r, str(source), i, reference_field))
    return documents, references


def _read_lines(path: Path) -> list[str]:
    lines = []
    for i, raw in enumerate(path.read_bytes().split(b"\n")):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} line {i + 1} is not UTF-8 (byte {e.start}: {e.reason})") from None
    return [line for line in lines if line.strip()]


def read_prompts(
    source: str, *, prompt_field: str | None = None, document_field: str = "document", split: str = "test"
) -> list[str]:
    """Prompts for a fidelity run: a .txt file (one a line), a table's ``prompt_field``, or else the first sentence
    of each document in ``document_field``."""
    path = Path(str(source)).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"data not found: {path}")
        prompts = _read_lines(path)
    else:
        ds = _load_table(str(source), split)
        name = prompt_field or document_field
        values = [_text(v, str(source), i, name) for i, v in enumerate(_column(ds, name, str(source), "prompt"))]
        prompts = values if prompt_field else [split_sentences(v)[0] for v in values]
    if not prompts:
        raise DataError(f"{source} holds no prompts")
    return prompts


def subset(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset of ``limit`` items (all of them, in order, without a limit)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


# ---------------------------------------------------------------------------------------------- prompts
def check_template(template: str, placeholder: str) -> None:
    """A template must hold ``{placeholder}`` and no other field (literal braces are written ``{{`` ``}}``)."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"bad prompt template {template!r}: {e} (write literal braces as {{{{ and }}}})") from None
    if placeholder not in fields:
        raise ValueError(f"the prompt template {template!r} has no {{{placeholder}}} placeholder")
    if fields - {placeholder}:
        raise ValueError(f"the prompt template has unknown placeholders {sorted(fields - {placeholder})}; only "
                         f"{{{placeholder}}} is filled (write literal braces as {{{{ and }}}})")


def prompt_renderer(template: str, placeholder: str, tokenizer, chat: bool) -> Callable[[str], str]:
    """text → the prompt the model sees: the template filled in, inside the tokenizer's chat template if ``chat``."""
    check_template(template, placeholder)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat was asked for but the tokenizer has no chat template")

    def render(text: str) -> str:
        content = template.format(**{placeholder: text})
        if not chat:
            return content
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    return render


def fit_prompts(
    texts: Sequence[str], render: Callable[[str], str], tokenizer, max_prompt_tokens: int,
    add_special_tokens: bool = False,
) -> tuple[list[str], list[bool]]:
    """Render each text into a prompt of at most ``max_prompt_tokens`` tokens, cutting the text (its start kept)
    where the whole prompt would be longer. Returns the prompts and which texts were cut."""
    def count(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])

    overhead = count(render(""))
    if overhead >= max_prompt_tokens:
        raise ValueError(f"the prompt template alone takes {overhead} tokens, leaving none of max_prompt_tokens="
                         f"{max_prompt_tokens} for the text; raise --max-prompt-tokens or shorten the template")
    prompts, cut = [], []
    for text in texts:
        prompt = render(text)
        n = count(prompt)
        if n <= max_prompt_tokens:
            prompts.append(prompt)
            cut.append(False)
            continue
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        keep = min(len(ids), max_prompt_tokens - overhead)
        while keep > 0:  # decoding then re-encoding can merge tokens differently: shrink until it fits
            prompt = render(tokenizer.decode(ids[:keep], skip_special_tokens=True))
            n = count(prompt)
            if n <= max_prompt_tokens:
                break
            keep -= n - max_prompt_tokens
        if keep <= 0:
            prompt = render("")
        prompts.append(prompt)
        cut.append(True)
    return prompts, cut


def context_length(model) -> int | None:
    """The model's context window from its config, or None where the config does not say."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(getattr(model, "config", None), attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_budget(model, max_prompt_tokens: int | None, max_new_tokens: int) -> int:
    """Tokens a prompt may take so that prompt + continuation fit the model's context (default: all that is left of
    the context, at most 2048)."""
    ctx = context_length(model)
    if max_prompt_tokens is None:
        budget = min(ctx or 2048, 2048 + max_new_tokens) - max_new_tokens
        if budget < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {ctx} tokens")
        return budget
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if ctx is not None and max_prompt_tokens + max_new_tokens > ctx:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} + max_new_tokens={max_new_tokens} exceed the model's "
                         f"context of {ctx} tokens")
    return max_prompt_tokens


# ---------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class RougeSettings:
    """How a ROUGE run prompts, generates, scores and aggregates; stored in the results."""

    template: str | None = None  # default: DEFAULT_SUMMARY_TEMPLATE / DEFAULT_CONTINUATION_TEMPLATE
    chat: bool = False  # wrap the prompt in the tokenizer's chat template
    max_prompt_tokens: int | None = None  # default: the model's context (≤ 2048) less max_new_tokens
    stem: bool = False  # Porter stemming in rouge-score's tokenizer
    limit: int | None = None  # score a seeded random subset of this many items
    seed: int = 0  # subset, bootstrap and generation seed
    n_resamples: int = DEFAULT_RESAMPLES
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(stop=DEFAULT_STOP))

    def to_dict(self) -> dict:
        return {"prompt_template": self.template, "chat": self.chat, "max_prompt_tokens": self.max_prompt_tokens,
                "stem": self.stem, "limit": self.limit, "seed": self.seed, "n_resamples": self.n_resamples,
                "confidence": 0.95, "generation": self.generation.to_dict()}


def _generate_for(model, tokenizer, texts, render, settings: RougeSettings, progress: bool, desc: str):
    gen = settings.generation
    budget = prompt_budget(model, settings.max_prompt_tokens, gen.max_new_tokens)
    prompts, cut = fit_prompts(texts, render, tokenizer, budget, gen.add_special_tokens)
    out = generate(model, tokenizer, prompts, gen, progress=progress, desc=desc)
    return [t[0].strip() for t in out.texts], sum(cut), budget, out.new_tokens


def run_rouge(
    model_spec: str,
    data: str,
    *,
    reference_model: str | None = None,
    document_field: str = "document",
    reference_field: str = "summary",
    prompt_field: str | None = None,
    split: str = "test",
    settings: RougeSettings = RougeSettings(),
    dtype: str = "float32",
    progress: bool = False,
    trust_remote_code: bool | None = None,
) -> Results:
    """Summarisation ROUGE (no ``reference_model``) or fidelity ROUGE of ``model_spec`` against ``reference_model``.
    Data, fields and template are checked before any model is loaded."""
    from pocketlm.models.load import load_model
    from pocketlm.core.provenance import provenance

    start = time.perf_counter()
    fidelity = reference_model is not None
    placeholder = "prompt" if fidelity else "document"
    template = settings.template or (DEFAULT_CONTINUATION_TEMPLATE if fidelity else DEFAULT_SUMMARY_TEMPLATE)
    check_template(template, placeholder)
    settings = replace(settings, template=template,
                       generation=replace(settings.generation, seed=settings.seed, do_sample=False, num_samples=1))
    if fidelity:
        texts = read_prompts(data, prompt_field=prompt_field, document_field=document_field, split=split)
        references: list[Reference] = []
    else:
        texts, references = read_summarization_data(data, document_field=document_field,
                                                     reference_field=reference_field, split=split)
    n_source = len(texts)
    chosen = subset(n_source, settings.limit, settings.seed)
    texts = [texts[i] for i in chosen]

    model, tokenizer = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    predictions, n_cut, budget, new_tokens = _generate_for(
        model, tokenizer, texts, prompt_renderer(template, placeholder, tokenizer, settings.chat), settings,
        progress, "student" if fidelity else "summarising")
    details: dict = {"truncated_prompts": n_cut, "max_prompt_tokens_used": budget, "new_tokens": new_tokens}
    baseline = None
    if fidelity:
        ref_model, ref_tok = load_model(reference_model, dtype=dtype, trust_remote_code=trust_remote_code)
        references, ref_cut, ref_budget, ref_new = _generate_for(
            ref_model, ref_tok, texts, prompt_renderer(template, placeholder, ref_tok, settings.chat), settings,
            progress, "reference model")
        baseline = model_info(reference_model, ref_model, ref_tok)
        details.update(reference_truncated_prompts=ref_cut, reference_max_prompt_tokens_used=ref_budget,
                       reference_new_tokens=ref_new)
        del ref_model
    else:
        references = [references[i] for i in chosen]

    items = score_items(predictions, references, stem=settings.stem)
    flat_refs = [r if isinstance(r, str) else "\x1e".join(r) for r in references]
    details.update(
        bootstrap_aggregator_mid=bootstrap_aggregator_mid(items, seed=settings.seed, n_samples=settings.n_resamples),
        items=[{"index": i, "source": text[:500], "prediction": p, "reference": r,
                **{t: s[t].fmeasure for t in ROUGE_TYPES}}
               for i, text, p, r, s in zip(chosen, texts, predictions, references, items)],
    )
    return Results(
        kind="rouge",
        model=model_info(model_spec, model, tokenizer),
        baseline=baseline,
        data={"source": str(data), "hash": hash_documents(texts), "n": len(texts), "n_source": n_source,
              "references_hash": None if fidelity else hash_documents(flat_refs),
              "fields": {"prompt": prompt_field} if fidelity else {"document": document_field,
                                                                    "reference": reference_field}},
        settings={"task": "fidelity" if fidelity else "summarization", **settings.to_dict(), "dtype": dtype},
        metrics=rouge_metrics(items, seed=settings.seed, n_resamples=settings.n_resamples),
        details=details,
        provenance=provenance(),
        wall_time_s=time.perf_counter() - start,
    )


def format_examples(results: Results, k: int, width: int = 160) -> str:
    """The first ``k`` (prediction, reference) pairs, escaped and trimmed: model output is untrusted text, so every
    non-printable character (newlines, terminal escapes, bidi controls) is shown as its escape sequence."""
    def esc(s) -> str:
        s = s if isinstance(s, str) else " | ".join(s)
        e = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
        return e if len(e) <= width else e[: width - 1] + "…"

    lines = []
    for item in results.details.get("items", [])[:k]:
        lines.append(f"item {item['index']} (source row, from 0): rougeL F1 {item['rougeL']:.3f}")
        lines.append(f"  prediction: {esc(item['prediction'])}")
        lines.append(f"  reference:  {esc(item['reference'])}")
    return "\n".join(lines)
