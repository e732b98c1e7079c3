"""`pocketlm prune`: a Llama teacher cut to a target by importance, saved, reloadable, perplexity before/after;
a bad target refused with exit 2, naming the option, and no folder left."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pocketlm.cli import app


def test_prune_command_writes_a_loadable_student(tmp_path, teacher_dir, corpus_file):
    from transformers import LlamaForCausalLM

    out = tmp_path / "pruned"
    r = CliRunner().invoke(app, ["prune", "--model", str(teacher_dir), "--data", str(corpus_file), "--out", str(out),
                                 "--num-layers", "3", "--intermediate-size", "40", "--block-size", "16",
                                 "--calibration-blocks", "8", "--removal-blocks", "2", "--depth-metric", "perplexity",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "prune"
    imp = json.loads((out / "importance.json").read_text())
    inc = imp["importance"]["removal_increase"]
    assert imp["plan"]["layers"] == sorted(sorted(range(4), key=lambda i: -inc[i])[:3])  # dropped: least harm
    # a plain Llama folder: transformers' own class reads it, no pocketlm model type involved
    assert json.loads((out / "student" / "config.json").read_text())["model_type"] == "llama"
    student = LlamaForCausalLM.from_pretrained(out / "student")
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (3, 40)
    groups = {m["group"] for m in res["metrics"] if m["name"] == "token_perplexity"}
    assert groups == {"before", "after"}
    assert "kept layers" in r.output
    with torch.no_grad():
        assert torch.isfinite(student(torch.tensor([[1, 5, 9]])).logits).all()


@pytest.mark.parametrize("args, named", [
    (["--num-layers", "9"], "num_layers"),
    (["--hidden-size", "30"], "hidden_size"),
    (["--target-params", "150%"], "target_params"),
    (["--target-params", "50%", "--num-layers", "2"], "not both"),
    ([], "no pruning target"),
    (["--target-params", "50%", "--axis", "diagonal"], "axis"),
])
def test_bad_target_exits_2_naming_it(tmp_path, teacher_dir, corpus_file, args, named):
    out = tmp_path / "pruned"
    r = CliRunner().invoke(app, ["prune", "--model", str(teacher_dir), "--data", str(corpus_file), "--out", str(out),
                                 "--block-size", "16", "--quiet", *args])
    assert r.exit_code == 2 and named in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()
