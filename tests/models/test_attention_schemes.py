"""Position schemes (rotary / ALiBi / none), sliding windows and MHA/GQA/MQA against their references.

SDPA vs explicit attention is checked for every scheme × head layout × window in fp32 at rtol=atol=1e-5; ALiBi
against a bias built by hand from Press et al.'s slopes; the window against a hand-built mask; KV-cache decoding
against the full forward; and the Llama export refuses what Llama cannot compute."""
from __future__ import annotations

import itertools

import pytest
import torch

import pocketlm  # noqa: F401  (registers the Auto classes)
from pocketlm.models.attention import (
    POSITION_SCHEMES,
    GroupedQueryAttention,
    alibi_slopes,
    build_attention_mask,
    build_position_scheme,
    explicit_attention,
)
from pocketlm.models.hf_export import export_llama
from pocketlm.models.student import PocketLMConfig
from test_student import tiny_config, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)
SCHEMES = ["rotary", "alibi", "none"]
LAYOUTS = {"MHA": 4, "GQA": 2, "MQA": 1}


def test_registry_names_and_unknown_scheme():
    assert POSITION_SCHEMES.names() == ["alibi", "none", "rotary"]
    with pytest.raises(ValueError, match="position_scheme 'sinusoid' is unknown; valid: alibi, none, rotary"):
        tiny_config(position_scheme="sinusoid")


@pytest.mark.parametrize("overrides, field", [
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=2.5), "sliding_window"),
    (dict(kept_kv_heads=[[0]]), "kept_kv_heads"),
    (dict(kept_kv_heads=[[0], [2]]), r"kept_kv_heads\[1\]"),
    (dict(kept_kv_heads=[[1, 0], [0]]), r"kept_kv_heads\[0\]"),
    (dict(kept_kv_heads=[[], [0]]), r"kept_kv_heads\[0\]"),
])  # fmt: skip
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_odd_head_dim_is_fine_without_rotary():
    with pytest.raises(ValueError, match="head_dim must be even"):
        tiny_config(head_dim=7)
    assert tiny_config(head_dim=7, position_scheme="alibi").head_dim == 7


def test_config_without_new_fields_loads_as_rotary_full_context(tmp_path):
    cfg = tiny_config().to_dict()
    for key in ("position_scheme", "sliding_window", "kept_kv_heads"):
        cfg.pop(key)
    old = PocketLMConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    assert (old.position_scheme, old.sliding_window, old.kept_kv_heads) == ("rotary", None, None)
    saved = tiny_config(position_scheme="alibi", sliding_window=3, kept_kv_heads=[[1], [0, 1]])
    saved.save_pretrained(tmp_path)
    back = PocketLMConfig.from_pretrained(tmp_path)
    assert (back.position_scheme, back.sliding_window, back.kept_kv_heads) == ("alibi", 3, [[1], [0, 1]])


# --- ALiBi ------------------------------------------------------------------------------------------------------


def test_alibi_slopes_are_press_et_al():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every other 8-head slope: 2^-1, 2^-3
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0**-e for e in (2, 4, 6, 8, 1, 3)]))
    torch.testing.assert_close(alibi_slopes(1), torch.tensor([2.0**-8]))


def test_alibi_bias_equals_a_hand_built_bias():
    cfg = tiny_config(position_scheme="alibi")
    past, s = 2, 3
    bias = build_position_scheme(cfg).bias(s, past, torch.float32, torch.device("cpu"))
    slopes = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    hand = torch.zeros(1, 4, s, past + s)
    for h, i, j in itertools.product(range(4), range(s), range(past + s)):
        if j <= past + i:
            hand[0, h, i, j] = -slopes[h] * (past + i - j)
    mask = build_attention_mask(None, s, past, torch.float32, torch.device("cpu"), bias=bias)
    allowed = mask > torch.finfo(torch.float32).min
    torch.testing.assert_close(mask[allowed], hand.expand_as(mask)[allowed])
    assert allowed.sum() == 4 * (3 + 4 + 5)  # exactly the causal keys


def test_alibi_attention_prefers_near_keys_with_equal_scores():
    """Equal raw scores (q = 0): the pattern is softmax of the bias alone, a geometric decay per head."""
    cfg = tiny_config(position_scheme="alibi")
    s = 5
    bias = build_position_scheme(cfg).bias(s, 0, torch.float32, torch.device("cpu"))
    mask = build_attention_mask(None, s, 0, torch.float32, torch.device("cpu"), bias=bias)
    q = torch.zeros(1, 4, s, 8)
    k = torch.randn(1, 4, s, 8)
    _, probs = explicit_attention(q, k, k, mask)
    slope = 2.0**-2
    weights = torch.tensor([slope * -(4 - j) for j in range(5)]).exp()
    torch.testing.assert_close(probs[0, 0, 4], weights / weights.sum(), **TOL)


