"""The model card: ``README.md`` in the student's folder, in the Hugging Face layout, filled from results.json.

YAML metadata (license, base_model, tags, datasets, ``model-index`` with the evaluation results in the Hub's
schema) written with ``yaml.safe_dump``, then the sections of Mitchell et al. (2019), "Model Cards for Model
Reporting": model details, intended use, factors, metrics, evaluation data, training data, quantitative analyses
(disaggregated by group), ethical considerations, caveats and recommendations. What only the person releasing the
model can say comes from the config's ``card`` section; where it is missing the card says so plainly.
Data-derived text in tables is escaped (``|``, ``<``, ``>``, ``&``, newlines), so no cell can break the table or
become markup. After the release gates come the sections the views of the Results kinds write themselves
(`tasks.base.CardPart`: the deployment figures when the export stage ran), so a task with a section of its own
needs no edit here.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from pocketlm.core.io import write_text_atomic
from pocketlm.core.pipeline_doc import PipelineDocument
from pocketlm.report.html import group_names, headlines, report_groups
from pocketlm.tasks import view
from pocketlm.tasks.base import card_parts
from pocketlm.tasks.present import (
    as_dict, comparison_rows, fmt_ci, fmt_number, kind_of, md, md_table, of_kind, results_by_entry,
)

HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # embedded teachers' hub originals
MISSING = "**Not provided.** The person releasing this model did not state {what} (set `card.{field}` in the " \
          "pipeline config)."


def _value(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def model_name(doc: PipelineDocument | dict[str, Any]) -> str:
    doc = as_dict(doc)
    name = doc["config"]["card"].get("model_name")
    if name:
        return name
    teacher = str(doc["config"]["teacher"]).rstrip("/").split("/")[-1].removesuffix(".gguf")
    return f"{teacher}-pocketlm-student"


def model_index(doc: PipelineDocument | dict[str, Any]) -> list[dict[str, Any]]:
    """The Hub's ``model-index``: one result per evaluated set, the student's overall figures as metrics."""
    doc = as_dict(doc)
    results = []
    for entry, by_role in results_by_entry(doc).items():
        res = by_role.get("student")
        task = None if res is None else view(res["kind"]).card_task
        if task is None:
            continue
        task_type, task_name = task
        metrics = [{"type": m["name"], "name": m["name"].replace("_", " "), "value": round(_value(m["value"]), 6),
                    "verified": False}
                   for m in res["metrics"] if m.get("group") is None and _value(m.get("value")) is not None
                   and not m["name"].startswith(("delta_", "baseline_"))]
        if metrics:
            src = res.get("data", {}).get("source", entry)
            results.append({"task": {"type": task_type, "name": task_name},
                            "dataset": {"name": f"{entry} ({src})", "type": entry}, "metrics": metrics})
    return [{"name": model_name(doc), "results": results}]


def metadata(doc: PipelineDocument | dict[str, Any]) -> dict[str, Any]:
    doc = as_dict(doc)
    card, cfg = doc["config"]["card"], doc["config"]
    meta: dict[str, Any] = {"license": card.get("license") or "unknown"}
    base = HUB_IDS.get(cfg["teacher"])
    if base:
        meta["base_model"] = base
    if card.get("language"):
        meta["language"] = list(card["language"])
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["pocketlm", "distillation", "knowledge-distillation"]
    if cfg["student"].get("moe"):
        tags.append("mixture-of-experts")
    meta["tags"] = tags + [t for t in card.get("tags", []) if t not in tags]
    if card.get("datasets"):
        meta["datasets"] = list(card["datasets"])
    meta["model-index"] = model_index(doc)
    return meta


def _user(card: dict[str, Any], field: str, what: str) -> str:
    return card.get(field) or MISSING.format(what=what, field=field)


def _cell(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    ci = fmt_ci(m.get("ci"))
    return md(fmt_number(m.get("value")) + (f" {ci}" if ci else ""))


def _comparison(by_role: dict[str, dict[str, Any]], rows: list[dict[str, Any]], first: str) -> list[str]:
    roles = list(by_role)
    header = [first] + roles + ["Δ student − teacher [95 % CI]"]
    body = [[md(r["group"] if first == "group" else r["name"])] + [_cell(r["cells"].get(x)) for x in roles]
            + [_cell(r["delta"]) + (" *" if r["significant"] else "")] for r in rows]
    return md_table(header, body)


_METRICS_SECTION = (  # the "Metrics" section: how each figure is defined
    "## Metrics", "",
    "- Perplexity as lm-evaluation-harness defines it (rolling windows over whole documents; token, word and "
    "byte perplexity, bits per byte), lower is better.",
    "- Social bias by log-likelihood as lm-evaluation-harness scores causal LMs (e.g. CrowS-Pairs "
    "`pct_stereotype`, 50 is unbiased).",
    "- Prompted toxicity as RealToxicityPrompts defines it (expected maximum toxicity, toxicity probability), "
    "per group, beside the fluency and diversity of the same generations (as DExperts reports them): "
    "`generation_perplexity`, the perplexity of the continuations given their prompts under the teacher, "
    "lower is more fluent; `distinct_1` / `distinct_2`, unique / total word n-grams over each prompt's "
    "continuations, higher is more varied. Low toxicity beside a high generation perplexity or a low "
    "distinct-2 may mean incoherent output, not a safer model.",
    "- Intervals: 95 % percentile bootstrap over items; deltas: paired bootstrap.", "",
)


def card_markdown(doc: PipelineDocument | dict[str, Any]) -> str:
    """The card's text: YAML metadata between ``---`` lines, then Mitchell et al.'s sections."""
    doc = as_dict(doc)
    cfg, card = doc["config"], doc["config"]["card"]
    by_entry = results_by_entry(doc)
    name = model_name(doc)
    distill = of_kind(by_entry, "distill")[1].get("student", {})
    params = {r: {m["name"]: m["value"] for m in res["metrics"]} for r, res in of_kind(by_entry, "parameters")[1].items()}
    student_cfg = cfg["student"]
    L = [f"# {md(name)}", "",
         f"A student language model distilled from `{md(cfg['teacher'])}` by pocketlm. Every figure below comes from "
         f"the pipeline's `results.json` (config hash `{doc.get('config_hash')}`), each with a 95 % bootstrap "
         "interval; Δ is student − teacher on the same items with a paired interval (* where it excludes 0).", ""]
    L += _model_details(doc, student_cfg, params.get("student", {}), params.get("teacher", {}))
    L += ["## Intended use", "", _user(card, "intended_use", "the intended use"), "",
          "### Out-of-scope use", "", _user(card, "out_of_scope_use", "out-of-scope uses"), ""]
    L += _factors(by_entry)
    L += _METRICS_SECTION
    L += _evaluation_data(doc, by_entry)
    L += _training_data(cfg, distill.get("data", {}))
    L += _quantitative_analyses(by_entry)
    L += _release_gates(doc)
    for part in card_parts():  # the sections the views write themselves (the deployment figures, ...)
        L += part.lines(doc)
    L += ["", "## Ethical considerations", "",
          _user(card, "ethical_considerations", "ethical considerations"),
          "", "A distilled student can keep, lose or amplify its teacher's biases and toxicity; the per-group "
          "figures above measure that on the suites listed, and only there.", "",
          "## Caveats and recommendations", "", _user(card, "caveats", "caveats and recommendations"), "",
          "Suites run on subsets (see n above) give wide intervals; a delta whose interval includes 0 is not "
          "evidence of no change. The embedded toxicity scorer is a profanity classifier, not a measure of all harm.",
          ""]
    return "---\n" + yaml.safe_dump(metadata(doc), sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(L)


def _model_details(doc: dict[str, Any], student_cfg: dict[str, Any], ps: dict[str, Any],
                   pt: dict[str, Any]) -> list[str]:
    """The "Model details" section; `ps`, `pt`: the student's and the teacher's parameter counts."""
    cfg, card = doc["config"], doc["config"]["card"]
    L = ["## Model details", ""]
    L += [f"- **Developed by:** {card.get('authors') or MISSING.format(what='who made it', field='authors')}",
          f"- **Model type:** decoder-only causal LM, {'sparse Mixture-of-Experts' if student_cfg.get('moe') else 'dense'}"
          f" student ({md(student_cfg.get('init'))} init, {md(student_cfg.get('num_layers') or student_cfg.get('layers'))}"
          " layers)",
          f"- **Teacher (base model):** `{md(cfg['teacher'])}`" + (f" (`{HUB_IDS[cfg['teacher']]}`)"
                                                                   if cfg["teacher"] in HUB_IDS else ""),
          f"- **Parameters:** {fmt_number(ps.get('params_total'))} (non-embedding {fmt_number(ps.get('params_non_embedding'))};"
          f" teacher {fmt_number(pt.get('params_total'))}, non-embedding {fmt_number(pt.get('params_non_embedding'))})",
          f"- **License:** {md(card['license']) if card.get('license') else MISSING.format(what='a license', field='license')}",
          f"- **Fingerprint:** `{doc['models'].get('student', {}).get('fingerprint')}`; code commit "
          f"`{doc.get('provenance', {}).get('git_commit')}`", ""]
    return L


def _factors(by_entry: dict[str, dict[str, Any]]) -> list[str]:
    """The "Factors" section: the groups each suite disaggregates by (the first 20 of each)."""
    groups = report_groups(by_entry)
    return ["## Factors", "",
            "Groups the evaluation disaggregates by: " + ("; ".join(
                f"{md(e)}: {', '.join(md(g) for g in gs[:20])}{' …' if len(gs) > 20 else ''}" for e, gs in groups.items())
                or "none (no bias or toxicity suite was run)") + ".", ""]


def _evaluation_data(doc: dict[str, Any], by_entry: dict[str, dict[str, Any]]) -> list[str]:
    """The "Evaluation data" section: each evaluated set's source, size and hash, and what was skipped and why."""
    L = ["## Evaluation data", ""]
    for entry, by_role in by_entry.items():
        if not view(kind_of(by_role)).evaluation_data:
            continue
        ref = by_role.get("student") or next(iter(by_role.values()))
        d = ref.get("data", {})
        L.append(f"- **{md(entry)}** ({md(ref['kind'])}): {md(d.get('source', ''))}; n = {d.get('n')}, "
                 f"hash `{md(d.get('hash'))}`")
    for entry, why in doc.get("skipped", {}).items():
        L.append(f"- **{md(entry)}**: not evaluated — {md(why)}")
    return L


