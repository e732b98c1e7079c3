"""Perplexity (lm-eval's rolling windows) of every model on each configured set of documents (by default the
documents held out of the distillation data), with the paired delta of every other model to the teacher."""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Literal, Optional

import numpy as np
from pydantic import Field

from pocketlm.core.config import StrictModel
from pocketlm.core.integrity import RecordError
from pocketlm.core.results import Metric, Results
from pocketlm.tasks.base import (
    NAME_PATTERN, against_teacher, Context, register, role_entries, scoring_version, SetsTask, StageOutput, View,
)


class PerplexitySet(StrictModel):
    """Perplexity (lm-eval's rolling windows) of every model on one set of documents."""

    name: str = Field("heldout", pattern=NAME_PATTERN)
    data: Optional[str] = None  # null: the documents held out of the distillation data
    field: str = "text"
    split: str = "test"
    txt_split: Literal["blank_lines", "wikitext_headings", "lines"] = "blank_lines"
    max_documents: Optional[int] = Field(None, ge=1)
    max_length: Optional[int] = Field(None, ge=1)  # null: the model's context
    stride: Optional[int] = Field(None, ge=1)
    detokenize: Optional[Literal["wikitext"]] = None


def _per_doc_statistic(to_figure: Callable[[np.ndarray], np.ndarray]):
    def statistic(nll: np.ndarray, count: np.ndarray, axis: int = -1) -> np.ndarray:
        return to_figure(np.sum(nll, axis=axis) / np.sum(count, axis=axis))

    return statistic


_PPL_FIGURES = (("token_perplexity", "tokens", np.exp), ("word_perplexity", "words", np.exp),
                ("byte_perplexity", "bytes", np.exp), ("bits_per_byte", "bytes", lambda v: v / math.log(2)))


def perplexity_deltas(model: Results, baseline: Results, *, seed: int = 0, n_resamples: int = 1000) -> list[Metric]:
    """``delta_<figure>`` = model − baseline for each perplexity figure, with a paired bootstrap interval over
    documents (both models scored the same documents; each resample recomputes both ratios of sums)."""
    from pocketlm.core.stats import paired_statistic_delta_ci

    a, b = model.details["per_document"], baseline.details["per_document"]
    if len(a) != len(b) or [d["tokens"] for d in a] != [d["tokens"] for d in b]:
        return []  # not the same documents (or not tokenized alike): no paired delta
    out = []
    for name, unit, to_figure in _PPL_FIGURES:
        counts = np.array([d[unit] for d in a], dtype=np.float64)
        if counts.sum() == 0:
            continue
        nll_a = -np.array([d["loglikelihood"] for d in a])
        nll_b = -np.array([d["loglikelihood"] for d in b])
        stat = _per_doc_statistic(to_figure)
        value = float(stat(nll_a, counts) - stat(nll_b, counts))
        ci = paired_statistic_delta_ci(stat, [nll_a, counts], [nll_b, counts], seed=seed, n_resamples=n_resamples)
        out.append(Metric(f"delta_{name}", value, n=len(a), ci=ci, higher_is_better=False))
    return out


def heldout(ctx: Context) -> tuple[list[str], str]:
    """The documents the distill task held out (its ``heldout_file``)."""
    path = ctx.out / ctx.fact("heldout_file")
    try:
        docs = [json.loads(line)["text"] for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise RecordError(f"{path}, the held-out documents this run recorded, is damaged "
                          f"({type(e).__name__}: {str(e)[:80]}); rerun with --force distill to write it again") from None
    return docs, "held-out documents of the distillation data"


class PerplexityTask(SetsTask):
    name, phase = "perplexity", "evaluate"
    section = "eval.perplexity"
    views = (View("perplexity", card_task=("text-generation", "Language modelling")),)

    def check(self, ctx: Context) -> None:
        from pocketlm.data.text import hash_documents, read_documents

        for p, path in self.present(ctx):
            docs = read_documents(path, field=p.field, split=p.split, max_documents=p.max_documents,
                                  txt_split=p.txt_split)
            ctx.inputs[p.name] = {"docs": docs, "source": str(path), "hash": hash_documents(docs)}

    def inputs(self, ctx: Context) -> dict[str, Any]:
        sets = []
        for p in self.measured(ctx):
            data = ctx.fact("heldout_hash") if p.data is None else ctx.inputs[p.name]["hash"]
            sets.append({**p.model_dump(mode="json"), "data_hash": data})
        return {"sets": sets, "batch_size": ctx.cfg.eval.batch_size, "precision": ctx.cfg.eval.precision,
                "models": ctx.fingerprints(), "seed": ctx.seed, "scoring": scoring_version()}

    def run(self, ctx: Context) -> StageOutput:
        from pocketlm.eval.perplexity import perplexity_results

        entries = []
        for p in self.measured(ctx):
            docs, source = heldout(ctx) if p.data is None else (ctx.inputs[p.name]["docs"],
                                                                ctx.inputs[p.name]["source"])
            by_role = {}
            for role in ctx.cfg.roles():
                model, tok = ctx.model(role)
                res = perplexity_results(
                    model, tok, docs, model_spec=ctx.spec(role), data_source=source, max_length=p.max_length,
                    stride=p.stride, detokenize=p.detokenize, batch_size=ctx.cfg.eval.batch_size,
                    precision=ctx.cfg.eval.precision, seed=ctx.seed, progress=ctx.progress,
                    max_memory=ctx.cfg.max_memory_bytes())
                res.model["role"] = role
                by_role[role] = res
            against_teacher(by_role, lambda res, base: perplexity_deltas(res, base, seed=ctx.seed))
            entries += role_entries(p.name, by_role)
        return StageOutput(entries)


TASK = register(PerplexityTask())
