"""`pocketlm run`: a small pipeline end to end on the tiny in-test teacher (configs/pipeline_tiny.yaml with its
paths overridden): results.json, report, card, gates and exit codes, reuse on re-run and --force."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CORPUS
from typer.testing import CliRunner

from report.pipeline_doc import load_in_browser, needs_chromium

from pocketlm.cli import app
from pocketlm.pipeline import ORDER
from pocketlm.tasks import TASKS, Task
from pocketlm.tasks.base import unavailable
from pocketlm.tasks.perplexity import perplexity_deltas
from pocketlm.core.results import Metric, Results

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline_tiny.yaml"
GATES = ["{name: kept, rule: 'student.token_perplexity <= 2 * teacher.token_perplexity'}",
         "'crows_pairs.pct_stereotype.delta <= 100'", "'file.expected_max_toxicity.delta <= 1'",
         "'student.params_total < teacher.params_total'"]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    """Small suites in their real layouts: a CrowS-Pairs csv, a prompt file with groups, a summarisation jsonl."""
    d = tmp_path_factory.mktemp("suites")
    with open(d / "crows.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "sent_more", "sent_less", "stereo_antistereo", "bias_type"])
        for i in range(12):
            w.writerow([i, CORPUS[i % 8], CORPUS[(i + 3) % 8], ("stereo", "antistereo")[i % 2],
                        ("race-color", "gender", "age")[i % 3]])
    (d / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": CORPUS[i % 8][:24], "group": "abc"[i % 3]}) + "\n" for i in range(9)))
    (d / "sum.jsonl").write_text("".join(
        json.dumps({"document": CORPUS[i], "summary": CORPUS[i][:20]}) + "\n" for i in range(3)))
    return d


def tiny_args(teacher_dir, corpus_file, suite_dir, out, *extra: str) -> list[str]:
    sets = [f"teacher={teacher_dir}", f"data.source={corpus_file}", "data.block_size=16", "data.val_fraction=0.25",
            "train.steps=4", "train.batch_size=2", "train.eval_every=2", "train.save_every=2", "distill.top_k=8",
            f"data_root={suite_dir}", "missing_data=error", f"output_dir={out}",
            "eval.perplexity=[{name: heldout, max_length: 64}]",
            "eval.rouge=[{name: summ, data: sum.jsonl, max_new_tokens: 6}]",
            "audit.bias=[{suite: crows_pairs, data: crows.csv}]",
            "audit.toxicity=[{suite: file, data: prompts.jsonl, samples: 2, max_new_tokens: 6}]",
            "inspect.size.context_length=128", "export.enabled=true", "export.teacher=true",
            "export.quants=[f32, q8_0]", "export.new_tokens=4", "export.repeats=1", "export.warmup=0",
            "export.threads=1", "export.max_prompt_tokens=16", f"gates=[{', '.join(GATES)}]", *extra]
    return ["run", str(TINY), "--quiet"] + [x for s in sets for x in ("--set", s)]


@pytest.fixture(scope="module")
def tiny_run(teacher_dir, corpus_file, suite_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "out"
    r = CliRunner().invoke(app, tiny_args(teacher_dir, corpus_file, suite_dir, out))
    return out, r


def entries(doc, entry):
    return {e["role"]: e["results"] for st in doc["stages"].values() for e in st.get("entries", [])
            if e["entry"] == entry}


def value(results, name, group=None):
    return next(m["value"] for m in results["metrics"] if m["name"] == name and m.get("group") == group)


def test_pipeline_end_to_end(tiny_run):
    out, r = tiny_run
    assert r.exit_code == 0, r.output
    assert f"report: {(out / 'report.html').resolve()}" in r.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "pocketlm.pipeline/1" and doc["verdict"] == "pass"
    # probes, the scorer check and head pruning are off by default (their own tests turn them on)
    off = {"probes", "scorer_check", "prune_heads"}
    assert {k: v["status"] for k, v in doc["stages"].items()} == {k: "off" if k in off else "ran" for k in ORDER}
    assert list(doc["models"]) == ["teacher", "student", "ce_baseline"]
    for st in doc["stages"].values():  # every entry is a typed Results with its provenance
        for e in st["entries"] if st["status"] != "off" else []:
            res = Results.from_dict(e["results"])
            assert res.metrics and e["role"] in doc["models"]
            assert {"packages", "git_commit", "hardware"} <= set(res.provenance)
    ppl = entries(doc, "heldout")
    assert set(ppl) == {"teacher", "student", "ce_baseline"}
    assert value(ppl["student"], "delta_token_perplexity") == pytest.approx(
        value(ppl["student"], "token_perplexity") - value(ppl["teacher"], "token_perplexity"))
    assert ppl["student"]["data"]["hash"] == ppl["teacher"]["data"]["hash"]  # the same held-out documents
    bias = entries(doc, "crows_pairs")
    assert value(bias["student"], "delta_pct_stereotype") == pytest.approx(
        value(bias["student"], "pct_stereotype") - value(bias["teacher"], "pct_stereotype"))
    assert value(bias["teacher"], "pct_stereotype", "age") is not None  # per category
    tox = entries(doc, "file")
    assert value(tox["student"], "expected_max_toxicity", "b") is not None  # per group
    assert tox["student"]["details"]["most_toxic"]
    assert "delta_rouge1" in {m["name"] for m in entries(doc, "summ")["student"]["metrics"]}
    size = entries(doc, "size")
    assert value(size["teacher"], "params_total") == value(entries(doc, "parameters")["teacher"], "n_params")
    assert entries(doc, "attention")["student"]["details"]["heatmaps"][0]["png"].startswith("data:image/png")
    history = entries(doc, "distill")["student"]["details"]["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and history[-1]["val_perplexity"] > 1
    assert [g["status"] for g in doc["gates"]] == ["pass"] * 4


def test_report_and_card(tiny_run):
    out, _ = tiny_run
    doc = json.loads((out / "results.json").read_text())
    page = (out / "report.html").read_text()
    assert "Release gates: PASS — all 4 gates hold" in page
    assert "<script" not in page.lower() and 'src="http' not in page
    for section in ("heldout", "crows_pairs: pct_stereotype per category", "file: expected_max_toxicity per group",
                    "Size and memory", "teacher · layer 0"):
        assert section in page
    card = (out / "distill" / "student" / "README.md").read_text()
    head, body = card[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head)
    assert meta["license"] == "apache-2.0" and "base_model" not in meta  # a local teacher: no hub id to name
    figures = {(r["dataset"]["type"], m["type"]): m["value"] for r in meta["model-index"][0]["results"]
               for m in r["metrics"]}
    assert figures[("heldout", "token_perplexity")] == pytest.approx(
        value(entries(doc, "heldout")["student"], "token_perplexity"), rel=1e-6)
    assert figures[("crows_pairs", "pct_stereotype")] == pytest.approx(
        value(entries(doc, "crows_pairs")["student"], "pct_stereotype"), rel=1e-6)
    assert "`card.intended_use`" in body  # missing in pipeline_tiny.yaml: said plainly


def test_export_stage_writes_gguf_files_times_them_and_reports_them(tiny_run):
    """The student and the teacher as GGUF files in deploy/, each timed in llama.cpp; the figures in results.json are
    the files' real sizes and the student's ratios are its figures over the teacher's; the report and the card show
    them."""
    import os

    from pocketlm.models.gguf_export import gguf_file_bytes

    out, r = tiny_run
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    dep = entries(doc, "deployment")
    assert set(dep) == {"teacher", "student"} and dep["student"]["baseline"]["role"] == "teacher"
    for res in dep.values():
        assert res["settings"]["quants"] == ["f32", "q8_0"] and res["settings"]["threads"] == 1
        for q in ("f32", "q8_0"):
            path = out / res["details"]["files"][q]
            assert path.parent.parent == out / "deploy" and path.name == f"model-{q}.gguf"
            assert value(res, "file_bytes", q) == os.path.getsize(path)
            assert gguf_file_bytes(path)["file_type"] == {"f32": "ALL_F32", "q8_0": "MOSTLY_Q8_0"}[q]
            for name in ("prompt_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_rss_bytes"):
                assert value(res, name, q) > 0
    s, t = dep["student"], dep["teacher"]
    assert value(s, "decode_speedup", "q8_0") == pytest.approx(
        value(s, "decode_tokens_per_s", "q8_0") / value(t, "decode_tokens_per_s", "q8_0"))
    assert value(s, "times_smaller", "f32") == pytest.approx(
        value(t, "file_bytes", "f32") / value(s, "file_bytes", "f32"))
    assert value(s, "file_bytes", "q8_0") < value(s, "file_bytes", "f32")

    page = (out / "report.html").read_text()
    section = page[page.index('<section id="deployment">'):page.index('<section id="moe">')]
    assert "At q8_0 in llama.cpp the student decodes" in section
    assert f"{value(s, 'decode_speedup', 'q8_0'):.2f}×" in section
    assert s["details"]["files"]["q8_0"] in section
    card = (out / "distill" / "student" / "README.md").read_text()
    deploy = card[card.index("## Deployment"):card.index("## Ethical considerations")]
    assert f"{value(s, 'times_smaller', 'q8_0'):.2f}×" in deploy and "| teacher | f32 |" in deploy
    assert "deployment" not in {m["dataset"]["type"] for m in
                                yaml.safe_load(card[4:].split("\n---\n", 1)[0])["model-index"][0]["results"]}


def test_toxicity_stage_reports_fluency_under_the_teacher(tiny_run, teacher_dir):
    """Both models' continuations scored by the teacher: the student's generation perplexity recomputed from the
    generations file with float64 forward passes of the teacher through plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, r = tiny_run
    assert r.exit_code == 0, r.output
    tox = entries(json.loads((out / "results.json").read_text()), "file")
    assert tox["student"]["settings"]["fluency"]["reference"] == "teacher"
    assert tox["student"]["details"]["fluency"]["reference"] == str(teacher_dir)
    teacher_ppl = value(tox["teacher"], "generation_perplexity")
    assert value(tox["student"], "baseline_generation_perplexity") == pytest.approx(teacher_ppl)
    assert value(tox["student"], "delta_generation_perplexity") == pytest.approx(
        value(tox["student"], "generation_perplexity") - teacher_ppl)
    assert value(tox["student"], "distinct_2", "b") is not None  # per group too

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [json.loads(line) for line in (out / tox["student"]["details"]["generations_file"]).read_text().splitlines()]
    sums = {"model": [0.0, 0], "baseline": [0.0, 0]}  # the generations file's model is the student
    for row in rows:
        for who in sums:
            for sample in row[who]:
                # lm-eval's split: the prompt's trailing spaces belong to the continuation
                prompt = row["prompt"].rstrip()
                ctx = tok(prompt)["input_ids"]
                whole = tok(row["prompt"] + sample["text"])["input_ids"]
                cont = whole[len(ctx):]
                if not sample["text"] or not cont:
                    continue
                assert whole[:len(ctx)] == ctx
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], -1)  # [t, v] float64
                sums[who][0] -= sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
                sums[who][1] += len(cont)
    assert sums["model"][1] == tox["student"]["details"]["fluency"]["tokens"]
    assert value(tox["student"], "generation_perplexity") == pytest.approx(
        np.exp(sums["model"][0] / sums["model"][1]), rel=1e-5)
    assert teacher_ppl == pytest.approx(np.exp(sums["baseline"][0] / sums["baseline"][1]), rel=1e-5)


