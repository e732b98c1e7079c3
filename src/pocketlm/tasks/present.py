"""What the views present with: the pipeline document read by entry and by Results kind, teacher-vs-student rows,
number and unit formats, and Markdown that no text can break.

Views (`tasks.base.View`) and their report and card parts read the document in results.json's form, the form the
report and the card read; these helpers sit with the tasks so that a task's own part can use them, and the report
and the card use the same ones.
"""
from __future__ import annotations

import math
from typing import Any

from pocketlm.core.pipeline_doc import PipelineDocument

__all__ = ["as_dict", "comparison_rows", "fmt_ci", "fmt_number", "fmt_unit", "kind_of", "md", "md_table", "metric_map",
           "of_kind", "reference", "results_by_entry", "stage_off"]


def as_dict(doc: PipelineDocument | dict[str, Any]) -> dict[str, Any]:
    """The report and the card read results.json's form; a typed document is written out to it first."""
    return doc.to_dict() if isinstance(doc, PipelineDocument) else doc


def results_by_entry(doc: PipelineDocument | dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """entry → role → results (stage order kept)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for st in as_dict(doc)["stages"].values():
        for e in st.get("entries", []):
            out.setdefault(e["entry"], {})[e["role"]] = e["results"]
    return out


def reference(by_role: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results an entry is described by: the student's, else the first model's."""
    return by_role.get("student") or next(iter(by_role.values()))


def kind_of(by_role: dict[str, dict[str, Any]]) -> str:
    return reference(by_role)["kind"]


def of_kind(by_entry: dict[str, dict[str, dict[str, Any]]], kind: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The (entry, role → results) of the first entry whose results are of ``kind`` ((None, {}) if none is)."""
    return next(((e, by_role) for e, by_role in by_entry.items() if by_role and kind_of(by_role) == kind), (None, {}))


def stage_off(doc: dict[str, Any], stage: str) -> bool:
    """Whether a task's stage was not part of the run (absent from the document, or off)."""
    return stage not in doc["stages"] or doc["stages"][stage]["status"] == "off"


def metric_map(res: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(m["name"], m.get("group")): m for m in res["metrics"]}


def is_plain(name: str) -> bool:
    return not name.startswith(("delta_", "baseline_"))


def comparison_rows(by_role: dict[str, dict[str, Any]], group: str | None = None,
                    names: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a teacher-vs-student table: each plain metric, every model's value and interval, and the student's
    paired delta to the teacher where one was computed."""
    maps = {r: metric_map(res) for r, res in by_role.items()}
    if names is None:
        names = []
        for res in by_role.values():
            for m in res["metrics"]:
                if m.get("group") == group and is_plain(m["name"]) and m["name"] not in names:
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


# ---------------------------------------------------------------------------------------------------- formats
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


# ---------------------------------------------------------------------------------------------------- Markdown
def md(text: Any) -> str:
    """Text safe inside a Markdown table cell or line: no HTML, no cell breaks, one line."""
    s = str(text)
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("`", "'")):
        s = s.replace(a, b)
    return " ".join(s.split())


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines (cells already made safe with :func:`md`)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
