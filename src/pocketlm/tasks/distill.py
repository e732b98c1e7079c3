"""Distillation (the student) and its cross-entropy twin (``ce_baseline``: the same blocks and steps, CE alone —
did distilling help?): each trains in its own folder, resumes from its checkpoints when its key is unchanged, and
records the student's folder and fingerprint for the later tasks, with the parameter counts of every model."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pocketlm.core.io import write_text_atomic
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.tasks import plots
from pocketlm.tasks.base import Context, Document, Entry, ReportPart, StageOutput, Task, View, model_identity, \
    path_identity, register, stamp_matches
from pocketlm.tasks.present import comparison_rows, of_kind, results_by_entry


def distill_inputs(ctx: Context, ce_only: bool = False) -> dict[str, Any]:
    cfg = ctx.cfg
    dcfg = cfg.distill_config(".", ce_only=ce_only).model_dump(mode="json")
    dcfg.pop("output_dir")
    dcfg.pop("max_memory")  # it picks batch sizes, never what is computed
    src = cfg.data.source
    data_id = path_identity(src) if src and Path(src).expanduser().exists() else src
    return {"config": dcfg, "teacher": model_identity(cfg.teacher), "data": data_id}


def parameter_results(model, info: dict[str, Any]) -> Results:
    """Parameter counts (MoE-aware: total vs active per token) as a Results document."""
    from pocketlm.models.size_moe import parameter_counts

    counts = parameter_counts(model).to_dict()
    return Results(
        kind="parameters", model=info, data={}, metrics=[
            Metric("n_params" if k == "total" else f"n_params_{k}", float(v), n=1, unit="params")
            for k, v in counts.items()],
        settings={"counting": "unique tensors (a tied head once); active = total - routed + routed * k / E"},
        provenance=provenance())


def train(ctx: Context, stage_name: str, role: str) -> StageOutput:
    """Train one student (``role``) in ``<out>/<stage_name>``; its distill and parameters Results."""
    from pocketlm.core.outdir import subfolder
    from pocketlm.data.text import hash_documents
    from pocketlm.distill.checkpoint import latest_checkpoint
    from pocketlm.distill.run import run_distill
    from pocketlm.models.load import fingerprint_model, load_model

    t0 = time.perf_counter()
    run_dir = ctx.out / stage_name
    dcfg = ctx.cfg.distill_config(run_dir, ce_only=role == "ce_baseline")
    stamp = run_dir / "pipeline_key.txt"
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    if resume and (stage_name in ctx.forced or not stamp_matches(stamp, ctx.keys[stage_name])):
        # checkpoints of other inputs (or a forced redo): start over; the teacher cache checks itself
        for sub in ("checkpoints", "student"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        resume = False
    subfolder(run_dir, kind="distill")  # ours, so the distill run may use it
    write_text_atomic(stamp, ctx.keys[stage_name])
    prep = ctx.prepared()
    result = run_distill(dcfg, resume=resume, progress=ctx.progress, prepared=prep, desc=role)
    student, tok = load_model(result.student_dir)
    ctx._models[role] = (student, tok)
    facts = {f"{role}_dir": ctx.rel(result.student_dir), f"{role}_fingerprint": fingerprint_model(student),
             f"{role}_run_dir": ctx.rel(run_dir)}
    entries = []
    if role == "student":
        heldout = run_dir / "heldout.jsonl"
        write_text_atomic(heldout, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                           for d in prep.blocks.val_docs))
        facts |= {"teacher_fingerprint": prep.teacher_fingerprint, "heldout_file": ctx.rel(heldout),
                  "heldout_hash": hash_documents(prep.blocks.val_docs), "tokenizer_fingerprint":
                  prep.tokenizer_fingerprint}
        entries.append(Entry("teacher", "parameters", parameter_results(prep.teacher, {
            "spec": ctx.cfg.teacher, "fingerprint": prep.teacher_fingerprint, "role": "teacher"})))
    tr = result.train
    info = {"spec": ctx.rel(result.student_dir), "fingerprint": facts[f"{role}_fingerprint"], "role": role}
    n_val = int(prep.blocks.val.shape[0])
    metrics = [
        Metric("final_val_perplexity", tr.final_val_perplexity, n=n_val, higher_is_better=False),
        Metric("tokens_per_second", tr.tokens_per_second, n=tr.steps, higher_is_better=True, unit="tokens/s"),
        Metric("train_seconds", tr.wall_seconds, n=tr.steps, higher_is_better=False, unit="s"),
        Metric("tokens_seen", float(tr.tokens_seen), n=tr.steps, unit="tokens"),
    ]
    settings = dcfg.model_dump(mode="json")
    settings.pop("output_dir")
    moe_png = run_dir / "moe_load.png"
    entries += [
        Entry(role, "distill", Results(
            kind="distill", model=info, baseline={"spec": ctx.cfg.teacher, "fingerprint": prep.teacher_fingerprint},
            data={"source": ctx.cfg.data.source or "teacher-written corpus", "hash": result.data_hash,
                  "n": int(prep.blocks.train.shape[0]), "tokens": result.n_train_tokens,
                  "heldout_documents": len(prep.blocks.val_docs), "block_size": prep.blocks.block_size},
            settings=settings, metrics=metrics,
            details={"history": tr.history, "run_dir": ctx.rel(run_dir), "checkpoint": tr.checkpoint and
                     ctx.rel(tr.checkpoint), "moe_load_png": ctx.rel(moe_png) if moe_png.is_file() else None,
                     "student_format": result.student_format and result.student_format.to_dict()},
            provenance=provenance(), wall_time_s=time.perf_counter() - t0)),
        Entry(role, "parameters", parameter_results(student, info)),
    ]
    return StageOutput(entries, facts)


# ---------------------------------------------------------------------------------------------------- its report parts
def _histories(doc: Document) -> dict[str, list[dict[str, Any]]]:
    """Each trained model's logged history (role → rows), from its distill Results."""
    distill = of_kind(results_by_entry(doc), "distill")[1]
    return {role: res["details"].get("history", []) for role, res in distill.items()}