# --- sliding window ---------------------------------------------------------------------------------------------


def test_sliding_window_mask_is_hand_built():
    mask = build_attention_mask(None, 6, 0, torch.float32, torch.device("cpu"), window=3)
    hand = torch.tensor([[j <= i and j > i - 3 for j in range(6)] for i in range(6)])
    assert torch.equal(mask[0, 0] == 0, hand)
    assert build_attention_mask(None, 3, 0, torch.float32, torch.device("cpu"), window=3) is None  # never bites
    with pytest.raises(ValueError, match="sliding window"):
        build_attention_mask(None, 3, 0, torch.float32, torch.device("cpu"), window=0)


def test_sliding_window_with_cache_and_padding():
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    mask = build_attention_mask(padding, 2, 5, torch.float32, torch.device("cpu"), window=3)  # queries at 5, 6
    allowed = (mask[0, 0] == 0).tolist()
    assert allowed == [[False, False, False, True, True, True, False], [False, False, False, False, True, True, True]]


# --- the two paths agree: every scheme × layout × window ------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_sdpa_equals_explicit(scheme, layout, window, padded):
    cfg = tiny_config(num_key_value_heads=LAYOUTS[layout], position_scheme=scheme, sliding_window=window)
    torch.manual_seed(0)
    attn = GroupedQueryAttention(32, 4, LAYOUTS[layout], 8, layer_idx=0)
    b, s = 2, 7
    x = torch.randn(b, s, 32)
    padding = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]]) if padded else None
    positions = build_position_scheme(cfg)
    bias = positions.bias(s, 0, x.dtype, x.device)
    mask = build_attention_mask(padding, s, 0, x.dtype, x.device, window=window, bias=bias)
    cos, sin = positions.tables(torch.arange(s).expand(b, -1), x.dtype)
    assert (cos is None) == (scheme != "rotary")

    fast, _ = attn(x, cos, sin, mask)
    slow, probs = attn(x, cos, sin, mask, explicit=True)

    real = torch.ones(b, s, dtype=torch.bool) if padding is None else padding.bool()
    torch.testing.assert_close(fast[real], slow[real], **TOL)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, 4, s), **TOL)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    visible = (j <= i) & ((j > i - window) if window else True)
    assert probs[0][:, ~visible].abs().max() == 0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_model_paths_and_kv_cache_decode_agree(scheme, window):
    model = tiny_model(position_scheme=scheme, sliding_window=window, num_key_value_heads=1)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    captured = model(ids, output_attentions=True)
    torch.testing.assert_close(captured.logits, full, **TOL)
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 9):
        out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


def test_no_position_scheme_is_order_blind():
    """Without positions a one-layer model's last output depends on the set of earlier tokens, not their order
    (with more layers the earlier tokens' own states see different prefixes)."""
    model = tiny_model(position_scheme="none", num_hidden_layers=1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    shuffled = torch.tensor([[8, 5, 7, 6, 9]])
    torch.testing.assert_close(model(ids).logits[:, -1], model(shuffled).logits[:, -1], **TOL)
    rotary = tiny_model(position_scheme="rotary", num_hidden_layers=1)
    assert not torch.allclose(rotary(ids).logits[:, -1], rotary(shuffled).logits[:, -1], atol=1e-4)


def test_generate_left_padded_equals_alone_with_alibi_window():
    model = tiny_model(position_scheme="alibi", sliding_window=4)
    prompt = [7, 8, 9, 10, 11, 12]
    padded = torch.tensor([[0, 0] + prompt[:4], prompt])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    both = model.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(torch.tensor([prompt[:4]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert both[0, -5:].tolist() == alone[0, -5:].tolist()
    # generate() keeps only the window's keys in its cache (sliding layers); no cache at all gives the same tokens
    uncached = model.generate(torch.tensor([prompt[:4]]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert uncached.tolist() == alone.tolist()


# --- export -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, reason", [
    (dict(position_scheme="alibi"), "position_scheme is 'alibi'; Llama uses rotary positions"),
    (dict(position_scheme="none"), "position_scheme is 'none'"),
    (dict(sliding_window=16), "sliding_window is 16; Llama attends the whole context"),
    (dict(kept_kv_heads=[[0], [0, 1]]), r"pruned unevenly \(KV heads kept per layer: \[1, 2\]\)"),
])  # fmt: skip
def test_llama_export_refuses_what_llama_cannot_compute(tmp_path, overrides, reason):
    with pytest.raises(ValueError, match=reason):
        export_llama(tiny_model(**overrides), tmp_path / "out")
    assert not (tmp_path / "out").exists()