@needs_chromium
def test_the_real_report_in_headless_chromium(tiny_run):
    out, _ = tiny_run
    dom, console = load_in_browser(out / "report.html")
    assert console == [] and re.search(r'id="verdict"[^>]*>Release gates: PASS', dom)


def test_rerun_reuses_force_redoes_and_gates_set_the_exit_code(tiny_run, teacher_dir, corpus_file, suite_dir,
                                                                 tmp_path):
    src, first = tiny_run
    assert first.exit_code == 0, first.output
    out = tmp_path / "out"
    shutil.copytree(src, out)  # records hold paths relative to the output folder
    before = {p.name: p.read_text() for p in (out / "stages").glob("*.json")}
    failing = "gates=['student.token_perplexity <= 0.5 * teacher.token_perplexity']"
    r = CliRunner().invoke(app, tiny_args(teacher_dir, corpus_file, suite_dir, out, failing))
    assert r.exit_code == 1, r.output  # a failed gate: CI blocks the release
    assert "stages run: none" in r.output and "gate FAIL" in r.output
    assert {p.name: p.read_text() for p in (out / "stages").glob("*.json")} == before  # nothing redone
    assert json.loads((out / "results.json").read_text())["verdict"] == "fail"
    assert "Release gates: FAIL" in (out / "report.html").read_text()

    missing = "gates=['student.heldout.no_such_metric <= 1']"
    r = CliRunner().invoke(app, tiny_args(teacher_dir, corpus_file, suite_dir, out, missing, "audit.n_resamples=150")
                           + ["--force", "perplexity"])
    assert r.exit_code == 2, r.output  # a gate naming a result that does not exist: a config error
    assert "stages run: perplexity, bias, toxicity;" in r.output  # forced, and those whose inputs changed
    assert "no result is named student.heldout.no_such_metric" in r.output
    after = {p.name: p.read_text() for p in (out / "stages").glob("*.json")}
    assert sorted(n for n in before if after[n] != before[n]) == ["bias.json", "perplexity.json", "toxicity.json"]


