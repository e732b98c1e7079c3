"""Head pruning: the pruned student computes exactly what the unpruned one computes with those heads masked to 0
(fp32, 1e-5), saves and loads, exports to Llama when every layer keeps as many groups; the plan removes whole KV
groups in importance order; `pocketlm prune-heads` reports the perplexity `perplexity()` gives before and after."""
from __future__ import annotations

import json

import pytest
import torch
from inspect_helpers import save, tiny_student
from typer.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from pocketlm.cli import app
from pocketlm.inspect.attention import HeadImportance, attention_modules, head_mask
from pocketlm.inspect.prune import count_parameters, plan_pruning, prune_student, removed_heads

TOL = dict(rtol=1e-5, atol=1e-5)


def masked_to_zero(model, remove: dict[int, list[int]]) -> list[torch.Tensor]:
    """Per-layer head masks with every query head of the removed KV groups at 0."""
    masks = []
    for layer, attn in enumerate(attention_modules(model)):
        m = torch.ones(attn.num_heads)
        for h in removed_heads(model, remove).get(layer, []):
            m[attn.head_ids.index(h)] = 0.0
        masks.append(m)
    return masks


@pytest.mark.parametrize("layout, scheme, remove", [
    ("GQA", "rotary", {0: [1]}),
    ("GQA", "alibi", {0: [0], 1: [1]}),
    ("MHA", "rotary", {0: [0, 3], 1: [2]}),
    ("MHA", "alibi", {1: [0, 1, 2]}),
    ("GQA", "none", {1: [0]}),
])  # fmt: skip
def test_pruned_model_equals_masked_model(layout, scheme, remove):
    model = tiny_student(num_key_value_heads=2 if layout == "GQA" else 4, position_scheme=scheme, sliding_window=5)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    pruned = prune_student(model, remove)
    with torch.no_grad(), head_mask(model, masked_to_zero(model, remove)):
        want = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, want, **TOL)
        torch.testing.assert_close(pruned(ids, output_attentions=True).logits, want, **TOL)  # explicit path too
    assert not torch.allclose(model(ids).logits, want, atol=1e-4)  # the heads did matter
    kept = pruned.config.kept_kv_heads
    n_kv = model.config.num_key_value_heads
    assert kept == [[h for h in range(n_kv) if h not in remove.get(i, [])] for i in range(2)]
    assert count_parameters(pruned) < count_parameters(model)


def test_pruning_twice_keeps_original_head_ids():
    model = tiny_student(num_key_value_heads=4, position_scheme="alibi")
    once = prune_student(model, {0: [1]})
    twice = prune_student(once, {0: [2]})
    assert twice.config.kept_kv_heads == [[0, 3], [0, 1, 2, 3]]
    assert attention_modules(twice)[0].head_ids == [0, 3]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), head_mask(model, [torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.ones(4)]):
        want = model(ids).logits
    torch.testing.assert_close(twice(ids).logits, want, **TOL)
    with pytest.raises(ValueError, match=r"layer 0 has KV heads \[0, 3\]; cannot remove \[1\]"):
        prune_student(twice, {0: [1]})


def test_pruned_student_saves_loads_and_exports(tmp_path, tokenizer):
    from pocketlm.models.hf_export import export_llama

    model = tiny_student(len(tokenizer))
    pruned = prune_student(model, {0: [0], 1: [1]})  # one group per layer: still a Llama, with 2 heads
    ids = torch.tensor([[5, 6, 7, 8]])
    loaded = AutoModelForCausalLM.from_pretrained(save(pruned, tokenizer, tmp_path / "s")).eval()
    torch.testing.assert_close(loaded(ids).logits, pruned(ids).logits, **TOL)
    llama = LlamaForCausalLM.from_pretrained(export_llama(pruned, tmp_path / "llama")).eval()
    assert llama.config.num_attention_heads == 2 and llama.config.num_key_value_heads == 1
    torch.testing.assert_close(llama(ids).logits, pruned(ids).logits, **TOL)


