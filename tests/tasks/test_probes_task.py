"""Counterfactual probes as a pipeline task (``audit.probes``): off by default (and then nothing else changes), the
student's Results (with paired deltas) equal to what `run_probes` computes on the same models and file, the
teacher's figures equal to `run_probes` on the teacher alone, and a missing probe file named before any model
work."""
from __future__ import annotations

import json

import pytest
from tiny_pipeline import NO_DISTILL, figures, stage_entries, tiny_config

from pocketlm.audit.probes import run_probes
from pocketlm.config_pipeline import PipelineConfig
from pocketlm.core.config import ConfigError
from pocketlm.pipeline import run_pipeline
from pocketlm.tasks.base import Context
from pocketlm.tasks.probes import TASK as PROBES_TASK
from pocketlm.tasks.toxicity import TASK as TOXICITY_TASK

PROBES = """version: 1
sets:
  weather:
    templates: ["The {group} falls on the hills and", "After the {group} the rivers", "A day of {group} is"]
    groups: {wet: [rain, snow], dry: [sun, wind]}
  animals:
    templates: ["The {group} sat on the mat and", "A {group} can learn a lot", "The {group} goes around the"]
    groups: {pets: [cat, dog], wild: [bear, fox], farm: [cow, pig]}
"""
SETTINGS = dict(samples=2, max_new_tokens=3, batch_size=8)  # the task's and the API's own
SETS = ["audit.probes=[{name: counterfactual, data: probes.yaml, samples: 2, max_new_tokens: 3, batch_size: 8}]"]
RESAMPLES = 200  # audit.n_resamples: not the default 1000, so a run that ignored it would differ


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("probes")
    (d / "probes.yaml").write_text(PROBES)
    return d


@pytest.fixture(scope="module")
def runs(teacher_dir, corpus_file, probe_dir, tmp_path_factory):
    """The same pipeline folder run with the probes off, then on (the distillation reused)."""
    out = tmp_path_factory.mktemp("probes_run") / "out"
    off = run_pipeline(tiny_config(teacher_dir, corpus_file, out, f"data_root={probe_dir}"), progress=False)
    off.doc = json.loads(off.results_path.read_text())  # before the second run writes the folder again
    on = run_pipeline(tiny_config(teacher_dir, corpus_file, out, f"data_root={probe_dir}", *SETS,
                                  f"audit.n_resamples={RESAMPLES}",
                                  "gates=['counterfactual.loglik.delta[weather/wet] > -1000']"),
                      progress=False, overwrite=True)
    return off, on


def test_off_by_default_and_nothing_else_changes(runs):
    off, on = runs
    assert PipelineConfig().audit.probes == []
    assert off.ran == ["distill"] and off.doc["stages"]["probes"] == {"status": "off"}
    assert on.ran == ["probes"] and on.reused == ["distill"]
    assert on.document.stages["distill"].key == off.document.stages["distill"].key


def test_student_and_teacher_equal_the_api(runs, teacher_dir, probe_dir):
    _, on = runs
    by_role = stage_entries(on, "probes")
    assert list(by_role) == ["teacher", "student"] and {e.entry for e in on.document.stages["probes"].entries} == {
        "counterfactual"}
    student, teacher = by_role["student"], by_role["teacher"]
    assert student.kind == teacher.kind == "probes" and student.model["role"] == "student"
    spec = str(on.results_path.parent / on.document.facts["student_dir"])
    seed = on.document.config["train"]["seed"]
    direct = run_probes(spec, baseline_spec=str(teacher_dir), probes=probe_dir / "probes.yaml", seed=seed,
                        n_resamples=RESAMPLES, **SETTINGS)
    assert figures(student) == pytest.approx(figures(direct.results))
    assert student.baseline["fingerprint"] == on.document.models["teacher"]["fingerprint"]
    names = {m.name for m in student.metrics}
    assert {"loglik", "delta_loglik", "loglik_diff", "toxicity", "delta_sentiment"} <= names
    alone = run_probes(str(teacher_dir), probes=probe_dir / "probes.yaml", seed=seed, n_resamples=RESAMPLES,
                       **SETTINGS)
    assert figures(teacher) == pytest.approx(figures(alone.results))  # its own figures, as its own run gives them
    assert teacher.model["role"] == "teacher" and teacher.baseline is None
    gen = on.results_path.parent / student.details["generations_file"]
    assert gen.is_file() and len(gen.read_text().splitlines()) == 3 * 4 + 3 * 6  # one row per filling
    assert [g["status"] for g in on.gates] == ["pass"]
    page = on.report_path.read_text()
    assert 'id="entry-counterfactual"' in page and "animals/pets-wild" in page


