"""The MoE layer against its references: dropless dispatch vs the loop over experts (fp32, forward and backward,
rtol=atol=1e-5), a 1-expert top-1 MoE vs the dense MLP, telemetry vs brute force, and the student with MoE layers
(save/load, KV-cache decoding, the generation refusal for non-causal routing)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy.stats import entropy
from transformers import AutoModelForCausalLM

import pocketlm  # noqa: F401  (registers the Auto classes)
from pocketlm.models import moe as moe_mod
from pocketlm.models.moe import (
    Experts, MoELayer, experts_dropless, experts_reference, grouped_linear, moe_layers, router_telemetry,
)
from pocketlm.models.routers import ROUTERS, Routing, build_router
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM, SwiGLUMLP

TOL = dict(rtol=1e-5, atol=1e-5)
K_OF = {"topk_softmax": 2, "switch": 1, "expert_choice": 2, "hash": 1, "aux_free": 2}


def moe_dict(**overrides) -> dict:
    from pocketlm.config import MoEConfig

    return MoEConfig(**overrides).model_dump()


def make_layer(router="topk_softmax", d=32, f=16, E=4, k=None, shared=0, seed=0, vocab=100, **cfg) -> MoELayer:
    torch.manual_seed(seed)
    moe = moe_dict(router=router, num_experts=E, top_k=k or K_OF[router], num_shared_experts=shared, **cfg)
    experts = Experts(E, d, f)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    router_mod = build_router(router, d, moe, vocab_size=vocab, layer_idx=0)
    if hasattr(router_mod, "proj"):
        torch.nn.init.normal_(router_mod.proj.weight, std=0.5)
    return MoELayer(router_mod, experts, SwiGLUMLP(d, shared * f) if shared else None)


def tiny_moe_model(seed=0, **moe) -> PocketLMForCausalLM:
    torch.manual_seed(seed)
    cfg = PocketLMConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, moe=moe_dict(**moe),
    )  # fmt: skip
    return PocketLMForCausalLM(cfg).eval()


def grads_of(layer: MoELayer, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    out, aux = layer(x, token_ids=ids)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().add(aux["aux_loss"]).backward()
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


# --- fast path == reference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", sorted(K_OF))
@pytest.mark.parametrize("shared, path", [(0, "grouped"), (1, "grouped"), (0, "expert-by-expert")])
def test_dropless_equals_the_loop_over_experts_forward_and_backward(monkeypatch, router, shared, path):
    if path == "expert-by-expert":  # the path large batches take
        monkeypatch.setattr(moe_mod, "LOOP_ROWS", 0)
    fast = make_layer(router, shared=shared, balance_coef=0.01, z_loss_coef=1e-3).train()
    slow = copy.deepcopy(fast)
    slow.dispatch = "reference"
    x = torch.randn(3, 10, 32)
    ids = torch.randint(3, 100, (3, 10))
    out_fast, g_fast = grads_of(fast, x, ids)
    out_slow, g_slow = grads_of(slow, x, ids)
    torch.testing.assert_close(out_fast, out_slow, **TOL)
    assert g_fast.keys() == g_slow.keys()
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_slow[name], **TOL, msg=name)


@pytest.mark.parametrize("fits", [True, False], ids=["grouped_mm", "split-loop"])
def test_grouped_linear_both_paths_equal_per_group_matmuls(monkeypatch, fits):
    monkeypatch.setattr(moe_mod, "_grouped_mm_fits", lambda x, w: fits)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    y = grouped_linear(x, w, counts)
    starts = [0, 3, 3, 8, 10]
    expected = torch.cat([x[starts[e] : starts[e + 1]] @ w[e].T for e in range(4)])
    torch.testing.assert_close(y, expected, **TOL)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ex, ew = torch.autograd.grad(expected, (x, w), g)
    torch.testing.assert_close(gx, ex, **TOL)
    torch.testing.assert_close(gw, ew, **TOL)


def test_unaligned_sizes_take_the_split_path_and_still_match():
    layer = make_layer(d=34, f=10)  # 34 and 10 fp32 values are not 16-byte multiples: no grouped_mm
    x = torch.randn(2, 7, 34)
    assert not moe_mod._grouped_mm_fits(x.reshape(-1, 34), layer.experts.gate_up_proj)
    ref = copy.deepcopy(layer)
    ref.dispatch = "reference"
    torch.testing.assert_close(layer(x)[0], ref(x)[0], **TOL)


def test_empty_slots_contribute_nothing_and_all_empty_gives_zeros():
    experts = Experts(3, 8, 4)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    x = torch.randn(5, 8)
    ids = torch.tensor([[0, -1], [-1, -1], [2, 1], [1, -1], [-1, 0]])
    w = torch.where(ids >= 0, torch.rand(5, 2), torch.zeros(()))
    for fn in (experts_dropless, experts_reference):
        out = fn(x, w, ids, experts.gate_up_proj, experts.down_proj)
        assert torch.equal(out[1], torch.zeros(8))
        single = fn(x[:1], w[:1, :1], ids[:1, :1], experts.gate_up_proj, experts.down_proj)
        torch.testing.assert_close(out[:1], single, **TOL)
        none = fn(x, torch.zeros(5, 2), torch.full((5, 2), -1), experts.gate_up_proj, experts.down_proj)
        assert torch.equal(none, torch.zeros_like(x))


def test_one_expert_top1_moe_equals_the_dense_mlp():
    torch.manual_seed(0)
    dense = SwiGLUMLP(32, 48)
    layer = make_layer("topk_softmax", f=48, E=1, k=1)
    with torch.no_grad():
        layer.experts.gate_up_proj[0] = torch.cat([dense.gate_proj.weight, dense.up_proj.weight])
        layer.experts.down_proj[0] = dense.down_proj.weight
    x = torch.randn(2, 9, 32, requires_grad=True)
    out, aux = layer(x)
    torch.testing.assert_close(out, dense(x), **TOL)
    gx_moe, = torch.autograd.grad(out.sum(), x)
    gx_dense, = torch.autograd.grad(dense(x).sum(), x)
    torch.testing.assert_close(gx_moe, gx_dense, **TOL)
    assert aux["tokens_per_expert"].tolist() == [18.0] and aux["load_cv"].item() == 0.0


def test_bf16_autocast_runs_the_fast_path_close_to_fp32():
    layer = make_layer(d=64, f=32)
    x = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = layer(x)
    high, _ = layer(x)
    torch.testing.assert_close(low.float(), high, rtol=0.05, atol=0.05)


# --- telemetry --------------------------------------------------------------------------------------------------


def test_telemetry_matches_brute_force():
    probs = torch.softmax(torch.randn(6, 4), -1)
    experts = torch.tensor([[0, 1], [0, 2], [-1, -1], [3, 0], [0, -1], [1, 2]])
    stats = router_telemetry(Routing(torch.ones(6, 2), experts, probs, {}), 4)
    load = [sum(int(e == i) for row in experts.tolist() for e in row) for i in range(4)]
    assert stats["tokens_per_expert"].tolist() == load == [4, 2, 2, 1]
    mean = sum(load) / 4
    cv = math.sqrt(sum((c - mean) ** 2 for c in load) / 4) / mean
    assert stats["load_cv"].item() == pytest.approx(cv, rel=1e-6)
    assert stats["dropped_share"].item() == pytest.approx(1 / 6)
    assert stats["router_entropy"].item() == pytest.approx(entropy(probs.numpy(), axis=-1).mean(), rel=1e-5)
    assert "router_entropy" not in router_telemetry(Routing(torch.ones(6, 2), experts, None, {}), 4)


# --- the student with MoE layers --------------------------------------------------------------------------------


def test_moe_goes_where_the_config_says():
    model = tiny_moe_model(router="topk_softmax", num_experts=4, layers=[1])
    assert list(moe_layers(model)) == [1]
    assert isinstance(model.model.layers[0].mlp, SwiGLUMLP)
    out = model(torch.randint(3, 100, (2, 5)))
    assert out.aux[0] is None and out.aux[1]["tokens_per_expert"].sum().item() == 2 * 5 * 2


@pytest.mark.parametrize("router", sorted(K_OF))
def test_save_load_round_trip(tmp_path, router):
    model = tiny_moe_model(router=router, num_experts=4, top_k=K_OF[router])
    for layer in moe_layers(model).values():  # state that is not a parameter must travel too
        if hasattr(layer.router, "bias"):
            layer.router.bias.copy_(torch.tensor([0.5, -0.25, 0.0, 0.125]))
        if hasattr(layer.router, "table"):
            layer.router.table.copy_(layer.router.table.flip(0))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moe == model.config.moe
    ids = torch.randint(3, 100, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for a, b in zip(moe_layers(loaded).values(), moe_layers(model).values()):
        for name, buf in b.router.named_buffers():
            assert torch.equal(dict(a.router.named_buffers())[name], buf), name


@pytest.mark.parametrize("router", ["topk_softmax", "hash", "aux_free", "switch"])
def test_kv_cache_decoding_equals_the_full_forward(router):
    model = tiny_moe_model(router=router, num_experts=4, top_k=K_OF[router])
    ids = torch.randint(3, 100, (2, 9))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    cache = out.cache
    for t in range(5, 9):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


def test_generation_refuses_expert_choice_unless_insisted():
    model = tiny_moe_model(router="expert_choice", num_experts=4, top_k=2)
    ids = torch.randint(3, 100, (1, 6))
    with pytest.raises(ValueError, match="allow_noncausal_generation"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="expert_choice"):
        model(ids, cache=model(ids, use_cache=True).cache)
    model(ids)  # a plain forward (scoring, training) is not refused
    model.config.moe["allow_noncausal_generation"] = True
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 8)


def test_hash_routing_needs_token_ids():
    model = tiny_moe_model(router="hash", num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 32))


@pytest.mark.parametrize(
    "moe, field",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"router": "switch", "top_k": 2}, "top_k"),
        ({"router": "nope"}, "topk_softmax"),
        ({"colour": 1}, "PocketLMConfig.moe.colour"),
        ({"layers": [0, 7]}, "moe.layers"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_moe_config_errors_name_the_field(moe, field):
    with pytest.raises(ValueError, match=field):
        PocketLMConfig(num_hidden_layers=2, moe=moe)


def test_every_router_is_buildable_from_the_registry():
    assert set(ROUTERS.names()) == set(K_OF)


@pytest.mark.parametrize(
    "moe, field",
    [
        ({"top_k": 9}, "student.moe"),
        ({"router": "hash", "top_k": 2}, "top_k"),
        ({"routr": "hash"}, "student.moe.routr"),
        ({"router": "nope"}, "student.moe.router"),
        ({"capacity_factor": 0}, "student.moe.capacity_factor"),
        ({"layers": [0, 9]}, "moe.layers"),
    ],
)
def test_distill_config_moe_errors_name_the_field(moe, field):
    from pocketlm.config import ConfigError, DistillConfig, load_config

    with pytest.raises(ConfigError, match=field):
        load_config(DistillConfig, None, ["student.num_layers=4", f"student.moe={moe}"])
