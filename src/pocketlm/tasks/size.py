"""`pocketlm size` of each model against the teacher, in the pipeline (``inspect.size``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from pydantic import Field

from pocketlm.core.config import StrictModel
from pocketlm.tasks.base import Context, Entry, StageOutput, Task, View, register


class SizeProbe(StrictModel):
    enabled: bool = False
    context_length: int = Field(2048, ge=1)  # KV-cache and FLOP figures are reported at this context
    batch_size: int = Field(1, ge=1)
    measure_context: Optional[int] = Field(None, ge=1)  # also measure the loaded models at this context


def probe_inputs(ctx: Context, probe: str) -> dict[str, Any]:
    """The key inputs of an inspect probe: its config section and the models."""
    return {"probe": getattr(ctx.cfg.inspect, probe).model_dump(mode="json"), "models": ctx.fingerprints()}


class SizeTask(Task):
    name, phase = "size", "inspect"
    requires = "pocketlm.inspect.size"
    views = (View("size", section=False, analysis=False, summary_rows=0),)  # the report's size and memory table
    fixed_entries = ("size",)

    def enabled(self, cfg: Any) -> bool:
        return cfg.inspect.size.enabled

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return probe_inputs(ctx, "size")

    def run(self, ctx: Context) -> StageOutput:
        """Each model against the teacher (estimates from the configs; measured figures too with measure_context).
        The teacher's own entry holds the baseline figures under their plain names."""
        from pocketlm.inspect.size import size_results

        probe = ctx.cfg.inspect.size
        entries = []
        for role in ctx.cfg.roles():
            if role == "teacher":
                continue
            res = size_results(ctx.spec(role), baseline=ctx.spec("teacher"), context=probe.context_length,
                               batch=probe.batch_size, measure_context=probe.measure_context)
            res.model["role"] = role
            entries.append(Entry(role, "size", res))
        if entries:
            ref = entries[0].results
            teacher = [dataclasses.replace(m, name=m.name[len("baseline_"):]) for m in ref.metrics
                       if m.name.startswith("baseline_")]
            entries.insert(0, Entry("teacher", "size", dataclasses.replace(
                ref, model={**(ref.baseline or {}), "role": "teacher"}, baseline=None, metrics=teacher,
                details={"model": ref.details.get("baseline")})))
        return StageOutput(entries)


TASK = register(SizeTask())