def training_part(doc: Document) -> dict[str, Any]:
    """The report's "Training": the curves of every trained model and its final figures."""
    distill = of_kind(results_by_entry(doc), "distill")[1]
    return {"training_plot": plots.training_curves(_histories(doc)),
            "distill_rows": comparison_rows(distill) if distill else []}


def expert_load_part(doc: Document) -> dict[str, Any]:
    """The report's "Mixture-of-Experts load": the student's router telemetry over training (a dense one: none)."""
    return {"moe_plot": plots.expert_load(_histories(doc).get("student", []))}


class DistillTask(Task):
    """The student, distilled from the teacher as `pocketlm distill` does."""

    name, phase = "distill", "distill"
    # the report's training curves (first) and expert load; the card's training data and parameters read these
    # kinds too, and the size part shows the parameter counts
    views = (View("distill", section=False, evaluation_data=False, summary_rows=0, report_parts=(
                 ReportPart(training_part, "part_training.html.j2", place=-10),
                 ReportPart(expert_load_part, "part_moe.html.j2", place=30))),
             View("parameters", section=False, evaluation_data=False, analysis=False, summary_rows=0))
    fixed_entries = ("distill", "parameters")

    def check(self, ctx: Context) -> None:
        from pocketlm.data.text import DataError

        src = ctx.cfg.data.source
        if src and src.startswith((".", "/", "~")) and not Path(src).expanduser().exists():
            raise DataError(f"data.source: data not found: {src}")

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return distill_inputs(ctx)

    def run(self, ctx: Context) -> StageOutput:
        return train(ctx, self.name, "student")


class CEBaselineTask(DistillTask):
    """The cross-entropy twin: the same blocks and steps with distill.mode ce (`ce_baseline: true`)."""

    name = "ce_baseline"
    views = ()

    def enabled(self, cfg: Any) -> bool:
        return cfg.ce_baseline

    def check(self, ctx: Context) -> None:
        pass  # the distill task checks the shared data

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return distill_inputs(ctx, ce_only=True)

    def run(self, ctx: Context) -> StageOutput:
        return train(ctx, self.name, "ce_baseline")


DISTILL = register(DistillTask())
CE_BASELINE = register(CEBaselineTask())