def test_plan_takes_whole_groups_in_importance_order():
    model = tiny_student(num_key_value_heads=2)
    group = [torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.25])]
    imp = HeadImportance(per_head=[torch.ones(4)] * 2, per_group=group, n_examples=1)
    assert plan_pruning(model, imp, 2, normalize=False) == {0: [1]}
    # layer 0 keeps one group, so the next two least important are in layer 1 and only one can go there
    with pytest.raises(ValueError, match="only 2 can go"):
        plan_pruning(model, imp, 6, normalize=False)
    assert plan_pruning(model, imp, 4, normalize=False) == {0: [1], 1: [0]}
    # layer-normalised (Michel et al.): [1.0, 0.5] → [0.89, 0.45] and [0.2, 0.25] → [0.62, 0.78]; raw and normalised
    # rankings disagree on the least important group
    skewed = HeadImportance(per_head=[torch.ones(4)] * 2, per_group=[torch.tensor([1.0, 0.5]), group[1]], n_examples=1)
    assert plan_pruning(model, skewed, 2, normalize=False) == {1: [0]}
    assert plan_pruning(model, skewed, 2) == {0: [1]}
    with pytest.raises(ValueError, match="multiple of the group size 2"):
        plan_pruning(model, imp, 3)


def test_prune_heads_command_reports_perplexity_before_and_after(tmp_path, tokenizer, corpus_file):
    from pocketlm.data.text import read_documents, split_documents
    from pocketlm.eval.perplexity import perplexity
    from pocketlm.models.load import load_model

    student = save(tiny_student(len(tokenizer), num_key_value_heads=4), tokenizer, tmp_path / "student")
    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune-heads", "--model", str(student), "--data", str(corpus_file),
                                      "--heads", "3", "--out", str(out), "--block-size", "16", "--max-blocks", "8",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    metrics = {(m["name"], m["group"]): m for m in res["metrics"]}
    assert metrics[("attention_heads", "before")]["value"] == 8 and metrics[("attention_heads", "after")]["value"] == 5
    assert sum(len(v) for v in res["details"]["removed_query_heads"].values()) == 3
    assert res["settings"]["unit"] == "kv_group"

    _, val_docs = split_documents(read_documents(corpus_file), 0.2, 0)
    before_model, tok = load_model(student)
    after_model, _ = load_model(out / "student")
    before, after = perplexity(before_model, tok, val_docs), perplexity(after_model, tok, val_docs)
    assert metrics[("token_perplexity", "before")]["value"] == pytest.approx(before.token_perplexity, rel=1e-6)
    assert metrics[("token_perplexity", "after")]["value"] == pytest.approx(after.token_perplexity, rel=1e-6)
    delta = metrics[("token_perplexity_delta", None)]
    assert delta["value"] == pytest.approx(after.token_perplexity - before.token_perplexity, rel=1e-6)
    assert delta["ci"][0] <= delta["value"] <= delta["ci"][1]


def test_prune_heads_command_errors(tmp_path, tokenizer, corpus_file, teacher_dir):
    student = save(tiny_student(len(tokenizer)), tokenizer, tmp_path / "student")
    runner = CliRunner()
    odd = runner.invoke(app, ["prune-heads", "--model", str(student), "--data", str(corpus_file), "--heads", "3",
                              "--out", str(tmp_path / "o"), "--quiet", "--block-size", "16"])
    assert odd.exit_code == 2 and "multiple of the group size 2" in odd.output
    missing = runner.invoke(app, ["prune-heads", "--model", str(student), "--data", "./nope.txt", "--heads", "2",
                                  "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "nope.txt" in missing.output
    # a Llama-layout folder (what a distillation run writes, #20 item 6) is pruned as its exact pocketlm copy; the
    # pruned one keeps 1 group in one layer and 2 in the others, which no Llama holds: pocketlm's layout, and why
    out = tmp_path / "from_llama"
    llama = runner.invoke(app, ["prune-heads", "--model", str(teacher_dir), "--data", str(corpus_file), "--heads",
                                "2", "--out", str(out), "--quiet", "--block-size", "16", "--max-blocks", "4"])
    assert llama.exit_code == 0, llama.output
    layout = json.loads((out / "results.json").read_text())["details"]["student_format"]
    assert layout["model_type"] == "pocketlm" and "heads were pruned unevenly" in layout["reason"]
