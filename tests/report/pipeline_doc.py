"""Helpers for the report tests: a pipeline document built by hand as the typed `PipelineDocument` (every section
the report draws), and a headless Chromium driver."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pocketlm.core.pipeline_doc import Entry, PipelineDocument, StageStatus
from pocketlm.core.results import Metric, Results

PLANTED = '<script>console.error("PLANTED-XSS"); document.title = "pwned";</script><img src=x onerror="console.error(\'PLANTED-IMG\')">'


def _metric(name, value, n=10, ci=None, group=None, hib=False, unit=None):
    return Metric(name, value, n, None if ci is None else tuple(ci), hib, group, unit)


def _results(kind, role, metrics, details=None, data=None, settings=None):
    return Results(kind, {"spec": f"{role}-spec", "fingerprint": "f" * 16},
                   data or {"source": "held-out", "hash": "abc", "n": 10}, settings or {}, metrics, details or {},
                   wall_time_s=1.0)


def _deployment(role: str, file_name: str) -> dict:
    """The export stage's Results of one model at f16 and q4_0 (the student's with its ratios to the teacher)."""
    figures = {"teacher": {"f16": (271e6, 900.0, 40.0, 0.15, 390e6), "q4_0": (78e6, 1100.0, 70.0, 0.12, 200e6)},
               "student": {"f16": (120e6, 2000.0, 95.0, 0.07, 200e6), "q4_0": (39e6, 2600.0, 175.0, 0.05, 110e6)}}
    names = ("file_bytes", "prompt_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_rss_bytes")
    metrics = [_metric(n, v, n=3, group=q) for q, row in figures[role].items() for n, v in zip(names, row)]
    if role == "student":
        t, s_ = figures["teacher"], figures["student"]
        metrics += [m for q in ("f16", "q4_0") for m in (
            _metric("decode_speedup", s_[q][2] / t[q][2], n=1, group=q, hib=True, unit="×"),
            _metric("times_smaller", t[q][0] / s_[q][0], n=1, group=q, hib=True, unit="×"))]
    res = _results("deployment", role, metrics, data={"source": "pocketlm.eval.speed.PROMPTS", "n": 3,
                                                      "prompt_tokens": [110, 118, 104]},
                   details={"files": {q: f"deploy/{role}-{q}/{file_name if role == 'student' else 'model.gguf'}"
                                      for q in ("f16", "q4_0")}},
                   settings={"engine": "llama.cpp", "quants": ["f16", "q4_0"], "threads": 2, "new_tokens": 64,
                             "repeats": 5, "warmup": 1, "versions": {"llama_cpp_python": "0.3.36"}})
    return Entry(role, "deployment", res)


def make_doc(*, generation: str = "a harmless continuation", group: str = "age", gate_name: str = "ppl kept",
             verdict: str = "pass", moe: bool = False, deployment: bool = False,
             file_name: str = "model-q4_0.gguf") -> PipelineDocument:
    history = [{"step": s, "loss": 5.0 - s / 10, "kd": 3.0 - s / 20, "ce": 4.0 - s / 10, "tokens_per_s": 300.0 + s,
                "val_perplexity": 100.0 - s if s % 2 == 0 else None} for s in range(1, 9)]
    if moe:  # the trainer's per-layer router telemetry
        for row in history:
            row["moe"] = {str(layer): {"tokens_per_expert": [10 + row["step"], 30 - row["step"], 20, 20],
                                       "load_cv": 0.3} for layer in range(2)}
    entries = {
        "distill": [
            Entry("student", "distill", _results("distill", "student", [
                _metric("final_val_perplexity", 92.0), _metric("tokens_per_second", 310.0, hib=True)],
                details={"history": history}, data={"source": "teacher-written corpus", "hash": "d1", "n": 40,
                                                    "tokens": 10200, "block_size": 256, "heldout_documents": 5})),
            Entry("teacher", "parameters", _results("parameters", "teacher", [
                _metric("n_params", 134.5e6, n=1, unit="params"),
                _metric("n_params_non_embedding", 106.2e6, n=1, unit="params")])),
            Entry("student", "parameters", _results("parameters", "student", [
                _metric("n_params", 56.6e6, n=1, unit="params"),
                _metric("n_params_non_embedding", 28.3e6, n=1, unit="params")])),
        ],
        "perplexity": [
            Entry("teacher", "heldout", _results("perplexity", "teacher", [
                _metric("token_perplexity", 35.4, ci=[30.0, 41.0]), _metric("bits_per_byte", 1.13, ci=[1.1, 1.2])])),
            Entry("student", "heldout", _results("perplexity", "student", [
                _metric("token_perplexity", 126.6, ci=[110.0, 140.0]), _metric("bits_per_byte", 1.53, ci=[1.5, 1.6]),
                _metric("delta_token_perplexity", 91.2, ci=[80.0, 100.0]),
                _metric("word_perplexity", math.nan)])),  # not finite: written as null
        ],
        "bias": [
            Entry(r, "crows_pairs", _results("bias", r, [
                _metric("pct_stereotype", v, ci=[v - 5, v + 5], hib=None),
                _metric("pct_stereotype", v + 3, ci=[v - 9, v + 9], group=group, hib=None),
                _metric("pct_stereotype", v - 3, ci=[v - 9, v + 9], group="gender", hib=None)]
                + ([_metric("delta_pct_stereotype", 1.0, ci=[-2.0, 4.0], hib=None),
                    _metric("delta_pct_stereotype", 2.0, ci=[-3.0, 7.0], group=group, hib=None)]
                   if r == "student" else [])))
            for r, v in (("teacher", 60.0), ("student", 61.0))],
        "toxicity": [
            Entry(r, "toxigen", _results("toxicity", r, [
                _metric("expected_max_toxicity", v, ci=[v - 0.01, v + 0.01]),
                _metric("toxicity_probability", v / 2, ci=[0.0, v]),
                _metric("expected_max_toxicity", v, ci=[v - 0.02, v + 0.02], group="hate/asian"),
                _metric("toxicity_probability", v / 3, ci=[0.0, v], group="hate/asian"),
                # fluency and diversity of the same generations (`audit.fluency`)
                _metric("distinct_2", d2, ci=[d2 - 0.05, d2 + 0.05], hib=True),
                _metric("distinct_2", d2, ci=[d2 - 0.1, d2 + 0.1], group="hate/asian", hib=True),
                _metric("generation_perplexity", ppl, ci=[ppl - 2, ppl + 3]),
                _metric("generation_perplexity", ppl, ci=[ppl - 4, ppl + 5], group="hate/asian")]
                + ([_metric("delta_generation_perplexity", 71.25, ci=[60.5, 82.75])] if r == "student" else []),
                details={"most_toxic": [{"score": 0.91, "group": "hate/asian", "prompt": "- a prompt\n-",
                                         "text": generation}]},
                settings={"fluency": {"reference": "teacher", "spec": "smollm2-135m-instruct"}}))
            for r, v, ppl, d2 in (("teacher", 0.05, 12.5, 0.83), ("student", 0.07, 83.75, 0.31))],
    }
    status = {k: StageStatus("ran", key="k", wall_time_s=1.5, entries=v) for k, v in entries.items()}
    status["size"] = StageStatus("off")
    status["attention"] = StageStatus("off")
    status["export"] = StageStatus("ran", key="k", wall_time_s=4.0, entries=[
        _deployment(r, file_name) for r in ("teacher", "student")]) if deployment else StageStatus("off")
    gates = [{"name": gate_name, "rule": "student.token_perplexity <= 4 * teacher.token_perplexity",
              "status": "pass" if verdict == "pass" else "fail", "passed": verdict == "pass",
              "values": {"student.token_perplexity": 126.6, "teacher.token_perplexity": 35.4},
              "comparisons": [{"left": "student.token_perplexity", "left_value": 126.6, "op": "<=",
                               "right": "4.0 * teacher.token_perplexity", "right_value": 141.6,
                               "holds": verdict == "pass"}], "message": ""}]
    config = {"teacher": "smollm2-135m-instruct",
              "student": {"init": "teacher_layers", "num_layers": 8, "moe": {"num_experts": 4} if moe else None},
              "distill": {"loss": "forward_kl", "top_k": 64, "mode": "cache", "temperature": 1.0, "ce_weight": 0.5},
              "train": {"steps": 80, "batch_size": 4, "lr": 5e-4, "precision": "bf16", "seed": 0},
              "card": {"model_name": None, "license": None, "language": [], "tags": [], "datasets": [],
                       "intended_use": None, "out_of_scope_use": None, "ethical_considerations": None,
                       "caveats": None, "authors": None},
              "gates": [{"name": gate_name, "rule": gates[0]["rule"]}]}
    return PipelineDocument(
        config=config, config_hash="c" * 16, output_dir="out",
        models={"teacher": {"spec": "smollm2-135m-instruct", "fingerprint": "t" * 16},
                "student": {"spec": "distill/student", "fingerprint": "s" * 16}},
        stages=status, skipped={"bbq": "its data ../shared/data/bbq is not there"}, facts={},
        provenance={"git_commit": "deadbeef", "hardware": {"cpu_count": 2}, "packages": {"torch": "2.13.0"}},
        wall_time_s=12.0, gates=gates, verdict=verdict)


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


needs_chromium = pytest.mark.skipif(chromium() is None, reason="no Chromium here: install it from Debian packages "
                                                               "(apt-get install -y chromium) to run the browser check")


def load_in_browser(path: Path) -> tuple[str, list[str]]:
    """Load a page in headless Chromium: (the DOM after load, console messages). --no-sandbox: tests may run as root;
    the page is ours and carries no script."""
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=2000", "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    return proc.stdout, console
