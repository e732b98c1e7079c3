"""Shared-prefix packing on models that mix sliding-window and full-attention layers (issue #17, item 2).

A 4-D mask replaces the model's own in every layer, so a tree mask that carries the window limits the
full-attention layers too. Reference: one unpadded forward per request, plain transformers (`test_loglik.reference`).
Tolerance: 1e-5 relative on the summed log-probability in fp32. Seen failing on the code before the fix: max |Δ log p|
packed vs alone 2.93 (Gemma-2), 3.30 (Gemma-3), 5.27 (hybrid Qwen2), 0.15 (Cohere2), 2.91 (gpt-oss) on these models
and requests (after: ≤ 6e-6).
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    Cohere2Config, Cohere2ForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
    GptOssConfig, GptOssForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from pocketlm.eval import loglik, packing
from pocketlm.eval.loglik import score_continuations
from test_loglik import VOCAB, reference

REL_TOL = 1e-5
WINDOW = 16  # longer than the shortest probe (11 tokens), as real windows are
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, initializer_range=0.2)


def make_model(name: str, attn: str, layer_types: list[str] | None = None, window: int = WINDOW) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gemma2":
        config = Gemma2Config(**TINY, sliding_window=window, layer_types=layer_types or MIXED,
                              attn_logit_softcapping=50.0 if attn == "eager" else None)  # sdpa takes no softcap
        model = Gemma2ForCausalLM(config)
    elif name == "gemma3":  # text-only Gemma-3
        config = Gemma3TextConfig(**TINY, sliding_window=window, layer_types=layer_types or MIXED)
        model = Gemma3ForCausalLM(config)
    elif name == "qwen2":  # layers from max_window_layers on slide
        config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=window, max_window_layers=2)
        model = Qwen2ForCausalLM(config)
    elif name == "qwen2-layer-types":  # explicit layer types, full first
        config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=window, layer_types=list(reversed(MIXED)))
        model = Qwen2ForCausalLM(config)
    elif name == "cohere2":
        model = Cohere2ForCausalLM(Cohere2Config(**TINY, sliding_window=window, layer_types=MIXED))
    else:  # gpt-oss: mixture of experts, attention sinks
        config = GptOssConfig(**dict(TINY, max_position_embeddings=4096 * 32), sliding_window=window,  # YaRN's ratio
                              layer_types=MIXED, num_local_experts=4, num_experts_per_tok=2)
        model = GptOssForCausalLM(config)
    model.config._attn_implementation = attn
    return model.eval()


def shared_prefix_requests(seed: int) -> list[tuple[list[int], list[int]]]:
    """Multiple-choice items whose contexts (and so packed rows) run well past the window, plus a short single."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    reqs = []
    for n_ctx in (3 * WINDOW, 2 * WINDOW + 3, WINDOW - 2):
        ctx = tok(n_ctx)
        reqs += [(ctx, tok(rng.randint(2, WINDOW + 3))) for _ in range(3)]
    reqs.append((tok(3), tok(2)))
    return reqs


@pytest.mark.parametrize("name, attn", [
    (name, attn) for name in ("gemma2", "gemma3", "qwen2", "qwen2-layer-types", "cohere2") for attn in ("sdpa", "eager")
] + [("gpt-oss", "eager")])
def test_mixed_layer_models_pack_and_score_as_one_request_alone(name, attn):
    model = make_model(name, attn)
    reqs = shared_prefix_requests(seed=len(name))
    got = score_continuations(model, reqs, batch_size=4)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        ref_ll, ref_greedy = reference(model, ctx, cont)
        assert ll == pytest.approx(ref_ll, rel=REL_TOL, abs=1e-5)
        assert greedy == ref_greedy
    forward = loglik._Forward(model, "fp32", torch.device("cpu"))
    rows = loglik._rows(reqs, None, forward, pack=True)
    assert any(r.segments is not None and len(r) > 3 * WINDOW for r in rows)  # packed rows well past the window
    assert forward.window == {"full_attention": None, "sliding_attention": WINDOW}  # one mask per layer type


@pytest.mark.parametrize("types", [["full_attention"] * 4, ["sliding_attention"] * 4])
def test_uniform_layer_types_get_one_mask_with_their_own_window(types):
    """All full attention: no window, though the config names one (the tree mask used to apply it anyway)."""
    model = make_model("gemma2", "sdpa", layer_types=types)
    reqs = shared_prefix_requests(seed=5)
    for (ctx, cont), (ll, _) in zip(reqs, score_continuations(model, reqs, batch_size=4)):
        assert ll == pytest.approx(reference(model, ctx, cont)[0], rel=REL_TOL, abs=1e-5)
    forward = loglik._Forward(model, "fp32", torch.device("cpu"))
    assert any(r.segments is not None for r in loglik._rows(reqs, None, forward, pack=True))
    assert forward.window == (None if types[0] == "full_attention" else WINDOW)