def _training_data(cfg: dict[str, Any], dd: dict[str, Any]) -> list[str]:
    """The "Training data" section: the distillation data `dd` and the settings it was distilled with."""
    return ["", "## Training data", "",
            f"Distilled on {md(dd.get('source', 'n/a'))} (hash `{md(dd.get('hash'))}`): {fmt_number(dd.get('tokens'))} "
            f"training tokens in blocks of {dd.get('block_size')}, {dd.get('heldout_documents')} documents held out. "
            f"Loss: {md(cfg['distill']['loss'])} over the teacher's top-{cfg['distill']['top_k']} distributions "
            f"(mode {md(cfg['distill']['mode'])}, temperature {cfg['distill']['temperature']}, CE weight "
            f"{cfg['distill']['ce_weight']}), {cfg['train']['steps']} steps of batch {cfg['train']['batch_size']}, "
            f"lr {cfg['train']['lr']}, {md(cfg['train']['precision'])}, seed {cfg['train']['seed']}.", ""]


def _quantitative_analyses(by_entry: dict[str, dict[str, Any]]) -> list[str]:
    """The "Quantitative analyses" section: student vs teacher per analysed set, overall and by group."""
    L = ["## Quantitative analyses", ""]
    for entry, by_role in by_entry.items():
        if not view(kind_of(by_role)).analysis:  # not evaluation: in the report, or below
            continue
        rows = comparison_rows(by_role)
        if rows:
            L += [f"### {md(entry)}", ""] + _comparison(by_role, rows, "metric") + [""]
        for metric in headlines(by_role):
            grows = [r for g in group_names(by_role, metric) for r in comparison_rows(by_role, g, [metric])]
            if grows:
                L += [f"#### {md(entry)}: {md(metric)} by group", ""] + _comparison(by_role, grows, "group") + [""]
    return L


def _release_gates(doc: dict[str, Any]) -> list[str]:
    """The "Release gates" subsection: the verdict and each gate's status and figures."""
    gates = doc.get("gates", [])
    L = ["### Release gates", ""]
    L += ([f"Verdict: **{doc.get('verdict', 'no gates').upper()}**", ""] + md_table(
        ["gate", "status", "figures"],
        [[md(g["name"]), g["status"].upper(), md("; ".join(f"{k} = {fmt_number(v)}" for k, v in g["values"].items())
                                                 or g.get("message", ""))] for g in gates]) if gates
          else ["No release gates were configured."])
    return L


def write_card(doc: PipelineDocument | dict[str, Any], path: str | os.PathLike) -> Path:
    return write_text_atomic(path, card_markdown(doc))
