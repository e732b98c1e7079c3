"""A tiny pipeline for the task tests: configs/pipeline_tiny.yaml on the in-test teacher and corpus, with every
measurement off (the student is distilled in two steps), so a test turns on only the task it is about."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pocketlm.config_pipeline import PipelineConfig, load_pipeline_config
from pocketlm.pipeline import PIPELINE, run_pipeline

TINY = Path(__file__).resolve().parents[2] / "configs" / "pipeline_tiny.yaml"
NO_DISTILL = [t for t in PIPELINE if t.name != "distill"]  # nothing needs a student: no model work at all


def tiny_config(teacher_dir, corpus_file, out, *sets: str) -> PipelineConfig:
    """pipeline_tiny.yaml with every measurement off, then ``sets`` (``--set`` strings)."""
    base = [f"teacher={teacher_dir}", f"data.source={corpus_file}", "data.block_size=16", "data.val_fraction=0.25",
            "train.steps=2", "train.batch_size=2", "train.eval_every=2", "train.save_every=2", "distill.top_k=8",
            "ce_baseline=false", "missing_data=error", f"output_dir={out}", "eval.perplexity=[]", "audit.bias=[]",
            "audit.toxicity=[]", "inspect.size.enabled=false", "inspect.attention.enabled=false", "gates=[]"]
    return load_pipeline_config(TINY, base + list(sets))


def stage_entries(outcome, stage: str) -> dict:
    """role → Results of one stage."""
    return {e.role: e.results for e in outcome.document.stages[stage].entries}


def figures(results) -> dict:
    """(name, group, "value" | "low" | "high") → each metric's value and its interval's ends."""
    out = {}
    for m in results.metrics:
        out[(m.name, m.group, "value")] = m.value
        if m.ci is not None:
            out[(m.name, m.group, "low")], out[(m.name, m.group, "high")] = m.ci
    return out


def refused_then_skipped(cfg: PipelineConfig, stage: str, field: str, missing: str, entry: str) -> None:
    """Data that is not there: refused, naming ``field`` and the file, before the output folder (and any model) is
    made; under ``missing_data: skip`` the stage is skipped with the reason and ``entry`` listed as left out."""
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(field)}: data not found: .*{re.escape(missing)}"):
        run_pipeline(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()
    done = run_pipeline(cfg.model_copy(update={"missing_data": "skip"}), progress=False, tasks=NO_DISTILL)
    st = done.document.stages[stage]
    assert st.status == "skipped" and missing in st.reason and entry in done.document.skipped
