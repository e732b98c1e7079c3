"""Every layer's attention on one text (eager path), per model: entropy per layer, heat-maps of chosen layers
(``inspect.attention``)."""
from __future__ import annotations

import time
from typing import Any, Optional

from pydantic import Field

from pocketlm.core.config import StrictModel
from pocketlm.core.io import figure_data_uri
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.tasks.base import Context, Document, Entry, ReportPart, StageOutput, Task, View, register
from pocketlm.tasks.present import of_kind, results_by_entry, stage_off
from pocketlm.tasks.size import probe_inputs


class AttentionProbe(StrictModel):
    enabled: bool = False
    text: str = "The teacher writes and the student reads, then the student writes too."
    layers: Optional[list[int]] = None  # null: first and last; negative indices count from the end
    max_heads: int = Field(4, ge=1)  # heat-maps per layer


def heatmap_uris(maps, layers: list[int], max_heads: int, label: str) -> list[dict[str, str]]:
    from pocketlm.inspect.heatmap import layer_figure

    out = []
    for layer in layers:
        pattern, heads = maps.patterns[layer][:max_heads], maps.head_ids[layer][:max_heads]
        title = f"{label} · layer {layer}"
        out.append({"title": title, "layer": layer,
                    "png": figure_data_uri(layer_figure(pattern, maps.tokens, title=title, head_ids=heads))})
    return out


def attention_part(doc: Document) -> dict[str, Any]:
    """The report's "Attention": every model's heat-maps (only PNG data URIs are shown), whether the stage was off."""
    maps = []
    for role, res in of_kind(results_by_entry(doc), "attention")[1].items():
        for h in res.get("details", {}).get("heatmaps", []):
            uri = h.get("png")
            if isinstance(uri, str) and uri.startswith("data:image/png;base64,"):
                maps.append({"role": role, "title": h.get("title", ""), "uri": uri})
    return {"attention": maps, "stage_off": stage_off(doc, AttentionTask.name)}


class AttentionTask(Task):
    name, phase = "attention", "inspect"
    requires = "pocketlm.inspect.attention"
    views = (View("attention", section=False, analysis=False, summary_rows=0,  # the report's heat-maps
                  report_parts=(ReportPart(attention_part, "part_attention.html.j2", place=40),)),)
    fixed_entries = ("attention",)

    def enabled(self, cfg: Any) -> bool:
        return cfg.inspect.attention.enabled

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return probe_inputs(ctx, "attention")

    def run(self, ctx: Context) -> StageOutput:
        from pocketlm.inspect.attention import capture_attention, mean_entropy

        probe = ctx.cfg.inspect.attention
        entries = []
        for role in ctx.cfg.roles():
            t0 = time.perf_counter()
            model, tok = ctx.model(role)
            maps = capture_attention(model, tok, probe.text, spec=ctx.spec(role))
            n = maps.num_layers
            wanted = probe.layers if probe.layers is not None else [0, -1]
            bad = [i for i in wanted if not -n <= i < n]
            if bad:
                raise ValueError(f"inspect.attention.layers: {bad} out of range for the {role} ({n} layers)")
            layers = list(dict.fromkeys(i % n for i in wanted))
            entropy = maps.entropy()
            metrics = [Metric("attention_entropy", mean_entropy(entropy), n=sum(int(e.numel()) for e in entropy),
                              unit="nats")]
            metrics += [Metric("attention_entropy", float(e.mean()), n=int(e.numel()), unit="nats",
                               group=f"layer {i}") for i, e in enumerate(entropy)]
            entries.append(Entry(role, "attention", Results(
                kind="attention", model=ctx.info(role),
                data={"source": "inspect.attention.text", "n": len(maps.tokens)},
                settings=probe.model_dump(mode="json") | {"layers_shown": layers}, metrics=metrics,
                details={"tokens": maps.tokens, "entropy": [e.tolist() for e in entropy],
                         "heatmaps": heatmap_uris(maps, layers, probe.max_heads, f"{role}")},
                provenance=provenance(), wall_time_s=time.perf_counter() - t0)))
        return StageOutput(entries)


TASK = register(AttentionTask())
