"""The student (and with ``export.teacher`` the teacher) as GGUF files in ``deploy/``, one per quant type, each
timed in llama.cpp (off by default)."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pydantic import Field, field_validator

from pocketlm.core.config import StrictModel
from pocketlm.tasks.base import CardPart, Context, Document, Entry, ReportPart, StageOutput, Task, View, register
from pocketlm.tasks.present import fmt_number, fmt_unit, md, md_table, metric_map, of_kind, results_by_entry


class ExportConfig(StrictModel):
    """The `export` stage (off by default): the student, and the teacher with `teacher: true`, written as GGUF files
    in `<output_dir>/deploy` at each quant type and timed in llama.cpp, batch 1 (`pocketlm.eval.speed`: prompt and
    decode tokens/s, time to first token, peak memory; the median of `repeats` passes after `warmup`)."""

    enabled: bool = False
    quants: list[str] = ["f16", "q8_0", "q4_0"]  # `pocketlm export --format gguf --quant` names
    teacher: bool = False  # also export and time the teacher: the student's speed-up and size ratio to it
    threads: int = Field(2, ge=1)
    new_tokens: int = Field(32, ge=2)  # greedy tokens decoded per prompt
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    max_prompt_tokens: int = Field(128, ge=1)

    @field_validator("quants")
    @classmethod
    def _writable(cls, v: list[str]) -> list[str]:
        from pocketlm.models.gguf_export import K_QUANTS, QUANT_NAMES

        names = [q.lower() for q in v]
        if not names:
            raise ValueError("name at least one quant type, or set export.enabled: false")
        for q in names:
            if q in K_QUANTS:
                raise ValueError(f"{q!r}: the gguf package cannot write K-quants; export f16 and quantise that "
                                 "file with llama.cpp's llama-quantize")
            if q not in QUANT_NAMES:
                raise ValueError(f"unknown quant type {q!r}; valid: {', '.join(QUANT_NAMES)}")
        twice = sorted({q for q in names if names.count(q) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named more than once")
        return names


# ---------------------------------------------------------------------------------------------------- its report and card parts
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


def _headline(student: dict[str, Any], teacher: dict[str, Any]) -> str | None:
    q = _headline_quant(student, teacher)
    if not q:
        return None
    s, t = ({k: v.get("value") for k, v in metric_map(r).items()} for r in (student, teacher))
    return (f"At {q} in llama.cpp the student decodes {s[('decode_speedup', q)]:.2f}× as fast as the "
            f"teacher ({s[('decode_tokens_per_s', q)]:,.1f} against {t[('decode_tokens_per_s', q)]:,.1f} "
            f"tokens/s), and its file is {s[('times_smaller', q)]:.2f}× smaller "
            f"({fmt_unit(s[('file_bytes', q)], 'bytes')} against {fmt_unit(t[('file_bytes', q)], 'bytes')}).")


def _perplexity(by_entry: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The first perplexity set both models were scored on: its token perplexity of each (before quantisation)."""
    for entry, ppl in by_entry.items():
        if {"teacher", "student"} <= set(ppl) and ppl["student"]["kind"] == "perplexity":
            v = {r: metric_map(ppl[r]).get(("token_perplexity", None), {}).get("value") for r in ("teacher",
                                                                                             "student")}
            if None not in v.values():
                return {"entry": entry, **v}
    return None


def deployment_view(doc: Document) -> dict[str, Any] | None:
    """The export stage's figures for the report and the card: a row per (model, quant type), the student against
    the teacher at q4_0 (or the last quant type both were written at), the perplexity of the models before
    quantisation where a perplexity set was scored; None when the stage did not run."""
    by_entry = results_by_entry(doc)
    _, by_role = of_kind(by_entry, "deployment")
    if not by_role:
        return None
    rows = []
    for role, res in by_role.items():
        m = {key: v.get("value") for key, v in metric_map(res).items()}
        for q in res["settings"]["quants"]:
            rows.append({"role": role, "quant": q, "file": res["details"].get("files", {}).get(q),
                         "cells": [_deploy_cell(name, m.get((name, q))) for name, _ in DEPLOY_FIGURES],
                         "speedup": m.get(("decode_speedup", q)), "smaller": m.get(("times_smaller", q))})
    student, teacher = by_role.get("student"), by_role.get("teacher")
    ref = student or next(iter(by_role.values()))
    return {"rows": rows, "headline": _headline(student, teacher) if student and teacher else None,
            "perplexity": _perplexity(by_entry), "settings": ref["settings"], "data": ref.get("data", {}),
            "figures": [label for _, label in DEPLOY_FIGURES], "teacher_measured": teacher is not None}


