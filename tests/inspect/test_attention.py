"""Attention capture, entropy, head masks and head importance against references.

Captured student patterns equal a hand computation of layer 0 (RoPE written as 2D rotations, ALiBi from its slope
formula) and the model's own output_attentions; HF capture equals an eagerly loaded model's output_attentions;
hooks and attention implementations are restored; head importance equals central finite differences of the loss in
float64 (tolerance 1e-6 relative)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_teacher
from inspect_helpers import no_hooks_left, tiny_student

from pocketlm.inspect.attention import (
    attention_entropy,
    capture_attention,
    capture_patterns,
    head_gradients,
    head_importance,
    head_mask,
    hooks,
    per_example_loss,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def hand_layer0_pattern(model, ids: torch.Tensor, scheme: str) -> torch.Tensor:
    """Layer 0's attention [n_h, s, s] for one row of ids, written out from the weights."""
    cfg, attn = model.config, model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[0]))  # [s, d]
    s, h_d, n_h, group = ids.shape[1], cfg.head_dim, cfg.num_attention_heads, 2
    q = (x @ attn.q_proj.weight.T).view(s, n_h, h_d)
    k = (x @ attn.k_proj.weight.T).view(s, n_h // group, h_d)
    if scheme == "rotary":  # rotate each pair (j, j + h_d/2) of position p by the angle p·θ^(-2j/h_d)
        half = h_d // 2
        angle = torch.arange(s)[:, None] * cfg.rope_theta ** (-2 * torch.arange(half) / h_d)  # [s, h_d/2]
        c, sn = angle.cos()[:, None], angle.sin()[:, None]

        def rot(t):
            a, b = t[..., :half], t[..., half:]
            return torch.cat((a * c - b * sn, a * sn + b * c), -1)

        q, k = rot(q), rot(k)
    out = torch.zeros(n_h, s, s)
    for h in range(n_h):
        for i in range(s):
            scores = torch.tensor([float(q[i, h] @ k[j, h // group]) / math.sqrt(h_d) for j in range(i + 1)])
            if scheme == "alibi":
                slope = 2.0 ** (-8 * (h + 1) / n_h)
                scores = scores - slope * torch.tensor([i - j for j in range(i + 1)], dtype=torch.float32)
            out[h, i, : i + 1] = scores.softmax(-1)
    return out


@pytest.mark.parametrize("scheme", ["rotary", "alibi"])
def test_student_capture_equals_hand_computation(scheme):
    model = tiny_student(position_scheme=scheme)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    patterns = capture_patterns(model, ids)
    assert len(patterns) == 2 and patterns[0].shape == (1, 4, 6, 6)
    for p in patterns:
        torch.testing.assert_close(p.sum(-1), torch.ones(1, 4, 6), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(patterns[0][0], hand_layer0_pattern(model, ids, scheme), **TOL)
        reference = model(ids, output_attentions=True).attentions
    for got, want in zip(patterns, reference):
        torch.testing.assert_close(got, want, **TOL)
    assert model.config._attn_implementation == "sdpa" and no_hooks_left(model)


def test_hf_capture_equals_output_attentions_of_an_eager_model(tokenizer):
    from transformers import LlamaForCausalLM

    model = make_teacher(len(tokenizer))
    assert model.config._attn_implementation == "sdpa"
    config = model.config.__class__.from_dict(model.config.to_dict())
    config._attn_implementation = "eager"
    eager = LlamaForCausalLM(config)
    eager.load_state_dict(model.state_dict())
    assert eager.config._attn_implementation == "eager"
    ids = tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = eager.eval()(ids, output_attentions=True).attentions
    got = capture_patterns(model, ids)
    assert len(got) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]), **TOL)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_capture_attention_tokens_and_head_ids(tokenizer):
    maps = capture_attention(make_teacher(len(tokenizer)), tokenizer, "The cat sat.", spec="tiny")
    assert "".join(maps.tokens) == "The cat sat."
    assert maps.head_ids == [[0, 1, 2, 3]] * 4 and maps.patterns[0].shape == (4, len(maps.tokens), len(maps.tokens))
    with pytest.raises(ValueError, match="max_tokens=2"):
        capture_attention(make_teacher(len(tokenizer)), tokenizer, "The cat sat.", max_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        capture_attention(make_teacher(len(tokenizer)), tokenizer, "  ")


def test_hooks_are_removed_after_the_context_even_on_error():
    model = tiny_student()
    seen = []
    with hooks(model, [("hook_q", lambda t, i: seen.append(("q", i))), ("hook_z", lambda t, i: seen.append(("z", i)))]):
        assert not no_hooks_left(model)
        model(torch.tensor([[5, 6, 7]]))
    assert seen == [("q", 0), ("z", 0), ("q", 1), ("z", 1)]
    assert no_hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"), head_mask(model, [torch.ones(4), torch.ones(4)], via="o_proj"):
        raise RuntimeError("boom")
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match="unknown hook point 'hook_x'"), hooks(model, [("hook_x", print)]):
        pass
    assert no_hooks_left(model)


def test_a_hook_can_replace_the_pattern():
    """hook_pattern sits between the softmax and the values: a uniform causal pattern changes the output."""
    model = tiny_student()
    ids = torch.tensor([[5, 6, 7, 8]])

    def uniform(p, _layer):
        causal = torch.ones(4, 4).tril()
        return (causal / causal.sum(-1, keepdim=True)).expand_as(p)

    base = model(ids).logits
    with hooks(model, [("hook_pattern", uniform)]):
        model.config._attn_implementation = "eager"
        changed = model(ids).logits
        model.config._attn_implementation = "sdpa"
        captured = capture_patterns(model, ids)
    assert not torch.allclose(base, changed, atol=1e-3)
    torch.testing.assert_close(captured[1][0, 0], torch.ones(4, 4).tril() / torch.arange(1, 5)[:, None], **TOL)


def test_attention_entropy_against_hand_values():
    uniform = torch.ones(3, 3).tril() / torch.arange(1, 4)[:, None]  # row i uniform over i+1 keys
    one_hot = torch.eye(3)
    got = attention_entropy(torch.stack([uniform, one_hot]))
    torch.testing.assert_close(got, torch.tensor([(0 + math.log(2) + math.log(3)) / 3, 0.0]))


def test_head_mask_routes_agree_and_zero_heads_change_the_output(tokenizer):
    model = tiny_student()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    masks = [torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.tensor([[0.0, 1.0, 1.0, 2.0], [1.0, 1.0, 0.0, 1.0]])]
    with head_mask(model, masks, via="hook_z"):
        inside = model(ids).logits
    with head_mask(model, masks, via="o_proj"):
        outside = model(ids).logits
    torch.testing.assert_close(inside, outside, **TOL)
    assert not torch.allclose(inside, model(ids).logits, atol=1e-3)
    with pytest.raises(ValueError, match="layer 0 has 4 heads"), head_mask(model, [torch.ones(3), torch.ones(4)]):
        pass
    teacher = make_teacher(len(tokenizer))
    with head_mask(teacher, [torch.ones(4)] * 4):
        torch.testing.assert_close(teacher(ids).logits, make_teacher(len(tokenizer))(ids).logits, **TOL)


def _finite_difference(model, ids, layer, heads, eps=1e-4) -> torch.Tensor:
    """Central difference of each row's mean loss in the mask of `heads` of `layer` (scaled together)."""
    counts = [4] * len(model.config.to_dict().get("kept_kv_heads") or [0] * model.config.num_hidden_layers)
    losses = []
    for sign in (1, -1):
        masks = [torch.ones(n, dtype=torch.float64) for n in counts]
        masks[layer][heads] += sign * eps
        with torch.no_grad(), head_mask(model, masks):
            losses.append(per_example_loss(model(ids).logits, ids))
    return (losses[0] - losses[1]) / (2 * eps)  # [b]


def _check_importance_against_finite_differences(model, ids):
    grads = head_gradients(model, ids)
    imp = head_importance(model, ids, batch_size=2)  # two batches: the expectation spans them
    for layer in range(len(grads)):
        for h in range(4):
            fd = _finite_difference(model, ids, layer, [h])
            torch.testing.assert_close(grads[layer][:, h].double(), fd, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(imp.per_head[layer][h].double(), fd.abs().mean(), rtol=1e-5, atol=1e-9)
        for g in range(2):
            fd = _finite_difference(model, ids, layer, [2 * g, 2 * g + 1])
            torch.testing.assert_close(imp.per_group[layer][g].double(), fd.abs().mean(), rtol=1e-5, atol=1e-9)
    assert imp.n_examples == ids.shape[0]


def test_head_importance_equals_finite_differences_on_the_student():
    model = tiny_student(dtype=torch.float64)
    ids = torch.randint(3, 100, (3, 8), generator=torch.Generator().manual_seed(4))
    _check_importance_against_finite_differences(model, ids)
    assert all(p.grad is None for p in model.parameters())  # only the masks were differentiated


def test_head_importance_equals_finite_differences_on_a_hf_llama(tokenizer, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def rms_norm_in_fp64(self, x):  # Llama's norm computes in fp32 even in an fp64 model; the check needs fp64
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_in_fp64)
    model = make_teacher(len(tokenizer), layers=2).double()
    ids = torch.randint(3, len(tokenizer), (3, 8), generator=torch.Generator().manual_seed(5))
    _check_importance_against_finite_differences(model, ids)
