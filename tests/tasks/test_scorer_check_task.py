"""The scorer check as a pipeline task (``audit.scorer_check``): off by default (and then nothing else changes: the
distillation's key is the same with it on), its Results filed under the role ``scorer`` equal to what
`scorer_check_results` computes on the same file, a gate can name them, and a missing file is named before any
model work."""
from __future__ import annotations

import json

import pytest
from tiny_pipeline import NO_DISTILL, figures, stage_entries, tiny_config

from pocketlm.audit.toxicity import scorer_check_results
from pocketlm.config_pipeline import PipelineConfig
from pocketlm.core.config import ConfigError
from pocketlm.pipeline import run_pipeline

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
                                  "gates=['scorer_check.roc_auc.scorer[abuse] >= 0.5']"),
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
                                  definitions=["abuse=0,1:2", "hate=0:2"])
    assert figures(res) == pytest.approx(figures(direct))
    assert {m.group for m in res.metrics} == {"abuse", "hate"} and 0.5 < figures(res)[("roc_auc", "abuse", "value")] < 1
    assert [g["status"] for g in on.gates] == ["pass"]
    page = on.report_path.read_text()
    assert 'id="entry-scorer_check"' in page and "roc_auc" in page


def test_missing_file_is_named_before_any_model_work(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(teacher_dir, corpus_file, out, *CHECK, "audit.scorer_check.data=nope.csv",
                      f"data_root={tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"audit.scorer_check.data: data not found: .*nope.csv"):
        run_pipeline(cfg, progress=False)
    assert not out.exists()  # refused before the output folder (and any model) was made
    skip = cfg.model_copy(update={"missing_data": "skip"})
    done = run_pipeline(skip, progress=False, tasks=NO_DISTILL)
    st = done.document.stages["scorer_check"]
    assert st.status == "skipped" and "nope.csv" in st.reason and "scorer_check" in done.document.skipped


def test_config_errors_name_the_field(teacher_dir, corpus_file, tmp_path):
    for sets, field in ((["audit.scorer_check.enabled=true"], "audit.scorer_check"),
                        (["audit.scorer_check.definitions=[abuse]"], "audit.scorer_check.definitions"),
                        (["audit.scorer_check.scorer=nope"], "audit.scorer_check.scorer"),
                        (["audit.scorer_check.colour=red"], "audit.scorer_check.colour")):
        with pytest.raises(ConfigError, match=field):
            tiny_config(teacher_dir, corpus_file, tmp_path / "o", *sets)