def deployment_part(doc: Document) -> dict[str, Any] | None:
    """The report's "Deployment" (None when the export stage did not run)."""
    v = deployment_view(doc)
    return None if v is None else {"deployment": v}


def deployment_card(doc: Document) -> list[str]:
    """The card's "Deployment": the GGUF files and their llama.cpp speed (nothing when the export stage was off)."""
    view = deployment_view(doc)
    if view is None:
        return []
    st = view["settings"]
    L = ["", "## Deployment", ""]
    if view["headline"]:
        L += [f"**{md(view['headline'])}**", ""]
    if view["perplexity"]:
        p = view["perplexity"]
        L += [f"Perplexity before quantisation ({md(p['entry'])}, token perplexity): teacher "
              f"{fmt_number(p['teacher'])}, student {fmt_number(p['student'])}.", ""]
    L += md_table(["model", "quant", *view["figures"], "decode × teacher", "× smaller", "file"],
                  [[md(r["role"]), md(r["quant"]), *[md(c) for c in r["cells"]],
                    "" if r["speedup"] is None else f"{r['speedup']:.2f}×",
                    "" if r["smaller"] is None else f"{r['smaller']:.2f}×", f"`{md(r['file'])}`"]
                   for r in view["rows"]])
    L += ["", f"GGUF files written by pocketlm and run in llama.cpp (llama-cpp-python "
          f"{md(st.get('versions', {}).get('llama_cpp_python', ''))}): batch 1, {st.get('threads')} threads, greedy "
          f"decoding of {st.get('new_tokens')} tokens after each of {view['data'].get('n')} prompts; the median of "
          f"{st.get('repeats')} timed passes. Peak memory is the resident high-water mark of the process that ran the "
          "file." + ("" if view["teacher_measured"] else " The teacher was not exported (`export.teacher: false`).")]
    return L


class ExportTask(Task):
    name, phase = "export", "deploy"
    requires = "llama_cpp"
    # the report's and the card's deployment section; not an evaluation set of the model-index
    views = (View("deployment", section=False, evaluation_data=False, analysis=False,
                  report_parts=(ReportPart(deployment_part, "part_deployment.html.j2", place=20),),
                  card_parts=(CardPart(deployment_card),)),)
    fixed_entries = ("deployment",)

    @property
    def switch(self) -> str:
        return "export.enabled"

    def enabled(self, cfg: Any) -> bool:
        return cfg.export.enabled

    def scopes(self, cfg: Any) -> list[str]:
        return list(self.fixed_entries) if cfg.export.enabled else []

    def inputs(self, ctx: Context) -> dict[str, Any]:
        from importlib.metadata import version

        from pocketlm.eval.speed import PROMPTS

        e = ctx.cfg.export
        return {"export": e.model_dump(mode="json"), "models": ctx.fingerprints(["teacher", "student"] if e.teacher
                                                                               else ["student"]),
                "prompts": hashlib.sha256(json.dumps(PROMPTS).encode()).hexdigest()[:16],
                "llama_cpp_python": version("llama-cpp-python")}

    def run(self, ctx: Context) -> StageOutput:
        """Each model at each quant type, timed in llama.cpp by `eval.deploy.gguf_row` (the clock of
        benchmarks/deploy_speed.py); the student's Results carry its speed-up and size ratio to the teacher at each
        quant type both were written at."""
        from pocketlm.core.outdir import subfolder
        from pocketlm.eval.deploy import deployment_results, gguf_row
        from pocketlm.eval.speed import SpeedSettings, prompt_ids

        e = ctx.cfg.export
        settings = SpeedSettings(threads=e.threads, new_tokens=e.new_tokens, repeats=e.repeats, warmup=e.warmup,
                                 max_prompt_tokens=e.max_prompt_tokens)
        folder = subfolder(ctx.out / "deploy", kind="deploy")
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        for role in (["teacher"] if e.teacher else []) + ["student"]:
            model, tok = ctx.model(role)
            prompts = prompt_ids(tok, settings, getattr(model.config, "max_position_embeddings", None))
            rows[role] = {q: gguf_row(model, tok, folder / f"{role}-{q}", q, prompts, settings) for q in e.quants}
        entries = []
        for role, by_quant in rows.items():
            base = (ctx.info("teacher"), rows["teacher"]) if role == "student" and "teacher" in rows else None
            res = deployment_results(by_quant, ctx.info(role), settings, baseline=base,
                                     files={q: ctx.rel(r["file"]) for q, r in by_quant.items()})
            entries.append(Entry(role, "deployment", res))
        return StageOutput(entries, {"deploy_dir": ctx.rel(folder)})


TASK = register(ExportTask())
