"""The HTML report: one self-contained page built from a pipeline's results.json and nothing else.

Gate verdicts first, then training curves, teacher vs student for every metric (bars with 95 % intervals and a
table with the paired deltas), bias per category, toxicity per group, size and memory, deployment (GGUF files and
their llama.cpp speed, when the export stage ran), MoE expert load,
attention heat-maps, samples of what the models wrote, and provenance. Plots are inline PNG ``data:`` URIs; the
page carries no script, and its Content-Security-Policy forbids any. Jinja2 autoescaping is on for every value,
so text a model wrote (or a suite held) is shown as text, never parsed as markup.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml
from markupsafe import Markup

from pocketlm.core.io import write_text_atomic
from pocketlm.core.pipeline_doc import PipelineDocument
from pocketlm.report import plots
from pocketlm.tasks import view

__all__ = ["comparison_rows", "deployment_view", "fmt_ci", "fmt_number", "fmt_unit", "group_names", "headlines",
           "of_kind", "render_report", "report_context", "run_summary", "report_groups", "results_by_entry", "size_rows",
           "write_report", "write_text_atomic"]


def as_dict(doc: PipelineDocument | dict[str, Any]) -> dict[str, Any]:
    """The report and the card read results.json's form; a typed document is written out to it first."""
    return doc.to_dict() if isinstance(doc, PipelineDocument) else doc


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("pocketlm.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_number
    env.filters["ci"] = fmt_ci
    env.filters["unit"] = fmt_unit
    return env


def fmt_number(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:,.0f}" if float(x).is_integer() and abs(x) >= 1000 else f"{x:.4g}"


def fmt_ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"[{fmt_number(ci[0])}, {fmt_number(ci[1])}]"


def results_by_entry(doc: PipelineDocument | dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """entry → role → results (stage order kept)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for st in as_dict(doc)["stages"].values():
        for e in st.get("entries", []):
            out.setdefault(e["entry"], {})[e["role"]] = e["results"]
    return out


def kind_of(by_role: dict[str, dict[str, Any]]) -> str:
    return _ref(by_role)["kind"]


def of_kind(by_entry: dict[str, dict[str, dict[str, Any]]], kind: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The (entry, role → results) of the first entry whose results are of ``kind`` ((None, {}) if none is)."""
    return next(((e, by_role) for e, by_role in by_entry.items() if by_role and kind_of(by_role) == kind), (None, {}))


def _metric_map(res: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(m["name"], m.get("group")): m for m in res["metrics"]}


def _is_plain(name: str) -> bool:
    return not name.startswith(("delta_", "baseline_"))


def comparison_rows(by_role: dict[str, dict[str, Any]], group: str | None = None,
                    names: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a teacher-vs-student table: each plain metric, every model's value and interval, and the student's
    paired delta to the teacher where one was computed."""
    maps = {r: _metric_map(res) for r, res in by_role.items()}
    if names is None:
        names = []
        for res in by_role.values():
            for m in res["metrics"]:
                if m.get("group") == group and _is_plain(m["name"]) and m["name"] not in names:
                    names.append(m["name"])
    rows = []
    for name in names:
        cells = {r: maps[r].get((name, group)) for r in by_role}
        if not any(cells.values()):
            continue
        delta = maps.get("student", {}).get((f"delta_{name}", group))
        sig = bool(delta and delta.get("ci") and delta["ci"][0] is not None
                   and (delta["ci"][0] > 0 or delta["ci"][1] < 0))
        ref = next(c for c in cells.values() if c)
        rows.append({"name": name, "group": group, "cells": cells, "delta": delta, "significant": sig,
                     "higher_is_better": ref.get("higher_is_better"), "unit": ref.get("unit"),
                     "n": ref.get("n")})
    return rows


def _ref(by_role: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return by_role.get("student") or next(iter(by_role.values()))


def group_names(by_role: dict[str, dict[str, Any]], metric: str) -> list[str]:
    return [m["group"] for m in _ref(by_role)["metrics"] if m["name"] == metric and m.get("group") is not None]


def headlines(by_role: dict[str, dict[str, Any]]) -> list[str]:
    """The figures shown per group: the headline statistics its kind's view names (the first plain one for ())."""
    ref = _ref(by_role)
    wanted = view(ref["kind"]).group_headlines
    if wanted is None:
        return []
    plain = [m["name"] for m in ref["metrics"] if m.get("group") is None and _is_plain(m["name"])]
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
    ref = _ref(by_role)
    kind = ref["kind"]
    v = view(kind)
    rows = comparison_rows(by_role)
    bars = plots.metric_bars(
        [(r["name"], {role: (c["value"], c.get("ci")) for role, c in r["cells"].items() if c}) for r in rows],
        f"{entry}: every model on the same items (95 % intervals)")
    groups = []
    maps = {r: _metric_map(res) for r, res in by_role.items()}
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


SIZE_HEADLINES = ("n_params", "params_active", "weight_bytes_bf16", "kv_cache_per_token_bf16", "flops_forward",
                  "training_bytes_mixed_total")


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


def fmt_unit(value: Any, unit: str | None) -> str:
    """Binary units for bytes (MiB = 2^20), k/M/G for counts."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return fmt_number(value)
    if unit == "bytes":
        for size, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.2f} {name}"
        return f"{value:.0f} B"
    for size, name in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.2f} {name} {unit or ''}".rstrip()
    return f"{fmt_number(value)} {unit or ''}".rstrip()


DEPLOY_FIGURES = (("file_bytes", "file size"), ("prompt_tokens_per_s", "prompt tokens/s"),
                  ("decode_tokens_per_s", "decode tokens/s"), ("ttft_s", "time to first token"),
                  ("peak_rss_bytes", "peak memory"))


def _deploy_cell(name: str, value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return ""
    if name.endswith("_bytes"):
        return fmt_unit(value, "bytes")
    return f"{1000 * value:.1f} ms" if name == "ttft_s" else f"{value:,.1f}"


def _headline_quant(student: dict[str, Any], teacher: dict[str, Any]) -> str | None:
    both = [q for q in student["settings"]["quants"] if q in teacher["settings"]["quants"]]
    return "q4_0" if "q4_0" in both else (both[-1] if both else None)


def deployment_view(by_entry: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The export stage's figures for the report and the card: a row per (model, quant type), the student against
    the teacher at q4_0 (or the last quant type both were written at), the perplexity of the models before
    quantisation where a perplexity set was scored; None when the stage did not run."""
    _, by_role = of_kind(by_entry, "deployment")
    if not by_role:
        return None
    rows = []
    for role, res in by_role.items():
        m = {key: v.get("value") for key, v in _metric_map(res).items()}
        for q in res["settings"]["quants"]:
            rows.append({"role": role, "quant": q, "file": res["details"].get("files", {}).get(q),
                         "cells": [_deploy_cell(name, m.get((name, q))) for name, _ in DEPLOY_FIGURES],
                         "speedup": m.get(("decode_speedup", q)), "smaller": m.get(("times_smaller", q))})
    student, teacher = by_role.get("student"), by_role.get("teacher")
    headline = None
    q = _headline_quant(student, teacher) if student and teacher else None
    if q:
        s, t = ({k: v.get("value") for k, v in _metric_map(r).items()} for r in (student, teacher))
        headline = (f"At {q} in llama.cpp the student decodes {s[('decode_speedup', q)]:.2f}× as fast as the "
                    f"teacher ({s[('decode_tokens_per_s', q)]:,.1f} against {t[('decode_tokens_per_s', q)]:,.1f} "
                    f"tokens/s), and its file is {s[('times_smaller', q)]:.2f}× smaller "
                    f"({fmt_unit(s[('file_bytes', q)], 'bytes')} against {fmt_unit(t[('file_bytes', q)], 'bytes')}).")
    perplexity = None
    for entry, ppl in by_entry.items():
        if {"teacher", "student"} <= set(ppl) and ppl["student"]["kind"] == "perplexity":
            v = {r: _metric_map(ppl[r]).get(("token_perplexity", None), {}).get("value") for r in ("teacher",
                                                                                              "student")}
            if None not in v.values():
                perplexity = {"entry": entry, **v}
                break
    ref = student or next(iter(by_role.values()))
    return {"rows": rows, "headline": headline, "perplexity": perplexity, "settings": ref["settings"],
            "data": ref.get("data", {}), "figures": [label for _, label in DEPLOY_FIGURES],
            "teacher_measured": teacher is not None}


def _attention(by_entry: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    maps = []
    for role, res in of_kind(by_entry, "attention")[1].items():
        for h in res.get("details", {}).get("heatmaps", []):
            uri = h.get("png")
            if isinstance(uri, str) and uri.startswith("data:image/png;base64,"):
                maps.append({"role": role, "title": h.get("title", ""), "uri": uri})
    return maps


def report_context(doc: PipelineDocument | dict[str, Any]) -> dict[str, Any]:
    doc = as_dict(doc)
    by_entry = results_by_entry(doc)
    _, distill = of_kind(by_entry, "distill")
    histories = {role: res["details"].get("history", []) for role, res in distill.items()}
    distill_rows = comparison_rows(distill) if distill else []
    moe = plots.expert_load(histories.get("student", []))
    sizes = size_rows(by_entry)
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
        "training_plot": plots.training_curves(histories),
        "distill_rows": distill_rows,
        "sections": [_section(e, by_role) for e, by_role in by_entry.items() if view(kind_of(by_role)).section],
        "size_rows": sizes[0],
        "size_roles": sizes[1],
        "size_plot": plots.metric_bars(
            [(r["name"], {role: (c["value"], None) for role, c in r["cells"].items() if c}) for r in sizes[0]
             if r["name"] in SIZE_HEADLINES], "size and memory (estimates at the configured context)"),
        "deployment": deployment_view(by_entry),
        "moe_plot": moe,
        "attention": _attention(by_entry),
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

