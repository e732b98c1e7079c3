"""Llama export. Oracle: transformers' own `LlamaForCausalLM`, built from `llama_config_from_student` with the
student's weights, and loaded from the exported folder in a Python process that never imports pocketlm.
Logits agree at fp32 rtol=atol=1e-5 (same maths, different kernels/order)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pocketlm.models.hf_export import export_llama, llama_config_from_student
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_student(tied: bool, seed: int = 0) -> PocketLMForCausalLM:
    torch.manual_seed(seed)
    config = PocketLMConfig(
        vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return PocketLMForCausalLM(config).eval()


def hf_llama_twin(student: PocketLMForCausalLM, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    config = llama_config_from_student(student.config)
    config._attn_implementation = attn_implementation
    llama = LlamaForCausalLM(config).eval()
    llama.load_state_dict(student.state_dict(), strict=True)
    return llama


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_student_equals_hf_llama_with_the_same_weights(tied):
    student = tiny_student(tied)
    llama = hf_llama_twin(student)
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tied
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 4] = -100  # its prediction comes from a padding position, whose output is meaningless
    ours = student(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    theirs = llama(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    keep = mask.bool()  # outputs at padding positions are meaningless in both
    torch.testing.assert_close(ours.logits[keep], theirs.logits[keep], **TOL)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a[keep], b[keep], **TOL)


def test_captured_attentions_equal_hf_llama_eager():
    student = tiny_student(tied=True)
    llama = hf_llama_twin(student, attn_implementation="eager")
    ids = torch.randint(3, 100, (2, 7))
    ours = student(ids, output_attentions=True).attentions
    theirs = llama(ids, output_attentions=True).attentions
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_greedy_generation_equals_hf_llama():
    student = tiny_student(tied=False)
    llama = hf_llama_twin(student)
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(student.generate(ids, **kwargs), llama.generate(ids, **kwargs))


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# Runs in a fresh interpreter: loads each exported folder with stock transformers and writes its logits.
CLEAN_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    folders, ids_path, out_path = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
    ids = load_file(ids_path)["ids"]
    logits = {}
    for i, folder in enumerate(folders):
        model = LlamaForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits[f"logits{i}"] = model(ids).logits.contiguous()
        logits[f"n_tokens{i}"] = torch.tensor(len(AutoTokenizer.from_pretrained(folder)))
    assert not any(name == "pocketlm" or name.startswith("pocketlm.") for name in sys.modules), "pocketlm imported"
    save_file(logits, out_path)
    """
)


def test_exported_folders_load_as_llama_without_pocketlm(tmp_path):
    students = [tiny_student(tied=True, seed=1), tiny_student(tied=False, seed=2)]
    folders = [export_llama(s, tmp_path / f"export{i}", tokenizer=word_tokenizer()) for i, s in enumerate(students)]
    for folder, student in zip(folders, students):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
        assert config["tie_word_embeddings"] == student.config.tie_word_embeddings
        assert (folder / "tokenizer.json").exists() and (folder / "generation_config.json").exists()

    ids = torch.randint(3, 100, (2, 8))
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    out = tmp_path / "logits.safetensors"
    cmd = [sys.executable, "-c", CLEAN_LOADER, *map(str, folders), str(tmp_path / "ids.safetensors"), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    theirs = load_file(out)
    for i, student in enumerate(students):
        with torch.no_grad():
            torch.testing.assert_close(theirs[f"logits{i}"], student(ids).logits, **TOL)
        assert theirs[f"n_tokens{i}"].item() == 100


def test_export_casts_dtype_and_drops_the_tied_head(tmp_path):
    student = tiny_student(tied=True)
    folder = export_llama(student, tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(
        tensors["model.embed_tokens.weight"], student.model.embed_tokens.weight.to(torch.bfloat16), rtol=0, atol=0
    )


def test_export_replaces_a_previous_export_atomically(tmp_path):
    out = tmp_path / "model"
    export_llama(tiny_student(tied=True, seed=1), out)
    second = tiny_student(tied=True, seed=2)
    export_llama(second, out)  # its own earlier export: replaced whole
    torch.testing.assert_close(
        load_file(out / "model.safetensors")["model.norm.weight"], second.model.norm.weight, rtol=0, atol=0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left behind
    (out / "stale.txt").write_text("a file pocketlm did not write")
    with pytest.raises(ValueError, match=r"holds files pocketlm did not write \(stale\.txt\)"):
        export_llama(second, out)
    assert (out / "stale.txt").exists()


def test_export_refuses_a_student_that_is_not_a_plain_llama(tmp_path):
    student = tiny_student(tied=True)
    student.model.layers[1].mlp.router = torch.nn.Linear(48, 4, bias=False)  # e.g. an MoE layer
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.router\.weight: not a Llama parameter"):
        export_llama(student, tmp_path / "moe")
    assert list(tmp_path.iterdir()) == []