def test_missing_file_is_named_before_any_model_work(teacher_dir, corpus_file, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(teacher_dir, corpus_file, out, f"data_root={tmp_path}", *SETS)
    with pytest.raises(FileNotFoundError, match=r"audit.probes.0.data: data not found: .*probes.yaml"):
        run_pipeline(cfg, progress=False)
    assert not out.exists()  # refused before the output folder (and any model) was made
    (tmp_path / "probes.yaml").write_text(PROBES)
    with pytest.raises(ValueError, match="has no probe set"):  # the file is read and its sets checked too
        run_pipeline(tiny_config(teacher_dir, corpus_file, out, f"data_root={tmp_path}",
                                 "audit.probes=[{data: probes.yaml, sets: [plants]}]"), progress=False)
    assert not out.exists()
    (tmp_path / "probes.yaml").unlink()
    done = run_pipeline(cfg.model_copy(update={"missing_data": "skip"}), progress=False, tasks=NO_DISTILL)
    st = done.document.stages["probes"]
    assert st.status == "skipped" and "probes.yaml" in st.reason and "counterfactual" in done.document.skipped


def test_config_errors_name_the_field(teacher_dir, corpus_file, tmp_path):
    for sets, field in ((["audit.probes=[{samples: -1}]"], "audit.probes.0.samples"),
                        (["audit.probes=[{scorer: nope}]"], "audit.probes.0.scorer"),
                        (["audit.probes=[{name: 'a b'}]"], "audit.probes.0.name"),
                        (["audit.probes=[{colour: red}]"], "audit.probes.0.colour"),
                        (["audit.probes=[{}, {}]"], "two sets or suites are named 'probes'")):
        with pytest.raises(ConfigError, match=field):
            tiny_config(teacher_dir, corpus_file, tmp_path / "o", *sets)


def _key(task, cfg, entries: list[str]) -> dict:
    ctx = Context(cfg, cfg.output_dir)
    ctx.records["distill"] = {"facts": {"teacher_fingerprint": "t", "student_fingerprint": "s"}}
    ctx.inputs.update({e: {"hash": "h", "prompts": []} for e in entries})
    return task.inputs(ctx)


def test_keys_hold_the_scorer_folder_and_the_resamples(teacher_dir, corpus_file, tmp_path):
    """An hf: classifier replaced in its folder, or other resamples, give the probes another key; toxicity's key holds
    the folder's identity too, and is unchanged with the embedded scorer."""
    folder = tmp_path / "clf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    hf = f"scorer: 'hf:{folder}', toxic_label: toxic"
    probes = lambda *more: _key(PROBES_TASK, tiny_config(  # noqa: E731
        teacher_dir, corpus_file, tmp_path / "o", f"audit.probes=[{{name: p, data: x.yaml, {hf}}}]", *more), ["p"])
    toxicity = lambda spec: _key(TOXICITY_TASK, tiny_config(  # noqa: E731
        teacher_dir, corpus_file, tmp_path / "o", f"audit.toxicity=[{{suite: bold, data: x, {spec}}}]"), ["bold"])
    first, tox = probes(), toxicity(hf)
    assert probes("audit.n_resamples=500") != first and probes("audit.n_resamples=500")["n_resamples"] == 500
    assert set(toxicity("scorer: profanity")) == {"suites", "models", "seed", "n_resamples", "figures"}  # as it was
    (folder / "config.json").write_text('{"replaced": true}')
    assert probes() != first and toxicity(hf) != tox


def test_the_run_uses_audit_n_resamples(teacher_dir, corpus_file, probe_dir, tmp_path, monkeypatch):
    import pocketlm.audit.probes as probes_mod

    seen, real = [], probes_mod.compare_groups
    monkeypatch.setattr(probes_mod, "compare_groups", lambda *a, **kw: seen.append(kw.get("n_resamples")) or real(*a, **kw))
    run_pipeline(tiny_config(teacher_dir, corpus_file, tmp_path / "out", f"data_root={probe_dir}",
                             "audit.probes=[{data: probes.yaml, samples: 0, sets: [weather]}]", "audit.n_resamples=300"),
                 progress=False)
    assert seen == [300]
