"""Counterfactual probes (``audit.probes``, `pocketlm.audit.probes`): templates filled with each group's terms,
scored by teacher and student on the same fillings with the same per-item seeds; groups compared by paired
permutation tests (Holm-corrected), the student's figures with paired deltas to the teacher's.

`pocketlm audit probes` calls the same function, `pocketlm.audit.probes.run_probes`: here with the student as the
model and the teacher as its baseline, so both are scored once. The teacher's Results are its figures from that run
(the ``baseline_`` figures, computed from its own per-template values exactly as its own run would); the pair tests
and their Holm correction are the student's.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional

from pydantic import Field

from pocketlm.core.results import Results
from pocketlm.tasks.base import NAME_PATTERN, Context, Entry, SetsTask, StageOutput, View, register
from pocketlm.tasks.scorer_check import SampledScoring, scorer_identity

PREFIX = "baseline_"


class ProbesConfig(SampledScoring):
    """One probe file (`pocketlm.audit.probes` format) scored by teacher and student."""

    data: Optional[str] = None  # a probe YAML; null: the shipped examples (gender, religion, nationality, age)
    name: str = Field("probes", pattern=NAME_PATTERN)
    sets: list[str] = []  # only these sets of the file; []: all
    samples: int = Field(5, ge=0)  # continuations per filling for toxicity and sentiment (0: log-likelihood only)


def teacher_results(student: Results) -> Results:
    """The teacher's Results from the student's run against it: its ``baseline_`` figures under their plain names."""
    metrics = [dataclasses.replace(m, name=m.name[len(PREFIX):]) for m in student.metrics
               if m.name.startswith(PREFIX)]
    sets = {name: {"templates": d["templates"]} for name, d in student.details["sets"].items()}
    return dataclasses.replace(
        student, model={**(student.baseline or {}), "role": "teacher"}, baseline=None, metrics=metrics,
        details={"sets": sets, "generations_file": student.details.get("generations_file"),
                 "pair_tests": "run on the student's figures (in its results); these are the teacher's figures "
                               "from the same run, as its baseline"})


class ProbesTask(SetsTask):
    name, phase = "probes", "audit"
    requires = "pocketlm.audit.probes"
    section = "audit.probes"
    views = (View("probes", group_headlines=("loglik", "loglik_diff", "toxicity", "toxicity_diff", "sentiment",
                                             "sentiment_diff"),
                  group_label="set/group", summary_rows=0),)

    def check(self, ctx: Context) -> None:
        """Each probe file loaded and checked (its sets named, the scorer built), before any model work."""
        from pocketlm.audit.probes import load_probes, shipped_probes
        from pocketlm.audit.toxicity import build_scorer

        for i, p in enumerate(self.sets(ctx.cfg)):
            path = shipped_probes() if p.data is None else ctx.cfg.data_path(p.data)
            if not path.exists():
                ctx.missing(p.name, f"{self.section}.{i}.data", path)
                continue
            load_probes(path, p.sets)
            if p.samples:
                build_scorer(p.scorer, label=p.toxic_label)
            ctx.inputs[p.name] = {"path": path, "hash": hashlib.sha256(path.read_bytes()).hexdigest()}

    def inputs(self, ctx: Context) -> dict[str, Any]:
        """Each probe set with its file's hash and its scorer's identity (a replaced hf: classifier is run again),
        the models, the seed and the bootstrap's resamples."""
        return {"probes": [{**p.model_dump(mode="json"), "data": ctx.inputs[p.name]["hash"],
                            "scorer_identity": scorer_identity(p.scorer)} for p in self.measured(ctx)],
                "models": ctx.fingerprints(["teacher", "student"]), "seed": ctx.seed,
                "n_resamples": ctx.cfg.audit.n_resamples}

    def run(self, ctx: Context) -> StageOutput:
        """The student against the teacher, once: the student's Results carry the paired deltas."""
        from pocketlm.audit.probes import run_probes

        entries = []
        for p in self.measured(ctx):
            out = ctx.out / "audit" / p.name
            if p.samples:
                out.mkdir(parents=True, exist_ok=True)
            audit = run_probes(
                ctx.spec("student"), baseline_spec=ctx.spec("teacher"), probes=ctx.inputs[p.name]["path"],
                sets=p.sets, samples=p.samples, seed=ctx.seed, max_new_tokens=p.max_new_tokens, top_p=p.top_p,
                temperature=p.temperature, batch_size=p.batch_size, scorer=p.scorer, toxic_label=p.toxic_label,
                out=out, progress=ctx.progress, trust_remote_code=(ctx.cfg.trust_remote_code or None),
                n_resamples=ctx.cfg.audit.n_resamples)
            student = audit.results
            student.model["role"] = "student"
            if p.samples:
                student.details["generations_file"] = ctx.rel(out / "generations.jsonl")
            entries += [Entry("teacher", p.name, teacher_results(student)), Entry("student", p.name, student)]
        return StageOutput(entries)


TASK = register(ProbesTask())
