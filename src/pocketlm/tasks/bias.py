"""Social bias by log-likelihood (`pocketlm.audit.bias`: CrowS-Pairs, StereoSet, BBQ, WinoBias), teacher and
student on the same items, once each: the student's Results carry the paired deltas."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from pocketlm.core.config import StrictModel, registered
from pocketlm.data.suites import SUITES
from pocketlm.tasks.base import (
    NAME_PATTERN, audit_inputs, Context, Entry, register, scoring_version, SetsTask, StageOutput, View,
)


class BiasSuiteConfig(StrictModel):
    """One log-likelihood bias suite (pocketlm.audit.bias), scored for teacher and student on the same items."""

    suite: str  # a name of the suite registry (pocketlm.data.suites.SUITES)
    data: str  # the suite's file or folder (a relative path is under data_root)
    name: Optional[str] = Field(None, pattern=NAME_PATTERN)  # default: the suite's name
    limit: Optional[int] = Field(None, ge=1)  # a seeded random subset of this many items
    batch_size: int = Field(16, ge=1)
    # auto: bf16, then fp32 again for the items whose decision lies within the bf16 error bound (where bf16 is
    # native; else fp32): every decision fp32's (pocketlm.audit.bias)
    precision: Literal["fp32", "bf16", "auto"] = "auto"

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, v: str) -> str:
        return registered(SUITES, v)

    @property
    def entry(self) -> str:
        return self.name or self.suite


class BiasTask(SetsTask):
    name, phase = "bias", "audit"
    section = "audit.bias"
    entry_field = "entry"
    views = (View("bias", group_headlines=(), card_task=("text-generation", "Social bias")),)

    def check(self, ctx: Context) -> None:
        from pocketlm.data.suites import load_suite, sample_items

        cfg = ctx.cfg
        for b, path in self.present(ctx):
            data = sample_items(load_suite(b.suite, path), b.limit, cfg.train.seed)
            ctx.inputs[b.entry] = {"data": data, "hash": data.hash}

    def inputs(self, ctx: Context) -> dict[str, Any]:
        packs_bf16 = any(b.precision != "fp32" for b in self.measured(ctx))
        return {**audit_inputs(ctx, self), "scoring": scoring_version(packs_bf16=packs_bf16)}

    def run(self, ctx: Context) -> StageOutput:
        """Teacher and student on the same items, once each: the student's Results carry the paired deltas, the
        teacher's figures come from its per-item arrays (no second scoring pass)."""
        from pocketlm.audit.bias import BIAS_SUITES, audit_bias
        from pocketlm.audit.bias_core import compute_metrics

        entries = []
        for b in self.measured(ctx):
            data = ctx.inputs[b.entry]["data"]
            student, tok = ctx.model("student")
            teacher = ctx.model("teacher")
            res, run = audit_bias(
                b.suite, data, student, tok, model_spec=ctx.spec("student"), baseline=teacher,
                baseline_spec=ctx.spec("teacher"), batch_size=b.batch_size, precision=b.precision, seed=ctx.seed,
                n_resamples=ctx.cfg.audit.n_resamples, progress=ctx.progress, max_memory=ctx.cfg.max_memory_bytes(),
                settings={"limit": b.limit, "n_items": len(data.items), "n_total": data.n_total})
            res.model["role"] = "student"
            t_metrics, _ = compute_metrics(BIAS_SUITES.get(b.suite).statistics, run.baseline_arrays, run.groups,
                                           seed=ctx.seed, n_resamples=ctx.cfg.audit.n_resamples)
            t_res = dataclasses.replace(res, model={**res.baseline, "role": "teacher"}, baseline=None,
                                        metrics=t_metrics,
                                        details={"items": "with the student's results (baseline arrays)"})
            entries += [Entry("teacher", b.entry, t_res), Entry("student", b.entry, res)]
        return StageOutput(entries)


TASK = register(BiasTask())
