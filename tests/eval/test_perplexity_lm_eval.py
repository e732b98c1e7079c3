"""Our perplexity against lm-evaluation-harness itself, run on the same tiny model, documents and max_length.

The harness runs a local task built exactly as `benchmarks/perplexity_vs_lm_eval.py` builds it (its own wikitext
detokeniser and process_results, `dataset_path: json`). Tolerance: 1e-6 relative on word/byte perplexity and bits
per byte (both sum fp32-computed log-probabilities; the harness accumulates them in another order).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install -e '.[dev]')")

from conftest import CORPUS, make_teacher  # noqa: E402

from pocketlm.eval.perplexity import perplexity  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "perplexity_vs_lm_eval.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("perplexity_vs_lm_eval", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_word_byte_bits_equal_lm_eval_on_a_tiny_model(tokenizer, tmp_path):
    model = make_teacher(len(tokenizer), seed=5)
    docs = [
        " = The Cat = \n " + " ".join(CORPUS[:4]).replace(", ", " , ") + " \n",
        " = Rain @-@ fall = \n " + " ".join(CORPUS[2:7]) + " ( one , two ) \n = = More = = \n " + CORPUS[7] + " \n",
        " Bread is baked . ",
    ]
    bench = load_bench()
    theirs = bench.run_lm_eval(model, tokenizer, docs, 16, 3, tmp_path)
    ours = perplexity(model, tokenizer, docs, max_length=16, detokenize="wikitext", batch_size=3, progress=False)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert getattr(ours, metric) == pytest.approx(theirs[metric], rel=1e-6), metric
