"""benchmarks/deploy_speed.py --smoke: a tiny teacher and student built by the benchmark, each exported at every
quant type and timed in llama.cpp and in transformers (fp32 only here: each transformers worker starts torch, 5 to
15 s on a busy machine; bf16 is timed in tests/eval/test_speed.py). Every row is sane (positive rates, the file sizes
are the files' sizes, the same prompts for every row, peak memory above the worker's starting point), the headline is
the rows' own ratios, and a re-run measures nothing again."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from conftest import load_benchmark
from pocketlm.models.gguf_export import gguf_file_bytes

ROWS = [f"{role}-{e}" for role in ("teacher", "student") for e in (
    "llamacpp-f32", "llamacpp-f16", "llamacpp-q8_0", "llamacpp-q4_0", "transformers-fp32")]
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("deploy_speed")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is installed by `make setup` (the dev extra)")
def test_smoke_rows_are_sane_and_a_rerun_measures_nothing(bench, tmp_path, capsys):
    ppl = tmp_path / "ppl.json"
    ppl.write_text(json.dumps({"teacher": 10.0, "student": 12.5, "figure": "word perplexity"}))
    out = tmp_path / "bench"
    # one thread: on a busy machine llama.cpp's threads wait for each other at every op (0.7 s a row, not 4.5 s)
    args = ["--smoke", "--out", str(out), "--ppl-json", str(ppl), "--torch-precisions", "fp32", "--threads", "1"]
    bench.main(args)
    printed = capsys.readouterr().out
    rows = {p.stem: json.loads(p.read_text()) for p in (out / "rows").glob("*.json")}
    assert sorted(rows) == sorted(ROWS)
    for name, row in rows.items():
        assert min(row["prompt_tokens_per_s"], row["decode_tokens_per_s"], row["ttft_s"]) > 0, name
        assert row["peak_rss_bytes"] > row["rss_before_load_bytes"] > 0, name
        assert len(row["passes"]) == 2 and [len(g) for g in row["generated"]] == [8, 8, 8]
        assert row["prompt_tokens"] == [32, 32, 32] and row["settings"]["threads"] == 1
        if row["engine"] == "llama.cpp":
            path = Path(row["file"])
            assert path.parent.parent == out / "models" and row["file_bytes"] == os.path.getsize(path)
            assert gguf_file_bytes(path)["file_type"] == FILE_TYPES[row["precision"]]
            assert row["peak_rss_bytes"] < 150 << 20  # llama.cpp alone; `import torch` is ~220 MiB
        else:
            assert row["weight_bytes"] > 0 and row["versions"]["class"] == "LlamaForCausalLM"
    assert len({r["key"]["prompts"] for r in rows.values()}) == 1  # the same prompt tokens in every row
    for role in ("teacher", "student"):
        sizes = [rows[f"{role}-llamacpp-{q}"]["file_bytes"] for q in ("f32", "f16", "q8_0", "q4_0")]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    assert rows["student-transformers-fp32"]["path"].endswith("models/student-hf")  # the pocketlm student as Llama

    summary = json.loads((out / "summary.json").read_text())
    s, t = rows["student-llamacpp-q4_0"], rows["teacher-llamacpp-q4_0"]
    speedup = s["decode_tokens_per_s"] / t["decode_tokens_per_s"]
    vs_torch = s["decode_tokens_per_s"] / rows["teacher-transformers-fp32"]["decode_tokens_per_s"]
    assert summary["headline"].startswith(f"student is {speedup:.2f}× faster (decode, llama.cpp q4_0 vs teacher q4_0)"
                                          f" / {vs_torch:.2f}× (vs teacher transformers fp32) and "
                                          f"{t['file_bytes'] / s['file_bytes']:.2f}× smaller")
    assert "word perplexity 10.00 → 12.50 (1.25× the teacher's" in summary["headline"]
    assert summary["headline"] in printed and "| model | engine | precision |" in printed

    bench.main(args)
    again = capsys.readouterr().out
    assert "measuring" not in again and again.count("measured before, reused") == len(ROWS)
    assert json.loads((out / "summary.json").read_text())["headline"] == summary["headline"]


def test_perplexity_is_read_from_a_pipeline_document_or_a_frontier_row(bench, tmp_path):
    def results(role, value):
        return {"role": role, "entry": "heldout", "results": {"kind": "perplexity", "metrics": [
            {"name": "word_perplexity", "value": value, "group": None},
            {"name": "word_perplexity", "value": 1.0, "group": "a slice"}]}}

    doc = tmp_path / "results.json"
    doc.write_text(json.dumps({"schema": "pocketlm.pipeline/1", "stages": {
        "distill": {"entries": [{"role": "student", "entry": "distill", "results": {"kind": "distill"}}]},
        "perplexity": {"entries": [results("teacher", 20.0), results("student", 30.0)]}}}))
    assert bench.read_perplexity(doc, "x") == {"teacher": 20.0, "student": 30.0, "figure": "word_perplexity",
                                               "source": str(doc)}
    (tmp_path / "teacher.json").write_text(json.dumps({"wikitext_word_perplexity": 33.6}))
    (tmp_path / "50-depth.json").write_text(json.dumps({"wikitext_word_perplexity": 446.0}))
    got = bench.read_perplexity(tmp_path / "50-depth.json", "x")
    assert (got["teacher"], got["student"], got["figure"]) == (33.6, 446.0, "WikiText-2 word perplexity")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="no teacher and student perplexity found"):
        bench.read_perplexity(tmp_path / "other.json", "x")
    assert bench.read_perplexity(None, str(tmp_path)) is None  # not a frontier student: no figure
