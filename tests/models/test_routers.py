"""Routers against their definitions: top-k and its balance loss vs transformers' Mixtral function, z-loss vs its
formula, switch capacity drops counted exactly, expert choice filling every expert (and not being causal), hash
routing fixed, and the aux-free bias moving load towards balance."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from pocketlm.config import MoEConfig
from pocketlm.models.moe import router_telemetry
from pocketlm.models.routers import (
    AuxFreeRouter, ExpertChoiceRouter, HashRouter, SwitchRouter, TopKSoftmaxRouter, build_router,
    load_balancing_loss, router_z_loss,
)


def pinned_switch(choices: list[int], E: int = 4, capacity_factor: float = 1.0) -> tuple[SwitchRouter, torch.Tensor]:
    """A switch router and inputs [1, n, E] whose token t goes to expert choices[t] (one-hot inputs, identity
    router weights scaled up so the choice is certain)."""
    router = SwitchRouter(E, E, 1, capacity_factor=capacity_factor)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(E) * 10)
    x = torch.nn.functional.one_hot(torch.tensor(choices), E).float().unsqueeze(0)
    return router, x


def test_topk_softmax_picks_the_top_k_and_renormalises():
    router = TopKSoftmaxRouter(16, 6, 2)
    x = torch.randn(3, 5, 16)
    r = router(x)
    probs = torch.softmax(x.reshape(-1, 16) @ router.proj.weight.T, -1)
    for t in range(15):
        best = sorted(range(6), key=lambda e: -probs[t, e].item())[:2]
        assert r.experts[t].tolist() == best
        expected = probs[t, best] / probs[t, best].sum()
        torch.testing.assert_close(r.weights[t], expected, rtol=1e-6, atol=1e-6)


def test_balance_loss_equals_transformers_mixtral_function():
    router = TopKSoftmaxRouter(16, 8, 2, balance_coef=0.02)
    x = torch.randn(2, 12, 16)
    r = router(x)
    gate_logits = (x.reshape(-1, 16) @ router.proj.weight.T,)
    expected = load_balancing_loss_func(gate_logits, num_experts=8, top_k=2)
    torch.testing.assert_close(r.losses["balance_loss"], 0.02 * expected, rtol=1e-5, atol=1e-7)
    uniform = load_balancing_loss(torch.full((8, 4), 0.25), torch.arange(8).remainder(4)[:, None], 4)
    assert uniform.item() == pytest.approx(1.0)  # perfectly balanced top-1: E · Σ (1/E)(1/E) = 1


def test_z_loss_is_the_squared_logsumexp():
    logits = torch.randn(7, 5) * 3
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    router = TopKSoftmaxRouter(4, 5, 2, z_loss_coef=1e-3)
    x = torch.randn(1, 7, 4)
    torch.testing.assert_close(router(x).losses["z_loss"], 1e-3 * router_z_loss(router.proj(x).reshape(-1, 5)))
    assert "z_loss" not in TopKSoftmaxRouter(4, 5, 2)(x).losses


def test_switch_drops_over_capacity_in_token_order_and_counts_them_exactly():
    choices = [0, 0, 1, 0, 3, 0, 0, 3]  # expert 0 gets 5, 1 gets 1, 3 gets 2; capacity ceil(1.0·8/4) = 2
    router, x = pinned_switch(choices)
    assert router.capacity(8) == 2
    r = router.train()(x)
    assert r.experts[:, 0].tolist() == [0, 0, 1, -1, 3, -1, -1, 3]  # the third and later token for expert 0 drop
    assert r.weights[[3, 5, 6], 0].tolist() == [0.0, 0.0, 0.0]
    stats = router_telemetry(r, 4)
    assert stats["dropped_share"].item() == 3 / 8
    assert stats["tokens_per_expert"].tolist() == [2, 1, 0, 2]
    r_eval = router.eval()(x)  # evaluation routes every token
    assert r_eval.experts[:, 0].tolist() == choices and router_telemetry(r_eval, 4)["dropped_share"].item() == 0


@pytest.mark.parametrize("cf, dropped", [(0.5, 5), (1.0, 3), (2.0, 1), (4.0, 0)])
def test_switch_dropped_count_follows_the_capacity_factor(cf, dropped):
    choices = [0, 0, 1, 0, 3, 0, 0, 3]
    router, x = pinned_switch(choices, capacity_factor=cf)
    cap = math.ceil(cf * 8 / 4)
    assert sum(max(0, choices.count(e) - cap) for e in range(4)) == dropped
    assert (router.train()(x).experts < 0).sum().item() == dropped


def test_switch_weight_is_the_router_probability_and_balance_counts_before_drops():
    router, x = pinned_switch([0, 0, 0, 1], E=2, capacity_factor=0.5)
    r = router.train()(x)
    probs = torch.softmax(x.reshape(-1, 2) @ router.proj.weight.T, -1)
    torch.testing.assert_close(r.weights[:, 0], probs.max(-1).values * (r.experts[:, 0] >= 0))
    router.balance_coef = 1.0
    f = torch.tensor([3 / 4, 1 / 4])  # before the capacity drop
    expected = 2 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(router.train()(x).losses["balance_loss"], expected)


def test_expert_choice_fills_every_expert_with_its_top_tokens_per_sequence():
    router = ExpertChoiceRouter(8, 4, 2)
    x = torch.randn(3, 10, 8)
    r = router(x)
    cap = router.capacity(10)
    assert cap == 5  # ceil(2 · 10 / 4)
    probs = torch.softmax(x @ router.proj.weight.T, -1)  # [b, s, E]
    experts = r.experts.view(3, 10, 4)
    for b in range(3):
        for e in range(4):
            chosen = set((experts[b, :, e] == e).nonzero().flatten().tolist())
            assert chosen == set(probs[b, :, e].topk(cap).indices.tolist())
    assert ((r.experts >= 0) == (r.weights > 0)).all()
    torch.testing.assert_close(r.weights[r.experts >= 0], probs.reshape(30, 4)[r.experts >= 0])


def test_expert_choice_is_not_causal_and_topk_is():
    ec, tk = ExpertChoiceRouter(8, 4, 1), TopKSoftmaxRouter(8, 4, 1)
    assert not ec.causal_safe and tk.causal_safe
    with torch.no_grad():
        ec.proj.weight.copy_(torch.eye(4, 8))
    x = torch.randn(1, 12, 8)
    x[0, -1] = 0
    x[0, -1, 0] = -100.0  # the last token is expert 0's least likely pick...
    later = x.clone()
    later[0, -1, 0] = 100.0  # ...until it becomes its likeliest, and takes a place an earlier token held
    assert not torch.equal(ec(x).experts[:-1], ec(later).experts[:-1])
    assert torch.equal(tk(x).experts[:-1], tk(later).experts[:-1])


def test_hash_routing_is_a_fixed_balanced_map_of_token_ids():
    router = HashRouter(8, 4, 1, vocab_size=103, layer_idx=2)
    ids = torch.tensor([[5, 9, 5, 77], [9, 5, 1, 2]])
    r1 = router(torch.randn(2, 4, 8), ids)
    r2 = router(torch.randn(2, 4, 8) * 100, ids)  # other hidden states (other contexts): same routes
    assert torch.equal(r1.experts, r2.experts)
    flat = r1.experts[:, 0].tolist()
    assert flat[0] == flat[2] == flat[5]  # token 5, wherever it is
    assert torch.equal(r1.experts[:, 0], router.table[ids.reshape(-1)])
    assert r1.weights.eq(1).all() and r1.probs is None and r1.losses == {}
    counts = torch.bincount(router.table, minlength=4)
    assert counts.max() - counts.min() <= 1  # balanced over the vocabulary
    again = HashRouter(8, 4, 1, vocab_size=103, layer_idx=2)
    other_layer = HashRouter(8, 4, 1, vocab_size=103, layer_idx=3)
    assert torch.equal(again.table, router.table) and not torch.equal(other_layer.table, router.table)
    assert list(router.parameters()) == []  # nothing learned


def test_aux_free_bias_moves_load_towards_balance():
    torch.manual_seed(0)
    router = AuxFreeRouter(8, 4, 1, bias_update_rate=0.02)
    with torch.no_grad():
        router.proj.weight.normal_(0, 1.0)
        router.proj.weight[0] += 1.0  # tokens (inputs mostly positive) crowd onto expert 0
    x = torch.randn(1, 256, 8) + 0.5
    first = router_telemetry(router(x), 4)
    load = first["tokens_per_expert"]
    router.after_step(load)
    expected = 0.02 * torch.sign(load.mean() - load)  # γ·sign(mean − load), from a zero bias
    assert load[0] == load.max() and torch.equal(router.bias, expected)
    cvs = [first["load_cv"].item()]
    for _ in range(30):
        stats = router_telemetry(router(x), 4)
        router.after_step(stats["tokens_per_expert"])
        cvs.append(stats["load_cv"].item())
    assert cvs[0] > 0.8 and max(cvs[-5:]) < 0.2
    r = router(x)  # the bias steers selection only: the weight is the renormalised affinity (1 for top-1)
    assert r.weights.eq(1).all()


@pytest.mark.parametrize("top_k", [2, 3])
def test_aux_free_bias_picks_experts_but_weights_are_the_unbiased_affinities(top_k):
    """DeepSeek-V3 (Liu et al., 2024, eq. 16-17): experts are the top-k of sigmoid affinity + bias, and each chosen
    expert's weight is its *un-biased* affinity, renormalised over the chosen ones. Brute force in float64, with a
    bias large enough to change the selection of most tokens, so a bias leaking into the weights is seen."""
    torch.manual_seed(1)
    router = AuxFreeRouter(16, 6, top_k)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.0, 0.6, -0.4, 0.3, -0.2, 0.5]))
    x = torch.randn(2, 20, 16)
    r = router(x)
    scores = torch.sigmoid(x.reshape(-1, 16).double() @ router.proj.weight.double().T)  # [n, E]
    bias = router.bias.double().tolist()
    changed = 0
    for t in range(40):
        row = scores[t].tolist()
        chosen = sorted(range(6), key=lambda e: -(row[e] + bias[e]))[:top_k]
        unbiased = sorted(range(6), key=lambda e: -row[e])[:top_k]
        changed += set(chosen) != set(unbiased)
        assert sorted(r.experts[t].tolist()) == sorted(chosen)
        by_expert = dict(zip(r.experts[t].tolist(), r.weights[t].tolist()))
        total = sum(row[e] for e in chosen)
        for e in chosen:
            assert by_expert[e] == pytest.approx(row[e] / total, rel=1e-6, abs=1e-7)
        # the probabilities reported for telemetry and balance losses are the un-biased affinities, normalised
        torch.testing.assert_close(r.probs[t].double(), scores[t] / scores[t].sum(), rtol=1e-6, atol=1e-7)
    assert changed >= 10  # the bias really steers the selection in this fixture


def test_build_router_passes_the_config():
    moe = MoEConfig(router="switch", top_k=1, capacity_factor=2.0, balance_coef=0.3, z_loss_coef=0.1).model_dump()
    router = build_router("switch", 16, moe, vocab_size=50, layer_idx=0)
    assert (router.capacity_factor, router.balance_coef, router.z_loss_coef) == (2.0, 0.3, 0.1)


# ---------------------------------------------------------------------------------------------- mutation survivors
# Tests added for mutants that survived mutmut (docs/MUTATION.md).


def test_load_balancing_loss_with_empty_slots_and_one_token_by_brute_force():
    """Empty slots (-1) count for no expert; one token divides by 1."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    experts = torch.tensor([[0, -1], [1, 2]])
    f = [1 / 2, 1 / 2, 1 / 2]  # slot choices per expert / tokens
    p = [0.3, 0.45, 0.25]
    want = 3 * sum(a * b for a, b in zip(f, p))
    assert load_balancing_loss(probs, experts, 3).item() == pytest.approx(want, rel=1e-12)
    one = load_balancing_loss(probs[:1], experts[:1], 3)
    assert one.item() == pytest.approx(3 * 0.5, rel=1e-12)


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_zero_balance_coef_adds_no_loss_and_probs_are_returned(router):
    r = (TopKSoftmaxRouter(8, 4, 2) if router == "topk" else SwitchRouter(8, 4, 1))(torch.randn(2, 3, 8))
    assert "balance" not in r.losses and r.losses == {}
    assert r.probs is not None and r.probs.shape == (6, 4)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(6))


def test_expert_choice_returns_its_token_probabilities():
    router = ExpertChoiceRouter(8, 4, 1)
    x = torch.randn(2, 5, 8)
    r = router(x)
    torch.testing.assert_close(r.probs, torch.softmax(x @ router.proj.weight.T, -1).reshape(10, 4))


def test_single_expert_routers_refuse_top_k_above_one_by_name():
    with pytest.raises(ValueError, match="top_k"):
        SwitchRouter(8, 4, 2)
    with pytest.raises(ValueError, match="top_k"):
        HashRouter(8, 4, 2, vocab_size=10)


def test_build_router_passes_the_bias_rate_and_the_layer():
    moe = MoEConfig(router="aux_free", top_k=2, bias_update_rate=0.05).model_dump()
    assert build_router("aux_free", 16, moe, vocab_size=50, layer_idx=0).bias_update_rate == 0.05
    hashed = MoEConfig(router="hash", top_k=1).model_dump()
    tables = [build_router("hash", 16, hashed, vocab_size=50, layer_idx=i).table for i in (0, 3)]
    assert not torch.equal(*tables)
