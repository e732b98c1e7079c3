"""The HTML report: one self-contained page built from a pipeline's results.json and nothing else.

Gate verdicts first, then the run, then teacher vs student for every set (bars with 95 % intervals, a table with
the paired deltas, figures per group, samples of what the models wrote) — a section per entry, drawn from the
view of its Results kind — with the parts the views draw themselves (`tasks.base.ReportPart`) before and after it:
today the training curves before, and after it size and memory, deployment (GGUF files and their llama.cpp speed,
when the export stage ran), MoE expert load and attention heat-maps; then provenance. Nothing here names a stage
or a kind: a task with a part of its own needs no edit to this module or to the page's template.

Plots are inline PNG ``data:`` URIs; the page carries no script, and its Content-Security-Policy forbids any.
Jinja2 autoescaping is on for every value and every part, so text a model wrote (or a suite held) is shown as text,
never parsed as markup.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from markupsafe import Markup

from pocketlm.core.io import write_text_atomic
from pocketlm.core.pipeline_doc import PipelineDocument
from pocketlm.tasks import plots, view
from pocketlm.tasks.base import ReportPart, report_parts
from pocketlm.tasks.present import (
    as_dict, comparison_rows, fmt_ci, fmt_number, fmt_unit, is_plain, kind_of, metric_map, of_kind, reference,
    results_by_entry,
)

__all__ = ["as_dict", "comparison_rows", "fmt_ci", "fmt_number", "fmt_unit", "group_names", "headlines", "kind_of",
           "of_kind", "render_report", "report_context", "run_summary", "report_groups", "results_by_entry",
           "write_report", "write_text_atomic"]


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("pocketlm.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_number
    env.filters["ci"] = fmt_ci
    env.filters["unit"] = fmt_unit
    return env


def group_names(by_role: dict[str, dict[str, Any]], metric: str) -> list[str]:
    return [m["group"] for m in reference(by_role)["metrics"] if m["name"] == metric and m.get("group") is not None]


def headlines(by_role: dict[str, dict[str, Any]]) -> list[str]:
    """The figures shown per group: the headline statistics its kind's view names (the first plain one for ())."""
    ref = reference(by_role)
    wanted = view(ref["kind"]).group_headlines
    if wanted is None:
        return []
    plain = [m["name"] for m in ref["metrics"] if m.get("group") is None and is_plain(m["name"])]
    return [h for h in (wanted or tuple(plain[:1])) if group_names(by_role, h)]


def report_groups(by_entry: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[str]]:
    """entry → the groups its results are disaggregated by."""
    out = {}
    for entry, by_role in by_entry.items():
        gs = [g for h in headlines(by_role) for g in group_names(by_role, h)]
        if gs:
            out[entry] = list(dict.fromkeys(gs))
    return out


def _section(entry: str, by_role: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ref = reference(by_role)
    kind = ref["kind"]
    v = view(kind)
    rows = comparison_rows(by_role)
    bars = plots.metric_bars(
        [(r["name"], {role: (c["value"], c.get("ci")) for role, c in r["cells"].items() if c}) for r in rows],
        f"{entry}: every model on the same items (95 % intervals)")
    groups = []
    maps = {r: metric_map(res) for r, res in by_role.items()}
    for h in headlines(by_role):
        gs = group_names(by_role, h)
        series = {r: [((maps[r].get((h, g)) or {}).get("value"), (maps[r].get((h, g)) or {}).get("ci")) for g in gs]
                  for r in by_role}
        groups.append({"metric": h, "plot": plots.group_bars(h, gs, series, f"{entry}: {h} per group"),
                       "rows": [row for g in gs for row in comparison_rows(by_role, g, [h])]})
    section = {"entry": entry, "kind": kind, "plot": bars, "rows": rows, "groups": groups, "roles": list(by_role),
               "data": ref.get("data", {}), "settings": ref.get("settings", {}), "group_label": v.group_label,
               "samples_note": v.samples_note,
               # what the models wrote, for reading (escaped on output like everything else)
               "samples": [x for role, res in by_role.items() for x in (v.samples(role, res) if v.samples else [])]}
    # the kind's own note: template source from its task, rendered with autoescape like the page
    section["note"] = Markup(_env().from_string(v.report_note).render(s=section)) if v.report_note else ""
    return section


def _render_part(part: ReportPart, doc: dict[str, Any]) -> str:
    """A view's own part of the page, rendered with the page's environment (autoescaped); "" when not drawn."""
    ctx = part.context(doc)
    if ctx is None:
        return ""
    env = _env()
    return (env.get_template(part.template) if part.template else env.from_string(part.source)).render(**ctx)


def _parts(doc: dict[str, Any], before: bool) -> Markup:
    """The views' parts before (place < 0) or after the teacher-vs-student sections, each after a blank line."""
    texts = [_render_part(p, doc) for p in report_parts() if (p.place < 0) == before]
    return Markup("".join("\n" + (t + "\n" if t else "") for t in texts))


def report_context(doc: PipelineDocument | dict[str, Any]) -> dict[str, Any]:
    doc = as_dict(doc)
    by_entry = results_by_entry(doc)
    card = doc["config"].get("card", {})
    gates = doc.get("gates", [])
    return {
        "title": card.get("model_name") or f"pocketlm student of {doc['config']['teacher']}",
        "verdict": doc.get("verdict", "no gates"),
        "gates": gates,
        "n_failed": sum(1 for g in gates if not g["passed"]),
        "models": doc["models"],
        "stages": doc["stages"],
        "skipped": doc.get("skipped", {}),
        "parts_before": _parts(doc, before=True),
        "sections": [_section(e, by_role) for e, by_role in by_entry.items() if view(kind_of(by_role)).section],
        "parts_after": _parts(doc, before=False),
        "provenance": doc.get("provenance", {}),
        "config_yaml": yaml.safe_dump(doc["config"], sort_keys=False, allow_unicode=True),
        "wall_time_s": doc.get("wall_time_s"),
    }


def run_summary(doc: PipelineDocument | dict[str, Any]) -> str:
    """`pocketlm run`'s table: each measured set's headline figures (as many as its kind's view says), one column
    per model, and the student − teacher delta."""
    doc = as_dict(doc)
    roles = list(doc["models"])
    lines = [("set", "figure", *roles, "delta (student - teacher) [95% CI]")]
    for entry, by_role in results_by_entry(doc).items():
        for r in comparison_rows(by_role)[:view(kind_of(by_role)).summary_rows]:
            d = r["delta"]
            delta = "" if not d else fmt_number(d["value"]) + (
                f" [{fmt_number(d['ci'][0])}, {fmt_number(d['ci'][1])}]" if d.get("ci") else "")
            lines.append((entry, r["name"], *(fmt_number(r["cells"][x]["value"]) if r["cells"].get(x) else ""
                                              for x in roles), delta))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def render_report(doc: PipelineDocument | dict[str, Any]) -> str:
    return _env().get_template("report.html.j2").render(**report_context(doc))


def write_report(doc: PipelineDocument | dict[str, Any], path: str | os.PathLike) -> Path:
    return write_text_atomic(path, render_report(doc))

