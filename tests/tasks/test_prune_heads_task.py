"""Head pruning as a pipeline task (``inspect.prune_heads``): off by default (and then nothing else changes), the
student's Results equal to what `prune_heads_results` computes on the same student and text, the pruned copy saved
in the output folder and recorded as a fact, and a missing text file named before any model work."""
from __future__ import annotations

import json

import pytest
from tiny_pipeline import figures, refused_then_skipped, stage_entries, tiny_config

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
    refused_then_skipped(cfg, "prune_heads", "inspect.prune_heads.data", "nope.txt", "prune_heads")

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


def test_heads_are_checked_against_each_roles_attention_before_any_model_work(teacher_dir, corpus_file, tmp_path):
    """The tiny teacher (4 layers) and its student (2 of them): 4 query heads reading 2 KV heads per layer (groups of
    2), so heads must be a multiple of 2 and each layer keeps a group (the student can lose 4 query heads, the
    teacher 8); refused before the output folder is made."""
    out = tmp_path / "out"
    base = [s for s in SETS if not s.startswith("inspect.prune_heads.heads")] + [
        f"inspect.prune_heads.data={corpus_file}"]
    for heads, roles, why in (
            (3, "[student]", r"inspect.prune_heads.heads \(the student: 2 layers, 4 KV heads of 2 query heads each\) "
                             r"must be a positive multiple of the group size 2"),
            (6, "[student]", r"inspect.prune_heads.heads \(the student.*\) 6 would remove 3 KV groups, but only 2 can "
                             r"go"),
            (10, "[teacher]", r"inspect.prune_heads.heads \(the teacher: 4 layers, 8 KV heads of 2 query heads "
                              r"each\) 10 would remove 5 KV groups, but only 4 can go")):
        cfg = tiny_config(teacher_dir, corpus_file, out, *base, f"inspect.prune_heads.heads={heads}",
                          f"inspect.prune_heads.roles={roles}")
        with pytest.raises(ValueError, match=why):
            run_pipeline(cfg, progress=False)
        assert not out.exists()
    # a student of other widths is checked against its own: 1 KV head per layer leaves nothing to remove
    cfg = tiny_config(teacher_dir, corpus_file, out, *base, "inspect.prune_heads.heads=2", "student.init=random",
                      "student.num_key_value_heads=1")
    with pytest.raises(ValueError, match=r"\(the student: 2 layers, 2 KV heads of 4 query heads each\) must be a "
                                         r"positive multiple of the group size 4"):
        run_pipeline(cfg, progress=False)
    assert not out.exists()


def test_text_without_a_training_block_is_refused_before_any_model_work(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("a.\n\nb.\n\nc.\n\nd.", encoding="utf-8")  # three training documents of a few tokens
    cfg = tiny_config(teacher_dir, corpus_file, out, *SETS, f"inspect.prune_heads.data={short}")
    with pytest.raises(ValueError, match=r"inspect.prune_heads.data: .*short.txt leaves no training block .*fewer "
                                         r"than one block of 16.*inspect.prune_heads.block_size or val_fraction"):
        run_pipeline(cfg, progress=False)
    assert not out.exists()
    one = tmp_path / "one.txt"
    one.write_text("a single document with enough words to fill a block of sixteen tokens and more", encoding="utf-8")
    with pytest.raises(ValueError, match=r"inspect.prune_heads.data: .*one.txt leaves no training block .*too few "
                                         r"to hold out"):
        run_pipeline(cfg.model_copy(update={"inspect": cfg.inspect.model_copy(update={
            "prune_heads": cfg.inspect.prune_heads.model_copy(update={"data": str(one)})})}), progress=False)
    assert not out.exists()
