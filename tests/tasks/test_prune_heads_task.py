"""Head pruning as a pipeline task (``inspect.prune_heads``): off by default (and then nothing else changes), the
student's Results equal to what `prune_heads_results` computes on the same student and text, the pruned copy saved
in the output folder and recorded as a fact, and a missing text file named before any model work."""
from __future__ import annotations

import json

import pytest
from tiny_pipeline import NO_DISTILL, figures, stage_entries, tiny_config

from pocketlm.config_pipeline import PipelineConfig
from pocketlm.core.config import ConfigError
from pocketlm.inspect.prune import prune_heads_results
from pocketlm.models.load import load_model
from pocketlm.pipeline import run_pipeline

ARGS = dict(block_size=16, max_blocks=4, batch_size=4, max_length=32, val_fraction=0.25)
SETS = ["inspect.prune_heads.enabled=true", "inspect.prune_heads.heads=2"] + [
    f"inspect.prune_heads.{k}={v}" for k, v in ARGS.items()]


@pytest.fixture(scope="module")
def runs(teacher_dir, corpus_file, tmp_path_factory):
    """The same pipeline folder run with pruning off, then on (the distillation reused)."""
    out = tmp_path_factory.mktemp("prune_heads") / "out"
    off = run_pipeline(tiny_config(teacher_dir, corpus_file, out), progress=False)
    off.doc = json.loads(off.results_path.read_text())  # before the second run writes the folder again
    on = run_pipeline(tiny_config(teacher_dir, corpus_file, out, *SETS, f"inspect.prune_heads.data={corpus_file}"),
                      progress=False, overwrite=True)
    return off, on


def test_off_by_default_and_nothing_else_changes(runs):
    off, on = runs
    assert PipelineConfig().inspect.prune_heads.enabled is False
    assert off.ran == ["distill"] and off.doc["stages"]["prune_heads"] == {"status": "off"}
    assert on.ran == ["prune_heads"] and on.reused == ["distill"]
    assert on.document.stages["distill"].key == off.document.stages["distill"].key


def test_results_equal_the_api_and_the_pruned_student_is_kept(runs, corpus_file, tmp_path):
    _, on = runs
    by_role = stage_entries(on, "prune_heads")
    assert list(by_role) == ["student"]
    res = by_role["student"]
    assert res.kind == "prune_heads" and res.model["role"] == "student"
    out = on.results_path.parent
    student = str(out / on.document.facts["student_dir"])
    direct = prune_heads_results(student, str(corpus_file), 2, tmp_path / "direct", seed=0, progress=False, **ARGS)
    assert figures(res) == pytest.approx(figures(direct))
    heads = {m.group: m.value for m in res.metrics if m.name == "attention_heads"}
    assert heads == {"before": 8, "after": 6}  # 2 layers x 4 heads; one KV group of 2 query heads removed
    assert res.details["removed_query_heads"] == direct.details["removed_query_heads"]
    kept = on.document.facts["prune_heads_student_dir"]
    assert res.details["student"] == kept == "inspect/prune_heads/student/student"
    pruned, _ = load_model(str(out / kept))
    assert sum(layer.self_attn.num_heads for layer in pruned.model.layers) == 6
    page = on.report_path.read_text()
    assert 'id="entry-prune_heads"' in page and "token_perplexity_delta" in page


def test_missing_file_is_named_before_any_model_work(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(teacher_dir, corpus_file, out, *SETS, "inspect.prune_heads.data=nope.txt",
                      f"data_root={tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"inspect.prune_heads.data: data not found: .*nope.txt"):
        run_pipeline(cfg, progress=False)
    assert not out.exists()  # refused before the output folder (and any model) was made
    done = run_pipeline(cfg.model_copy(update={"missing_data": "skip"}), progress=False, tasks=NO_DISTILL)
    st = done.document.stages["prune_heads"]
    assert st.status == "skipped" and "nope.txt" in st.reason and "prune_heads" in done.document.skipped


def test_config_errors_name_the_field(teacher_dir, corpus_file, tmp_path):
    for sets, field in ((["inspect.prune_heads.enabled=true", "inspect.prune_heads.heads=2"],
                         "inspect.prune_heads.*data: enabled needs"),
                        (["inspect.prune_heads.heads=0"], "inspect.prune_heads.heads"),
                        (["inspect.prune_heads.roles=[student, student]"], "inspect.prune_heads.roles"),
                        (["inspect.prune_heads.roles=[ce_baseline]", "inspect.prune_heads.enabled=true",
                          "inspect.prune_heads.heads=2", "inspect.prune_heads.data=x"], "ce_baseline is false"),
                        (["inspect.prune_heads.colour=red"], "inspect.prune_heads.colour")):
        with pytest.raises(ConfigError, match=field):
            tiny_config(teacher_dir, corpus_file, tmp_path / "o", *sets)
