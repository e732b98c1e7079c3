"""A top-k softmax MoE student exported as Mixtral: transformers' `MixtralForCausalLM` loads the folder and gives
the same logits (fp32, rtol=atol=1e-5) and the same greedy generations; size accounting agrees; students Mixtral
cannot hold are refused before anything is written."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import MixtralForCausalLM

from pocketlm.config import MoEConfig
from pocketlm.models.hf_export import export_mixtral
from pocketlm.models.moe import moe_layers
from pocketlm.models.size_moe import parameter_counts
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM

TOL = dict(rtol=1e-5, atol=1e-5)


def moe_student(tied: bool, seed: int = 0, **moe) -> PocketLMForCausalLM:
    torch.manual_seed(seed)
    spec = {"router": "topk_softmax", "num_experts": 4, "top_k": 2, "expert_size": 24, **moe}
    cfg = PocketLMConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, moe=MoEConfig(**spec),
    )  # fmt: skip
    model = PocketLMForCausalLM(cfg).eval()
    with torch.no_grad():  # a router that has learned something: routes differ from token to token
        for layer in moe_layers(model).values():
            if hasattr(layer.router, "proj"):
                layer.router.proj.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_exported_student_is_mixtral_with_the_same_logits(tmp_path, tokenizer, tied):
    student = moe_student(tied, seed=int(tied))
    folder = export_mixtral(student, tmp_path / "mixtral", tokenizer=tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (4, 2, 24)
    mixtral = MixtralForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 100, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(mixtral(ids).logits, student(ids).logits, **TOL)
        theirs = mixtral.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
        ours = student.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours)
    assert parameter_counts(mixtral) == parameter_counts(student)
    assert (folder / "tokenizer.json").exists()


def test_export_casts_dtype(tmp_path):
    folder = export_mixtral(moe_student(True), tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert MixtralForCausalLM.from_pretrained(folder).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "moe, field",
    [
        ({"router": "switch", "top_k": 1}, "moe.router"),
        ({"router": "aux_free"}, "moe.router"),
        ({"num_shared_experts": 1}, "moe.num_shared_experts"),
        ({"layers": [1]}, "moe.layers"),
    ],
)
def test_students_mixtral_cannot_hold_are_refused(tmp_path, moe, field):
    with pytest.raises(ValueError, match=field):
        export_mixtral(moe_student(True, **moe), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_dense_student_is_refused(tmp_path):
    dense = PocketLMForCausalLM(PocketLMConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="export_llama"):
        export_mixtral(dense, tmp_path / "out")
