"""Size accounting that knows MoE, checked against the real model: totals against summed parameters, and active
parameters against the experts a token's backward pass actually touches."""
from __future__ import annotations

import pytest
import torch

from pocketlm.config import MoEConfig
from pocketlm.models.moe import moe_layers
from pocketlm.models.size_moe import parameter_counts
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM


def student(tied=False, **moe) -> PocketLMForCausalLM:
    torch.manual_seed(0)
    cfg = PocketLMConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         moe=MoEConfig(**moe) if moe else None)
    return PocketLMForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_dense_counts(tied):
    model = student(tied)
    counts = parameter_counts(model)
    assert counts.total == sum(p.numel() for p in model.parameters())  # tied weights appear once
    assert counts.embedding == 100 * 32 * (1 if tied else 2)
    assert counts.active == counts.total and counts.routed == 0
    assert counts.to_dict()["non_embedding"] == counts.total - counts.embedding


@pytest.mark.parametrize(
    "spec",
    [dict(router="topk_softmax", num_experts=4, top_k=2), dict(router="switch", num_experts=4, top_k=1),
     dict(router="aux_free", num_experts=8, top_k=3, expert_size=16, num_shared_experts=1, layers=[1])],
    ids=["topk", "switch", "fine-grained+shared"],
)
def test_active_parameters_are_what_one_token_touches(spec):
    model = student(**spec).eval()
    counts = parameter_counts(model)
    per_expert = 3 * 32 * (spec.get("expert_size") or 64)
    assert counts.routed == len(moe_layers(model)) * spec["num_experts"] * per_expert
    model(torch.tensor([[7]]))[0].sum().backward()  # one token, forward and backward
    touched = [layer.experts.gate_up_proj.grad.flatten(1).ne(0).any(1).sum().item()  # experts that saw it
               for layer in moe_layers(model).values()]
    assert touched == [spec["top_k"]] * len(touched)
    assert counts.active == counts.total - counts.routed + sum(touched) * per_expert


def test_expert_choice_averages_top_k_experts_per_token():
    model = student(router="expert_choice", num_experts=4, top_k=2)
    counts = parameter_counts(model)
    assert counts.active == counts.total - counts.routed // 2
    aux = model(torch.randint(3, 100, (3, 16))).aux  # 16 tokens, capacity 8 per expert: 2 experts a token
    for layer in aux:
        assert layer["tokens_per_expert"].sum().item() / layer["tokens"].item() == 2