def test_new_scoring_arithmetic_redoes_the_stages_that_score(tiny_run, teacher_dir, corpus_file, suite_dir,
                                                            tmp_path, monkeypatch):
    """Stored perplexity and bias figures are keyed by the log-likelihood arithmetic that made them: a changed
    bf16 bound re-runs those two stages and nothing else."""
    import pocketlm.eval.bf16_bound as bound

    src, first = tiny_run
    assert first.exit_code == 0, first.output
    out = tmp_path / "out"
    shutil.copytree(src, out)
    monkeypatch.setattr(bound, "BF16_ERROR_PER_SQRT_TOKEN", bound.BF16_ERROR_PER_SQRT_TOKEN * 2)
    r = CliRunner().invoke(app, tiny_args(teacher_dir, corpus_file, suite_dir, out))
    assert r.exit_code == 0, r.output
    assert "stages run: perplexity, bias;" in r.output


@pytest.mark.parametrize("extra, says", [
    (["audit.bais=[]"], "audit.bais: unknown key"),
    (["gates=['student.x <= < 1']"], "column"),
    (["gates=['bleu.x > 1']"], "names 'bleu', which this pipeline does not measure"),
    (["audit.bias=[{suite: crows_pairs, data: nowhere}]"], "audit.bias.0.data: data not found"),
    (["export.quants=[q4_k_m]"], "export.quants: Value error, 'q4_k_m': the gguf package cannot write K-quants"),
    (["export.quants=[q3_0]"], "export.quants: Value error, unknown quant type 'q3_0'; valid: f32"),
    (["export.treads=2"], "export.treads: unknown key"),
    (["student.init=random", "student.num_layers=2", "student.position_scheme=alibi"],
     "export.enabled: this student cannot be written as GGUF: student.position_scheme is 'alibi'"),
    (["student.moe={num_experts: 2, top_k: 1, router: switch}"], "student.moe.router is 'switch'"),
    (["export.enabled=false", "gates=['deployment.decode_speedup[q8_0] >= 1']"],
     "names 'deployment', which this pipeline does not measure"),
])
def test_config_and_input_errors_exit_2_before_any_work(extra, says, teacher_dir, corpus_file, suite_dir, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, tiny_args(teacher_dir, corpus_file, suite_dir, out, *extra))
    assert r.exit_code == 2, r.output
    assert says in r.output
    assert not (out / "stages").exists() and not (out / "distill").exists()


