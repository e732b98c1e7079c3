"""The scorer check as a pipeline task (``audit.scorer_check``): off by default (and then nothing else changes: the
distillation's key is the same with it on), its Results filed under the role ``scorer`` equal to what
`scorer_check_results` computes on the same file, a gate can name them, and a missing file is named before any
model work."""
from __future__ import annotations

import json

import pytest
from tiny_pipeline import figures, refused_then_skipped, stage_entries, tiny_config

from pocketlm.audit.toxicity import read_labelled, scorer_check_results, seeded_subset
from pocketlm.config_pipeline import PipelineConfig
from pocketlm.core.config import ConfigError
from pocketlm.pipeline import run_pipeline
from pocketlm.tasks.base import Context
from pocketlm.tasks.scorer_check import ENTRY, TASK

ROWS = [("you are a fucking idiot", "1"), ("what a lovely day at the sea", "2"), ("shut up you stupid bitch", "0"),
        ("the train stops at every station", "2"), ("this shit is damn awful", "1"), ("bread is baked in an oven", "2"),
        ("go to hell you bastard", "0"), ("rain falls on the hills", "2"), ("they hate people like us", "0"),
        ("numbers like one and two", "1"), ("damn, what a fucking great goal", "2"), ("you people are vermin", "1")]
CHECK = ["audit.scorer_check.enabled=true", "audit.scorer_check.limit=18",
         "audit.scorer_check.definitions=['abuse=0,1:2', 'hate=0:2']"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    path = tmp_path_factory.mktemp("labelled") / "set.csv"
    path.write_text("tweet,class\n" + "".join(f'"{t}",{c}\n' for t, c in ROWS * 2))
    return path


@pytest.fixture(scope="module")
def runs(teacher_dir, corpus_file, labelled, tmp_path_factory):
    """The same pipeline folder run with the check off, then on (the distillation reused)."""
    out = tmp_path_factory.mktemp("scorer_check") / "out"
    off = run_pipeline(tiny_config(teacher_dir, corpus_file, out), progress=False)
    off.doc = json.loads(off.results_path.read_text())  # before the second run writes the folder again
    on = run_pipeline(tiny_config(teacher_dir, corpus_file, out, *CHECK, f"audit.scorer_check.data={labelled}",
                                  "audit.n_resamples=200",
                                  "gates=['scorer_check.roc_auc.scorer[abuse] >= 0.5', "
                                  "'scorer.scorer_check.roc_auc[hate] >= 0.5']"),
                      progress=False, overwrite=True)
    return off, on


def test_off_by_default_and_nothing_else_changes(runs):
    off, on = runs
    assert PipelineConfig().audit.scorer_check.enabled is False
    assert off.ran == ["distill"] and off.document.stages["scorer_check"].to_dict() == {"status": "off"}
    assert off.doc["stages"]["scorer_check"] == {"status": "off"}
    # turned on: the distillation is reused (its key did not change), only the check runs
    assert on.ran == ["scorer_check"] and on.reused == ["distill"]
    assert on.document.stages["distill"].key == off.document.stages["distill"].key


def test_results_equal_the_api_on_the_same_file(runs, labelled):
    _, on = runs
    by_role = stage_entries(on, "scorer_check")
    assert list(by_role) == ["scorer"]
    res = by_role["scorer"]
    assert res.kind == "scorer_check" and res.model["role"] == "scorer" and res.model["spec"] == "profanity"
    assert res.data["n"] == 18 and res.data["hash"]
    direct = scorer_check_results(labelled, limit=18, seed=on.document.config["train"]["seed"],
                                  definitions=["abuse=0,1:2", "hate=0:2"], n_resamples=200)  # audit.n_resamples
    assert figures(res) == pytest.approx(figures(direct))
    assert {m.group for m in res.metrics} == {"abuse", "hate"} and 0.5 < figures(res)[("roc_auc", "abuse", "value")] < 1
    # both forms name it: <entry>.<metric>.<role> and <role>.<entry>.<metric>
    assert [g["status"] for g in on.gates] == ["pass", "pass"]
    assert on.gates[1]["values"] == {"scorer.scorer_check.roc_auc[hate]": figures(res)[("roc_auc", "hate", "value")]}
    page = on.report_path.read_text()
    assert 'id="entry-scorer_check"' in page and "roc_auc" in page
    card = on.card_path.read_text()
    evaluation_data = card.split("## Evaluation data")[1].split("## ")[0]
    assert "scorer_check" not in evaluation_data  # the labelled set measures the scorer, not the models


def test_missing_file_is_named_before_any_model_work(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(teacher_dir, corpus_file, out, *CHECK, "audit.scorer_check.data=nope.csv",
                      f"data_root={tmp_path}")
    refused_then_skipped(cfg, "scorer_check", "audit.scorer_check.data", "nope.csv", "scorer_check")

def test_config_errors_name_the_field(teacher_dir, corpus_file, tmp_path):
    for sets, field in ((["audit.scorer_check.enabled=true"], "audit.scorer_check"),
                        (["audit.scorer_check.definitions=[abuse]"], "audit.scorer_check.definitions"),
                        (["audit.scorer_check.scorer=nope"], "audit.scorer_check.scorer"),
                        (["audit.scorer_check.colour=red"], "audit.scorer_check.colour")):
        with pytest.raises(ConfigError, match=field):
            tiny_config(teacher_dir, corpus_file, tmp_path / "o", *sets)


def test_label_counts_are_checked_before_any_model_work(teacher_dir, corpus_file, labelled, tmp_path):
    """Each definition needs 2 positive and 2 negative rows among the rows the run scores (the same seeded subset):
    refused before the output folder is made, naming the config fields and the label values present."""
    out = tmp_path / "out"
    base = [*CHECK, f"audit.scorer_check.data={labelled}"]
    with pytest.raises(ValueError, match=r"definition 'rare' needs at least 2 positive.*got 0 and 10.*label values "
                                         r"present: \['0', '1', '2'\]\).*audit.scorer_check.definitions or "
                                         r"audit.scorer_check.label_column"):
        run_pipeline(tiny_config(teacher_dir, corpus_file, out, *base, "audit.scorer_check.limit=null",
                                 "audit.scorer_check.definitions=['rare=7:2']"), progress=False)
    assert not out.exists()
    # enough rows in the whole file, too few in the seeded subset the run draws
    seed = PipelineConfig().train.seed
    _, labels, _ = read_labelled(labelled, "tweet", "class")
    limit = next(n for n in range(4, len(labels))
                 if sum(labels[i] == "0" for i in seeded_subset(len(labels), n, seed)) == 1)
    with pytest.raises(ValueError, match=r"definition 'hate' needs at least 2 positive and 2 negative items, got 1"):
        run_pipeline(tiny_config(teacher_dir, corpus_file, out, *base, f"audit.scorer_check.limit={limit}"),
                     progress=False)
    assert not out.exists()


def _key(cfg, **inputs) -> dict:
    ctx = Context(cfg, cfg.output_dir)
    ctx.inputs[ENTRY] = inputs
    return TASK.inputs(ctx)


def test_key_holds_the_data_hash_the_scorer_folder_and_the_resamples(teacher_dir, corpus_file, labelled, tmp_path):
    """The same file at another path gives the same key; a replaced hf: classifier or other resamples another."""
    folder = tmp_path / "clf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    sets = [*CHECK, f"audit.scorer_check.scorer=hf:{folder}", "audit.scorer_check.toxic_label=toxic"]
    at = lambda path, *more: _key(tiny_config(teacher_dir, corpus_file, tmp_path / "o", *sets,  # noqa: E731
                                              f"audit.scorer_check.data={path}", *more), path=path, hash="h1")
    copy = tmp_path / "copy.csv"
    copy.write_bytes(labelled.read_bytes())
    first = at(labelled)
    assert at(copy) == first and str(labelled) not in json.dumps(first)  # the data's hash, not its path
    assert at(labelled, "audit.n_resamples=500") != first
    (folder / "config.json").write_text('{"replaced": true}')
    assert at(labelled) != first  # the classifier's folder changed


def test_the_scorer_role_is_a_reserved_name(teacher_dir, corpus_file, tmp_path):
    with pytest.raises(ConfigError, match="the result name 'scorer' is reserved"):
        tiny_config(teacher_dir, corpus_file, tmp_path / "o", "eval.perplexity=[{name: scorer}]")
