"""`pocketlm size` of each model against the teacher, in the pipeline (``inspect.size``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from pydantic import Field

from pocketlm.core.config import StrictModel
from pocketlm.tasks import plots
from pocketlm.tasks.base import Context, Document, Entry, ReportPart, StageOutput, Task, View, register
from pocketlm.tasks.present import comparison_rows, of_kind, results_by_entry, stage_off


class SizeProbe(StrictModel):
    enabled: bool = False
    context_length: int = Field(2048, ge=1)  # KV-cache and FLOP figures are reported at this context
    batch_size: int = Field(1, ge=1)
    measure_context: Optional[int] = Field(None, ge=1)  # also measure the loaded models at this context


def probe_inputs(ctx: Context, probe: str) -> dict[str, Any]:
    """The key inputs of an inspect probe: its config section and the models."""
    return {"probe": getattr(ctx.cfg.inspect, probe).model_dump(mode="json"), "models": ctx.fingerprints()}


# ---------------------------------------------------------------------------------------------------- its report part
SIZE_HEADLINES = ("n_params", "params_active", "weight_bytes_bf16", "kv_cache_per_token_bf16", "flops_forward",
                  "training_bytes_mixed_total")  # drawn as bars


def size_rows(by_entry: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Size and memory figures (measured parameter counts, then `pocketlm size`'s estimates), one column per model,
    with the student / teacher ratio."""
    rows, roles = [], []
    for kind in ("parameters", "size"):
        entry, by_role = of_kind(by_entry, kind)
        roles += [r for r in by_role if r not in roles]
        for row in comparison_rows(by_role):
            if row["name"].startswith("ratio_"):
                continue
            t, s_ = row["cells"].get("teacher"), row["cells"].get("student")
            ok = t and s_ and isinstance(t["value"], (int, float)) and t["value"] and s_["value"] is not None
            rows.append({**row, "entry": entry, "ratio": s_["value"] / t["value"] if ok else None})
    return rows, roles


def size_part(doc: Document) -> dict[str, Any]:
    """The report's "Size and memory": the table, bars of the headline figures, and whether the stage was off."""
    rows, roles = size_rows(results_by_entry(doc))
    return {"size_rows": rows, "size_roles": roles, "stage_off": stage_off(doc, SizeTask.name),
            "size_plot": plots.metric_bars(
                [(r["name"], {role: (c["value"], None) for role, c in r["cells"].items() if c}) for r in rows
                 if r["name"] in SIZE_HEADLINES], "size and memory (estimates at the configured context)")}


class SizeTask(Task):
    name, phase = "size", "inspect"
    requires = "pocketlm.inspect.size"
    # the report's size and memory table (the parameter counts of every run among it)
    views = (View("size", section=False, analysis=False, summary_rows=0,
                  report_parts=(ReportPart(size_part, "part_size.html.j2", place=10),)),)
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