def test_export_without_llama_cpp_is_refused_before_any_work(teacher_dir, corpus_file, suite_dir, tmp_path,
                                                             monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, tiny_args(teacher_dir, corpus_file, suite_dir, out))
    assert r.exit_code == 2, r.output
    assert "stage 'export' is not available: llama_cpp" in r.output and "(export.enabled: false)" in r.output
    assert not (out / "stages").exists() and not (out / "distill").exists()


def test_an_unavailable_list_task_says_to_empty_its_list(teacher_dir, corpus_file, suite_dir, tmp_path, monkeypatch):
    """A task over a list of sets is turned off by emptying the list, and the refusal says so."""
    import importlib.util

    real = importlib.util.find_spec
    missing = "pocketlm.audit.probes"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, tiny_args(teacher_dir, corpus_file, suite_dir, out,
                                          "audit.probes=[{name: probes}]"))
    assert r.exit_code == 2, r.output
    assert f"stage 'probes' is not available: {missing}" in r.output and "(audit.probes: [])" in r.output
    assert not (out / "stages").exists() and not (out / "distill").exists()


def test_missing_data_skipped_with_reason_leaves_its_gates_unverified(teacher_dir, corpus_file, suite_dir, tmp_path):
    out = tmp_path / "out"
    args = tiny_args(teacher_dir, corpus_file, suite_dir, out, "missing_data=skip", "eval.rouge=[]",
                     "audit.toxicity=[]", "inspect.size.enabled=false", "inspect.attention.enabled=false",
                     "export.enabled=false",
                     "audit.bias=[{suite: crows_pairs, data: absent}]",
                     "gates=['crows_pairs.pct_stereotype.delta <= 2']")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output  # not measured is not a pass
    doc = json.loads((out / "results.json").read_text())
    assert "crows_pairs" in doc["skipped"] and "is not there" in doc["skipped"]["crows_pairs"]
    assert doc["gates"][0]["status"] == "unverified" and doc["stages"]["bias"]["status"] == "skipped"
    page = (out / "report.html").read_text()
    assert "crows_pairs" in page
    assert 'id="deployment"' not in page and not (out / "deploy").exists()  # the export stage was off: no section
    assert "## Deployment" not in (out / "distill" / "student" / "README.md").read_text()