@pytest.mark.parametrize("wrong", [True, None], ids=["window-on-every-layer", "no-window"])
def test_probe_past_the_window_refuses_a_mask_that_puts_the_window_on_the_wrong_layers(wrong):
    """One 4-D mask for all layers of a mixed model is wrong only past the window: a probe of short requests passes
    it, a probe of requests longer than the window refuses it."""
    window = WINDOW
    model = make_model("gemma3", "sdpa", window=window)
    short = loglik._Forward(model, "fp32", torch.device("cpu"))
    short.window = wrong and window
    assert short.mask_kind(span=window) == "bool"  # no request reaches the window: the window cannot matter
    assert short.mask_kind(span=4 * window) is None  # a longer call probes again, past the window
    forward = loglik._Forward(model, "fp32", torch.device("cpu"))
    forward.window = wrong and window
    assert forward.mask_kind(span=4 * window) is None
    reqs = shared_prefix_requests(seed=2)
    assert all(r.segments is None for r in loglik._rows(reqs, None, forward, pack=True))


def test_layer_windows_reads_the_config():
    assert packing.layer_windows(SimpleNamespace()) is None  # Llama
    assert packing.layer_windows(SimpleNamespace(sliding_window=4096)) == 4096  # Mistral: every layer slides
    assert packing.layer_windows(SimpleNamespace(sliding_window=None, layer_types=["full_attention"] * 2)) is None
    assert packing.layer_windows(Qwen2Config(**TINY)) is None  # Qwen2 without use_sliding_window
    assert packing.layer_windows(Gemma2Config(**TINY, sliding_window=16)) == {
        "full_attention": None, "sliding_attention": 16}
    with pytest.raises(ValueError, match="chunked_attention"):
        packing.layer_windows(SimpleNamespace(sliding_window=8, layer_types=["chunked_attention", "full_attention"]))
    with pytest.raises(ValueError, match="without a sliding_window"):
        packing.layer_windows(SimpleNamespace(sliding_window=None, layer_types=["sliding_attention"]))


def test_layer_types_a_tree_mask_cannot_express_are_never_packed():
    model = make_model("gemma2", "sdpa")
    model.config.layer_types = ["sliding_attention", "chunked_attention"] * 2
    forward = loglik._Forward(model, "fp32", torch.device("cpu"))
    assert forward.mask_kind(span=100) is None
    assert all(r.segments is None for r in loglik._rows(shared_prefix_requests(seed=1), None, forward, pack=True))


def test_per_layer_type_masks_differ_only_past_the_window():
    rows = packing.pack_requests([list(range(20)) + [50], list(range(20)) + [60, 61]], [[1], [2]], max_row_tokens=64)
    _, position_ids, masks, _ = packing.batch_tensors(rows, torch.device("cpu"), "bool",
                                                      window={"full_attention": None, "sliding_attention": 5})
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]  # [t, t]
    distance = position_ids[0][:, None] - position_ids[0][None, :]
    assert torch.equal(sliding, full & (distance < 5))
    assert bool((full & (distance >= 5)).any())  # the full-attention layers see past the window


def test_a_group_packs_up_to_exactly_the_row_cap():
    """The cap counts the row as laid out: prefix once, every member's own part (it was over by shared - p)."""
    inputs = [list(range(9)) + [20, 21, 22], list(range(9)) + [30, 31, 32, 33, 34]]
    rows = packing.pack_requests(inputs, [[1], [2]], max_row_tokens=9 + 3 + 5)
    assert len(rows) == 1 and len(rows[0]) == 17
    assert len(packing.pack_requests(inputs, [[1], [2]], max_row_tokens=16)) == 2


def test_a_vision_language_model_packs_with_its_language_models_layer_types():
    """Gemma-3 with its vision tower keeps window and layer types in ``text_config``; read only at the top, the
    tree mask had no window at all (max |Δ log p| 6.0 before)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=dict(TINY, sliding_window=WINDOW, layer_types=MIXED), vision_config=vision,
                          mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
                          eoi_token_index=VOCAB - 3)
    model = Gemma3ForConditionalGeneration(config).eval()
    model.config._attn_implementation = "sdpa"
    reqs = [([t % (VOCAB - 3) for t in c], [t % (VOCAB - 3) for t in x]) for c, x in shared_prefix_requests(seed=3)]
    for (ctx, cont), (ll, _) in zip(reqs, score_continuations(model, reqs, batch_size=4)):
        assert ll == pytest.approx(reference(model, ctx, cont)[0], rel=REL_TOL, abs=1e-5)
    forward = loglik._Forward(model, "fp32", torch.device("cpu"))
    assert any(r.segments is not None for r in loglik._rows(reqs, None, forward, pack=True))
