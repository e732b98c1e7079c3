"""The student against its own references: SDPA vs explicit attention, KV-cache decode vs full forward,
generate with vs without cache, left-padded batches vs prompts alone, save/load round trip.

All comparisons are fp32 at rtol=atol=1e-5 (both sides run the same maths in a different order)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import pocketlm  # noqa: F401  (registers the Auto classes)
from pocketlm.models.attention import (
    GroupedQueryAttention,
    RotaryEmbedding,
    build_attention_mask,
    explicit_attention,
    sdpa_attention,
)
from pocketlm.models.student import (
    PocketLMConfig,
    PocketLMForCausalLM,
    causal_lm_loss,
    register_auto_classes,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_config(**overrides) -> PocketLMConfig:
    values = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    values.update(overrides)
    return PocketLMConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> PocketLMForCausalLM:
    torch.manual_seed(seed)
    return PocketLMForCausalLM(tiny_config(**overrides)).eval()


def left_padded(lengths: list[int], seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [b, seq] (tokens 3..99) with rows left-padded to `lengths`, and the 2D mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, seq - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


# --- config ---------------------------------------------------------------------------------------------------


def test_config_defaults_and_derived_fields():
    cfg = tiny_config(num_key_value_heads=None)
    assert cfg.head_dim == 8 and cfg.num_key_value_heads == 4
    assert tiny_config(head_dim=16).head_dim == 16


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_attention_heads=5, num_key_value_heads=1), "num_attention_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(pad_token_id=100), "pad_token_id"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# --- attention paths --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_sdpa_equals_explicit_attention(n_kv, padded):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(hidden_size=32, num_heads=4, num_kv_heads=n_kv, head_dim=8, layer_idx=0)
    x = torch.randn(3, 7, 32)
    padding = left_padded([7, 4, 1], 7)[1] if padded else None
    mask = build_attention_mask(padding, 7, 0, x.dtype, x.device)
    assert (mask is None) == (not padded)
    positions = torch.arange(7).expand(3, -1)
    cos, sin = RotaryEmbedding(8, 10000.0)(positions, x.dtype)

    fast, no_probs = attn(x, cos, sin, mask)
    slow, probs = attn(x, cos, sin, mask, explicit=True)

    assert no_probs is None
    torch.testing.assert_close(fast, slow, **TOL)
    assert probs.shape == (3, 4, 7, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 7), **TOL)
    real_queries = padding.bool()[:, None, :, None] if padded else torch.ones(3, 1, 7, 1, dtype=torch.bool)
    assert (probs.triu(1) * real_queries).abs().max() == 0  # causal: nothing from the future
    if padded:  # real tokens never attend padding (pad rows see only padding and get uniform weights)
        assert probs[1, :, 3:, :3].abs().max() == 0 and probs[2, :, 6:, :6].abs().max() == 0


def test_explicit_attention_matches_a_hand_computed_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out, probs = explicit_attention(q, k, v, None)
    scores = q @ k.transpose(-2, -1) / 2.0  # √h_d = 2
    scores = scores.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1), **TOL)
    torch.testing.assert_close(out, scores.softmax(-1) @ v, **TOL)
    torch.testing.assert_close(sdpa_attention(q, k, v, None), out, **TOL)


def test_model_eager_and_capture_paths_equal_sdpa():
    model = tiny_model()
    ids, mask = left_padded([8, 5], 8)
    fast = model(ids, attention_mask=mask).logits
    captured = model(ids, attention_mask=mask, output_attentions=True)
    assert len(captured.attentions) == 2 and captured.attentions[0].shape == (2, 4, 8, 8)
    model.config._attn_implementation = "eager"
    eager = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(captured.logits[keep], fast[keep], **TOL)
    torch.testing.assert_close(eager[keep], fast[keep], **TOL)


def test_hidden_states_are_embeddings_then_each_layer():
    model = tiny_model()
    ids = torch.randint(3, 100, (1, 5))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


# --- KV cache and generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_cached_decode_equals_full_forward(explicit):
    model = tiny_model()
    ids, mask = left_padded([10, 6], 10)
    full = model(ids, attention_mask=mask, output_attentions=explicit).logits

    cache = DynamicCache()
    steps = [(0, 6), (6, 8), (8, 9), (9, 10)]  # prefill, a 2-token chunk, then single tokens
    pieces = []
    for start, end in steps:
        out = model(
            ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True, output_attentions=explicit
        )
        assert out.cache is cache and cache.get_seq_length() == end
        pieces.append(out.logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[keep], full[keep], **TOL)


def test_past_key_values_is_accepted_as_the_cache():
    model = tiny_model()
    ids = torch.randint(3, 100, (1, 6))
    first = model(ids[:, :4], use_cache=True)
    out = model(ids[:, 4:], past_key_values=first.cache)
    torch.testing.assert_close(out.logits, model(ids).logits[:, 4:], **TOL)
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=DynamicCache(), past_key_values=DynamicCache())


def test_generate_greedy_with_cache_equals_without():
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 5))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without)


def test_generate_sampling_is_seeded_and_cache_independent():
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 5))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(123)
    a = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    b = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(a, b)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_model()
    lengths = [7, 3, 5]
    ids, mask = left_padded(lengths, 7)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    for row, n in enumerate(lengths):
        alone = model.generate(ids[row : row + 1, 7 - n :], **kwargs)
        assert torch.equal(batch[row, 7:], alone[0, n:]), f"row {row}"


def test_static_cache_and_inputs_embeds_generate_the_same_tokens():
    model = tiny_model()
    ids, mask = left_padded([7, 4, 2], 7)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), dynamic)
    from_embeds = model.generate(inputs_embeds=model.model.embed_tokens(ids), **kwargs)
    assert torch.equal(from_embeds, dynamic[:, 7:])


# --- loss, composition ------------------------------------------------------------------------------------------


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 6))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert causal_lm_loss(out.logits, torch.full_like(labels, -100)).item() == 0.0


def test_an_mlp_can_return_auxiliary_outputs():
    model = tiny_model()
    dense = model.model.layers[1].mlp

    class WithAux(torch.nn.Module):  # stands in for an MoE layer: output plus a router loss
        def __init__(self):
            super().__init__()
            self.inner = dense

        def forward(self, x):
            return self.inner(x), {"router_loss": x.square().mean()}

    ids = torch.randint(3, 100, (1, 4))
    plain = model(ids)
    assert plain.aux is None
    model.model.layers[1].mlp = WithAux()
    out = model(ids)
    torch.testing.assert_close(out.logits, plain.logits)
    assert out.aux[0] is None and out.aux[1]["router_loss"].ndim == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(3, 100, (2, 6))
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        count = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *_: count.append(1))
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
        calls.append(len(count))
    assert calls == [1, 2]  # checkpointing really recomputed the block in backward
    torch.testing.assert_close(grads[0], grads[1], **TOL)


# --- weights, tying, save/load ----------------------------------------------------------------------------------


def test_random_init_follows_initializer_range():
    torch.manual_seed(0)
    model = PocketLMForCausalLM(tiny_config(hidden_size=64, intermediate_size=128, initializer_range=0.05))
    w = model.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.05) < 0.005 and abs(w.mean().item()) < 0.005
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert model.model.embed_tokens.weight[0].abs().max() == 0  # padding row, as Llama


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_and_auto_load_round_trip(tmp_path, tied):
    register_auto_classes()  # idempotent: `import pocketlm` already called it
    model = tiny_model(tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    model.save_pretrained(tmp_path)

    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "pocketlm"
    saved = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in saved) != tied
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PocketLMConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PocketLMForCausalLM
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(3, 100, (2, 6))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
