"""Importance and structured pruning (models/importance.py, models/pruning.py).

Oracles, none of them the code under test:
- importance: a hand-written float64 forward pass of the model (embedding, RMSNorm, rotary, causal softmax, SwiGLU),
  checked itself against the model's logits, from which every score is computed by its definition; removal
  perplexity from the model with the layer taken out of its ModuleList and `F.cross_entropy`;
- pruning: the unpruned model with the removed channels / groups zeroed and the removed layers taken out, which
  must give the pruned model's logits to 1e-5 (float64);
- export: transformers' LlamaForCausalLM loaded from the exported folder.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pocketlm.models.importance import Importance, compute_importance
from pocketlm.models.pruning import (
    PruneTarget, PruneTargetError, choose_target, non_embedding_params, plan_pruning, prune,
)
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM


def tiny(seed: int = 0, layers: int = 4, tied: bool = True) -> PocketLMForCausalLM:
    torch.manual_seed(seed)
    conf = PocketLMConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = PocketLMForCausalLM(conf).double().eval()
    with torch.no_grad():  # larger weights than the init's 0.02, so that scores differ clearly between parts
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
    return model


def blocks(n: int = 6, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------- a float64 reference forward
def _rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rotate(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[:, None].double() * inv[None]  # [s, hd/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_forward(model: PocketLMForCausalLM, ids: torch.Tensor) -> dict:
    """Every intermediate the scores are defined on, for one batch, by the definitions (float64)."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    eps, hd, nh, nkv = c.rms_norm_eps, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    b, s = ids.shape
    x = sd["model.embed_tokens.weight"][ids]  # [b, s, d]
    pos = torch.arange(s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    rec = {"x_in": [], "x_out": [], "mlp_act": [], "z": [], "norm_out": []}
    for i in range(c.num_hidden_layers):
        p = lambda n: sd[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        rec["x_in"].append(x)
        h = _rms(x, p("input_layernorm"), eps)
        rec["norm_out"].append(h)
        q = (h @ p("self_attn.q_proj").T).view(b, s, nh, hd).transpose(1, 2)
        k = (h @ p("self_attn.k_proj").T).view(b, s, nkv, hd).transpose(1, 2)
        v = (h @ p("self_attn.v_proj").T).view(b, s, nkv, hd).transpose(1, 2)
        q, k = _rotate(q, pos, c.rope_theta), _rotate(k, pos, c.rope_theta)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        z = (att @ v).transpose(1, 2).reshape(b, s, nh * hd)  # [b, s, n_h·h_d]
        rec["z"].append(z)
        x = x + z @ p("self_attn.o_proj").T
        h2 = _rms(x, p("post_attention_layernorm"), eps)
        rec["norm_out"].append(h2)
        a = F.silu(h2 @ p("mlp.gate_proj").T) * (h2 @ p("mlp.up_proj").T)
        rec["mlp_act"].append(a)
        x = x + a @ p("mlp.down_proj").T
        rec["x_out"].append(x)
    hf = _rms(x, sd["model.norm.weight"], eps)
    rec["norm_out"].append(hf)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    rec["logits"] = hf @ head.T
    return rec


def brute_importance(model, data: torch.Tensor) -> dict:
    c = model.config
    rec = reference_forward(model, data)
    with torch.no_grad():
        assert torch.allclose(rec["logits"], model(input_ids=data, use_cache=False).logits, atol=1e-5)  # oracle ok
    # (the model builds its rotary tables in float32: 1e-6 apart from this float64 reference)
    n = data.numel()
    group_width = c.num_attention_heads // c.num_key_value_heads * c.head_dim
    out = {
        "bi": [1 - F.cosine_similarity(a, b, dim=-1).mean().item() for a, b in zip(rec["x_in"], rec["x_out"])],
        "mlp": [a.abs().reshape(n, -1).mean(0) for a in rec["mlp_act"]],
        "kv": [torch.stack([z[..., g * group_width:(g + 1) * group_width].norm(dim=-1).mean()
                            for g in range(c.num_key_value_heads)]) for z in rec["z"]],
        "hidden": sum(h.abs().reshape(n, -1).mean(0) for h in rec["norm_out"]),
    }
    return out


def test_importance_equals_brute_force():
    model, data = tiny(), blocks()
    imp = compute_importance(model, data, batch_size=4, removal_blocks=3)
    ref = brute_importance(model, data)
    assert imp.n_tokens == data.numel() and imp.n_blocks == len(data)
    torch.testing.assert_close(torch.tensor(imp.block_influence, dtype=torch.float64), torch.tensor(ref["bi"], dtype=torch.float64),
                               rtol=1e-6, atol=1e-8)
    for i in range(model.config.num_hidden_layers):
        torch.testing.assert_close(torch.tensor(imp.mlp[i], dtype=torch.float64), ref["mlp"][i], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(torch.tensor(imp.kv_groups[i], dtype=torch.float64), ref["kv"][i], rtol=1e-6,
                                   atol=1e-8)
    torch.testing.assert_close(torch.tensor(imp.hidden, dtype=torch.float64), ref["hidden"], rtol=1e-6, atol=1e-8)
    # removal: the model with the layer taken out of its list, cross-entropy over the first 3 blocks
    sub = data[:3]

    def ppl(m):
        with torch.no_grad():
            logits = m(input_ids=sub[:, :-1], use_cache=False).logits
        return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sub[:, 1:].reshape(-1)).item())

    assert imp.base_perplexity == pytest.approx(ppl(model), rel=1e-9)
    layers = model.model.layers
    for i in range(len(layers)):
        model.model.layers = torch.nn.ModuleList(l for j, l in enumerate(layers) if j != i)
        try:
            assert imp.removal_perplexity[i] == pytest.approx(ppl(model), rel=1e-9)
        finally:
            model.model.layers = layers
    assert imp.removal_increase == pytest.approx([p - imp.base_perplexity for p in imp.removal_perplexity])


def test_importance_leaves_the_model_unchanged_and_round_trips(tmp_path):
    model, data = tiny(), blocks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    imp = compute_importance(model, data, removal_blocks=2)
    assert model.training and not model.model.layers[0]._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = Importance.read(imp.write(tmp_path / "importance.json"))
    assert again.to_dict() == imp.to_dict()
    (tmp_path / "bad.json").write_text('{"importance": {"block_influence": [1, "x"]}}')
    with pytest.raises(ValueError, match="bad.json"):
        Importance.read(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------- pruning parity
def zeroed_reference(model: PocketLMForCausalLM, plan) -> PocketLMForCausalLM:
    """The unpruned model with every removed channel / group zeroed and every removed layer taken out."""
    import copy

    ref = copy.deepcopy(model)
    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    hd = c.head_dim
    drop_h = [i for i in range(c.hidden_size) if i not in plan.hidden_channels]
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, drop_h] = 0
        for i, layer in enumerate(ref.model.layers):
            if i not in plan.layers:
                continue
            j = plan.layers.index(i)
            drop_f = [f for f in range(c.intermediate_size) if f not in plan.mlp_channels[j]]
            layer.mlp.gate_proj.weight[drop_f] = 0
            layer.mlp.down_proj.weight[drop_h] = 0
            for g in range(c.num_key_value_heads):
                if g not in plan.kv_groups[j]:
                    layer.self_attn.o_proj.weight[:, g * group * hd:(g + 1) * group * hd] = 0
            layer.self_attn.o_proj.weight[drop_h] = 0
        ref.model.layers = torch.nn.ModuleList(ref.model.layers[i] for i in plan.layers)
    return ref


@pytest.mark.parametrize("target", [
    PruneTarget(num_layers=3, intermediate_size=40, num_key_value_heads=1, hidden_size=32),
    PruneTarget(hidden_size=36),
    PruneTarget(num_key_value_heads=1),
    PruneTarget(intermediate_size=16),
    PruneTarget(num_layers=2, depth_metric="perplexity"),
    PruneTarget(target_params=0.5),
    PruneTarget(target_params="50%", axis="depth"),
], ids=["all-axes", "hidden", "kv-groups", "mlp", "depth-by-perplexity", "half-width", "half-depth"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_pruned_logits_equal_the_zeroed_model(target, tied):
    model, data = tiny(tied=tied), blocks()
    imp = compute_importance(model, data, removal_blocks=2)
    pruned, plan = prune(model, imp, target)
    ref = zeroed_reference(model, plan)
    ids = blocks(3, 16, seed=7)
    with torch.no_grad():
        got = pruned(input_ids=ids, use_cache=False).logits
        want = ref(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    c = pruned.config
    assert c.num_hidden_layers == len(plan.layers) and c.hidden_size == len(plan.hidden_channels)
    assert plan.non_embedding_params == sum(p.numel() for n, p in pruned.named_parameters()
                                            if not n.startswith(("model.embed_tokens", "lm_head")))
    assert pruned.config.tie_word_embeddings == tied
    if tied:
        assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()


def test_plan_keeps_the_most_important_parts():
    model, data = tiny(), blocks()
    imp = compute_importance(model, data, removal_blocks=0)
    plan = plan_pruning(model, imp, PruneTarget(num_layers=2, intermediate_size=8, hidden_size=24))
    bi = imp.block_influence
    assert sorted(plan.layers) == plan.layers
    assert min(bi[i] for i in plan.layers) >= max(bi[i] for i in range(4) if i not in plan.layers)
    for j, i in enumerate(plan.layers):
        kept = plan.mlp_channels[j]
        assert min(imp.mlp[i][f] for f in kept) >= max(imp.mlp[i][f] for f in range(64) if f not in kept)
    assert min(imp.hidden[h] for h in plan.hidden_channels) >= max(
        imp.hidden[h] for h in range(48) if h not in plan.hidden_channels)


def test_pruned_model_exports_to_llama_and_trains(tmp_path):
    from transformers import LlamaForCausalLM

    from pocketlm.models.hf_export import export_llama

    model, data = tiny(), blocks()
    pruned, _ = prune(model, compute_importance(model, data, removal_blocks=0),
                      PruneTarget(num_layers=3, intermediate_size=40, num_key_value_heads=1, hidden_size=32))
    pruned = pruned.float()
    export_llama(pruned, tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ids = blocks(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, pruned(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW(pruned.parameters(), lr=1e-2)
    pruned.train()
    first = None
    for _ in range(5):
        loss = pruned(input_ids=data, labels=data, use_cache=False).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first


# ------------------------------------------------------------------------------------------- targets
def smollm_shape(layers: int = 30) -> PocketLMConfig:
    return PocketLMConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def test_non_embedding_params_of_smollm2_135m():
    # SmolLM2-135M: 134,515,008 parameters in all, 49152 × 576 of them the tied embedding
    assert non_embedding_params(smollm_shape()) == 134_515_008 - 49152 * 576


@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.25])
def test_target_params_rules(fraction):
    c = smollm_shape()
    full = non_embedding_params(c)
    depth = choose_target(c, PruneTarget(target_params=fraction, axis="depth"))
    n = depth["num_layers"]
    closest = min(range(1, 31), key=lambda k: abs(non_embedding_params(smollm_shape(k)) - fraction * full))
    assert n == closest
    width = choose_target(c, PruneTarget(target_params=fraction))
    h, f = width["hidden_size"], width["intermediate_size"]
    conf = PocketLMConfig(**{**c.to_dict(), "hidden_size": h, "intermediate_size": f, "head_dim": 64})
    assert h % 9 == 0 and h % 8 == 0 and f % 32 == 0
    assert non_embedding_params(conf) <= fraction * full  # fits the target ...
    conf_more = PocketLMConfig(**{**c.to_dict(), "hidden_size": h, "intermediate_size": f + 32, "head_dim": 64})
    assert f == 1536 or non_embedding_params(conf_more) > fraction * full  # ... with the widest MLP that fits
    assert abs(h / 576 - f / 1536) < 0.2  # both shrunk together


def test_target_params_50_percent_of_smollm2():
    c = smollm_shape()
    assert choose_target(c, PruneTarget(target_params="50%", axis="depth")) == {"num_layers": 15}
    assert choose_target(c, PruneTarget(target_params="50%")) == {"hidden_size": 360, "intermediate_size": 1120}


@pytest.mark.parametrize("target, field", [
    (PruneTarget(num_layers=5), "num_layers"),
    (PruneTarget(num_layers=0), "num_layers"),
    (PruneTarget(intermediate_size=65), "intermediate_size"),
    (PruneTarget(num_key_value_heads=3), "num_key_value_heads"),
    (PruneTarget(hidden_size=30), "hidden_size"),  # not divisible by the 4 heads
    (PruneTarget(hidden_size=49), "hidden_size"),
    (PruneTarget(target_params=0), "target_params"),
    (PruneTarget(target_params="150%"), "target_params"),
    (PruneTarget(target_params="half"), "target_params"),
    (PruneTarget(target_params=0.5, num_layers=2), "not both"),
    (PruneTarget(), "no pruning target"),
    (PruneTarget(target_params=0.5, axis="diagonal"), "axis"),
    (PruneTarget(target_params=0.001, axis="depth"), "target_params"),
    (PruneTarget(target_params=0.001), "target_params"),  # no width fits
])
def test_bad_targets_are_named_before_any_work(target, field):
    with pytest.raises(PruneTargetError, match=field):
        choose_target(tiny().config, target)


def test_a_target_whose_heads_do_not_divide_the_hidden_size_is_refused():
    # hidden 40, 4 heads of 10, 4 KV heads: keeping 3 KV groups leaves 3 heads, and 40 % 3 != 0
    c = PocketLMConfig(vocab_size=97, hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4)
    with pytest.raises(PruneTargetError, match="num_key_value_heads: hidden size 40 is not divisible by the 3"):
        choose_target(c, PruneTarget(num_key_value_heads=3))
    assert choose_target(c, PruneTarget(num_key_value_heads=2)) == {"num_key_value_heads": 2}  # 2 heads divide 40
    # with GQA the heads that remain are the kept groups' (2 KV groups of 2 → hidden 42 is fine with 1 group)
    assert choose_target(tiny().config, PruneTarget(num_key_value_heads=1, hidden_size=42)) == {
        "num_key_value_heads": 1, "hidden_size": 42}


def test_ranking_by_removal_perplexity_needs_it_measured():
    with pytest.raises(PruneTargetError, match="depth_metric"):
        choose_target(tiny().config, PruneTarget(num_layers=2, depth_metric="perplexity"), removal_blocks=0)
    from pocketlm.config import DistillConfig

    with pytest.raises(ValueError, match="depth_metric"):
        DistillConfig.model_validate({"student": {"init": "pruned", "num_layers": 2, "pruning": {
            "depth_metric": "perplexity", "removal_blocks": 0}}})


def test_heads_of_an_alibi_model_are_not_removed():
    torch.manual_seed(0)
    conf = PocketLMConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, position_scheme="alibi")
    with pytest.raises(PruneTargetError, match="num_key_value_heads: this model's alibi positions"):
        choose_target(conf, PruneTarget(num_key_value_heads=1))
    assert choose_target(conf, PruneTarget(intermediate_size=32)) == {"intermediate_size": 32}  # other axes: fine


def test_moe_and_head_pruned_models_are_refused():
    from pocketlm.config import MoEConfig
    from pocketlm.inspect.prune import prune_student
    from pocketlm.models.upcycle import upcycle

    model = tiny()
    imp = compute_importance(model, blocks(), removal_blocks=0)
    moe = upcycle(model.float(), MoEConfig(num_experts=2, top_k=1))
    with pytest.raises(PruneTargetError, match="dense"):
        plan_pruning(moe, imp, PruneTarget(num_layers=2))
    with pytest.raises(PruneTargetError, match="dense"):
        choose_target(moe.config, PruneTarget(num_layers=2))  # refused on the config alone, before any work
    head_pruned = prune_student(model.float(), {0: [1]})
    with pytest.raises(PruneTargetError, match="prune-heads"):
        choose_target(head_pruned.config, PruneTarget(num_layers=2))
    with pytest.raises(PruneTargetError, match="another shape"):
        plan_pruning(tiny(layers=3), imp, PruneTarget(num_layers=2))
