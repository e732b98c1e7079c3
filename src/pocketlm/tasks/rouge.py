"""ROUGE of generated summaries (task summarization, every model against the references, with the paired delta to
the teacher) or of the student's continuations against the teacher's (task fidelity)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from pocketlm.core.config import StrictModel
from pocketlm.core.results import Metric, Results
from pocketlm.tasks.base import (
    NAME_PATTERN, against_teacher, Context, register, role_entries, SetsTask, StageOutput, View,
)


class RougeSet(StrictModel):
    """ROUGE of generated summaries (task summarization) or of the student's continuations against the
    teacher's (task fidelity)."""

    name: str = Field(..., pattern=NAME_PATTERN)
    data: str
    task: Literal["summarization", "fidelity"] = "summarization"
    document_field: str = "document"
    reference_field: str = "summary"
    prompt_field: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    chat: bool = False
    stem: bool = False
    template: Optional[str] = None


def rouge_deltas(model: Results, baseline: Results, *, seed: int = 0) -> list[Metric]:
    """``delta_<rouge type>`` = model − baseline mean F1 on the same items, paired bootstrap interval."""
    from pocketlm.core.stats import paired_delta_ci
    from pocketlm.eval.rouge import ROUGE_TYPES

    a, b = model.details["items"], baseline.details["items"]
    if [x["index"] for x in a] != [x["index"] for x in b]:
        return []
    out = []
    for t in ROUGE_TYPES:
        fa, fb = np.array([x[t] for x in a]), np.array([x[t] for x in b])
        out.append(Metric(f"delta_{t}", float(np.mean(fa - fb)), n=len(a), ci=paired_delta_ci(fa, fb, seed=seed),
                          higher_is_better=True))
    return out


def _samples(role: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": role, "label": f"rougeL {x.get('rougeL', 0):.3f}", "prompt": x.get("source", ""),
             "text": x.get("prediction", "")} for x in res.get("details", {}).get("items", [])[:3]]


class RougeTask(SetsTask):
    name, phase = "rouge", "evaluate"
    section = "eval.rouge"
    views = (View("rouge", samples=_samples, card_task=("summarization", "Summarization")),)

    def check(self, ctx: Context) -> None:
        from pocketlm.data.text import hash_documents
        from pocketlm.eval.rouge import read_prompts, read_summarization_data

        for r, path in self.present(ctx):
            if r.task == "fidelity":
                texts = read_prompts(str(path), prompt_field=r.prompt_field, document_field=r.document_field,
                                     split=r.split)
            else:
                texts, refs = read_summarization_data(str(path), document_field=r.document_field,
                                                      reference_field=r.reference_field, split=r.split)
                texts = texts + [json.dumps(x) for x in refs]
            ctx.inputs[r.name] = {"source": str(path), "hash": hash_documents(texts)}

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return {"sets": [{**r.model_dump(mode="json"), "data": ctx.inputs[r.name]["hash"]}
                         for r in self.measured(ctx)],
                "models": ctx.fingerprints(), "seed": ctx.seed, "teacher_dtype": ctx.cfg.teacher_dtype}

    def run(self, ctx: Context) -> StageOutput:
        from pocketlm.eval.rouge import RougeSettings, run_rouge

        entries = []
        for r in self.measured(ctx):
            base = RougeSettings()
            settings = RougeSettings(template=r.template, chat=r.chat, stem=r.stem, limit=r.limit, seed=ctx.seed,
                                     generation=dataclasses.replace(base.generation, max_new_tokens=r.max_new_tokens,
                                                                    batch_size=ctx.cfg.eval.batch_size))
            kw = dict(document_field=r.document_field, reference_field=r.reference_field, prompt_field=r.prompt_field,
                      split=r.split, settings=settings, progress=ctx.progress)
            path = ctx.inputs[r.name]["source"]
            by_role: dict[str, Results] = {}
            for role in ctx.cfg.roles():
                if r.task == "fidelity" and role == "teacher":
                    continue  # the teacher is the reference
                dtype = ctx.cfg.teacher_dtype if role == "teacher" else "float32"
                ref = ctx.spec("teacher") if r.task == "fidelity" else None
                res = run_rouge(ctx.spec(role), path, reference_model=ref, dtype=dtype, **kw)
                res.model["role"] = role
                by_role[role] = res
            if r.task == "summarization":
                against_teacher(by_role, lambda res, base: rouge_deltas(res, base, seed=ctx.seed))
            entries += role_entries(r.name, by_role)
        return StageOutput(entries)


TASK = register(RougeTask())