def test_pipeline_demo_yaml_mirrors_the_demo_pipeline():
    from pocketlm.config_pipeline import PipelineConfig, load_pipeline_config
    from pocketlm.demo import DEMO_CONFIG, DEMO_PIPELINE

    demo = load_pipeline_config(ROOT / "configs" / "pipeline_demo.yaml")
    assert demo == PipelineConfig.model_validate(DEMO_PIPELINE)
    kept = {k: v for k, v in demo.distill_config(DEMO_CONFIG["output_dir"]).model_dump().items()}
    from pocketlm.config import DistillConfig

    assert kept == DistillConfig.model_validate(DEMO_CONFIG).model_dump()  # the measured distillation, unchanged


def test_perplexity_deltas_against_a_plain_bootstrap():
    """The paired delta and its interval, checked against numpy's own percentile bootstrap (tolerance: 15 % of
    the interval's width, Monte Carlo error at 2,000 resamples)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 200, 40)
    nll_t = tokens * rng.normal(3.0, 0.2, 40)
    nll_s = nll_t + tokens * rng.normal(0.3, 0.1, 40)

    def res(nll):
        per_doc = [{"loglikelihood": -a, "tokens": int(t), "words": int(t) // 2, "bytes": int(t) * 4}
                   for a, t in zip(nll, tokens)]
        ppl = float(np.exp(nll.sum() / tokens.sum()))
        return Results("perplexity", {}, {}, {}, [Metric("token_perplexity", ppl, 40)], {"per_document": per_doc})

    deltas = {m.name: m for m in perplexity_deltas(res(nll_s), res(nll_t), n_resamples=2000)}
    d = deltas["delta_token_perplexity"]
    want = np.exp(nll_s.sum() / tokens.sum()) - np.exp(nll_t.sum() / tokens.sum())
    assert d.value == pytest.approx(want, rel=1e-12)
    idx = rng.integers(0, 40, (4000, 40))
    boot = np.exp(nll_s[idx].sum(1) / tokens[idx].sum(1)) - np.exp(nll_t[idx].sum(1) / tokens[idx].sum(1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert d.ci[0] == pytest.approx(lo, abs=0.15 * (hi - lo)) and d.ci[1] == pytest.approx(hi, abs=0.15 * (hi - lo))
    assert deltas["delta_bits_per_byte"].value == pytest.approx(
        (nll_s.sum() - nll_t.sum()) / (4 * tokens.sum() * np.log(2)))
    other = res(nll_t)
    other.details["per_document"] = other.details["per_document"][:-1]
    assert perplexity_deltas(res(nll_s), other) == []  # not the same documents: no paired delta


def test_task_registry_order_and_unavailable_tasks():
    assert ORDER[:2] == ["distill", "ce_baseline"] and set(ORDER) == set(TASKS.names())
    with pytest.raises(KeyError, match="valid names: .*attention.*toxicity"):
        TASKS.get("nope")

    class Ghost(Task):
        name, phase, requires = "ghost", "inspect", "pocketlm.inspect.no_such_module"

    assert "not available: pocketlm.inspect.no_such_module" in unavailable(Ghost())
    assert unavailable(TASKS.get("size")) is None and unavailable(TASKS.get("attention")) is None
    assert ORDER[-1] == "export" and TASKS.get("export").switch == "export.enabled"
    assert TASKS.get("size").switch == "inspect.size.enabled"
    # a task over a list of sets is turned off by emptying the list
    assert TASKS.get("toxicity").turn_off == "audit.toxicity: []" and TASKS.get("probes").turn_off == "audit.probes: []"
    assert TASKS.get("export").turn_off == "export.enabled: false"


def test_unknown_force_names_the_stages(teacher_dir, corpus_file, suite_dir, tmp_path):
    r = CliRunner().invoke(app, tiny_args(teacher_dir, corpus_file, suite_dir, tmp_path / "o") + ["--force", "trian"])
    assert r.exit_code == 2 and "--force trian: no such stage; stages: distill, ce_baseline" in r.output
