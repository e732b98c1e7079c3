"""Shared-prefix packing (eval/packing.py) gives each request exactly what it gets alone.

Reference: one unpadded forward per request (`test_loglik.reference`). Tolerance: 1e-5 relative on the summed
log-probability in fp32 (packed rows change only matmul shapes, hence summation order).
"""
from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from pocketlm.eval import loglik, packing
from pocketlm.eval.loglik import score_continuations
from test_loglik import VOCAB, reference

REL_TOL = 1e-5


def make_model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def multiple_choice(n_items: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """BBQ-like items (one context, 3 answers), CrowS-like pairs (one sentence, a changed word inside), a request
    that is a prefix of another, and unrelated singles."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    reqs = []
    for _ in range(n_items):
        ctx = tok(rng.randint(6, 30))
        reqs += [(ctx, tok(rng.randint(1, 4))) for _ in range(3)]
        head, tail = tok(rng.randint(4, 12)), tok(rng.randint(2, 8))
        reqs += [([1], head + [w] + tail) for w in tok(2)]
        long = tok(15)
        reqs += [(long[:5], long[5:9]), (long[:5], long[5:15])]
        reqs.append((tok(rng.randint(1, 20)), tok(rng.randint(1, 6))))
    return reqs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_packed_scores_equal_one_request_at_a_time(attn, batch_size):
    model = make_model(attn)
    reqs = multiple_choice(6, seed=batch_size)
    forward = loglik._Forward(model, "fp32", torch.device("cpu"))
    assert forward.mask_kind() == ("additive" if attn == "eager" else "bool")
    rows = loglik._rows(reqs, None, forward, pack=True)
    assert len(rows) < len(reqs) and sum(len(r) for r in rows) < 0.8 * sum(len(c) + len(x) - 1 for c, x in reqs)
    got = score_continuations(model, reqs, batch_size=batch_size)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        ref_ll, ref_greedy = reference(model, ctx, cont)
        assert ll == pytest.approx(ref_ll, rel=REL_TOL, abs=1e-6)
        assert greedy == ref_greedy


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_scoring_packs_as_fp32_does(attn, monkeypatch):
    """Whether packing is the same model is probed in fp32 whatever the precision: bf16's rounding must not hide
    it (it did: every bf16 run scored BBQ's three answers as three rows, slower than fp32 packed). The packed bf16
    answers are those of bf16 on plain rows, within bf16's own noise."""
    model = make_model(attn)
    reqs = multiple_choice(6, seed=11)
    fp32, bf16 = (loglik._Forward(model, p, torch.device("cpu")) for p in ("fp32", "bf16"))
    probed = []  # the precision of each forward the probe makes (on a 2-layer model bf16's noise stays under the
    real_scored = loglik._Forward.scored  # probe's 1e-4; on SmolLM2's 30 layers it did not, so the mechanism is tested)
    monkeypatch.setattr(loglik._Forward, "scored", lambda self, *a: probed.append(self.bf16) or real_scored(self, *a))
    assert bf16.bf16 and bf16.mask_kind() == fp32.mask_kind() == ("additive" if attn == "eager" else "bool")
    assert probed and not any(probed)
    monkeypatch.setattr(loglik._Forward, "scored", real_scored)
    assert len(loglik._rows(reqs, None, bf16, pack=True)) == len(loglik._rows(reqs, None, fp32, pack=True)) < len(reqs)
    seen = []
    real = loglik._score_batch
    monkeypatch.setattr(loglik, "_score_batch", lambda f, rows, *a: seen.extend(rows) or real(f, rows, *a))
    packed = score_continuations(model, reqs, batch_size=8, precision="bf16")
    assert any(r.segments is not None for r in seen)
    plain = score_continuations(model, reqs, batch_size=8, precision="bf16", pack=False)
    for (a, _), (b, _), (_, cont) in zip(packed, plain, reqs):
        assert a == pytest.approx(b, rel=0.02, abs=0.05 * len(cont))


def test_packing_under_max_length_truncation_and_unpacked_agree():
    model = make_model("sdpa")
    reqs = multiple_choice(4, seed=7)
    packed = score_continuations(model, reqs, batch_size=8, max_length=24)
    plain = score_continuations(model, reqs, batch_size=8, max_length=24, pack=False)
    for (a, ga), (b, gb), (ctx, cont) in zip(packed, plain, reqs):
        assert a == pytest.approx(b, rel=REL_TOL, abs=1e-6) and ga == gb
        assert a == pytest.approx(reference(model, ctx, cont, max_length=24)[0], rel=REL_TOL, abs=1e-6)


def test_pack_rule_groups_shared_contexts_and_leaves_strangers_alone():
    ctx = list(range(10, 30))  # 20 shared tokens
    inputs = [ctx + [1], ctx + [2, 3], ctx + [4], [5, 6, 7, 8, 9], [5, 6, 40, 41]]
    targets = [[1], [3], [4], [9], [41]]
    rows = packing.pack_requests(inputs, targets, max_row_tokens=100)
    tree = [r for r in rows if r.segments is not None]
    assert len(tree) == 1 and len(tree[0]) == 20 + 1 + 2 + 1 and sorted(i for i, _, _ in tree[0].reads) == [0, 1, 2]
    assert sum(r.segments is None for r in rows) == 2  # the two that share only 2 tokens (< min_shared) stay apart
    # a member whose target is predicted from inside the shared part reads the shared position
    (i, where, tg), = [rd for rd in tree[0].reads if rd[0] == 0]
    assert where == [20] and tg == [1]
    # row length and member caps
    capped = packing.pack_requests(inputs[:3], targets[:3], max_row_tokens=22)
    assert all(len(r) <= 22 or r.segments is None for r in capped)
    assert len(packing.pack_requests(inputs[:3], targets[:3], max_row_tokens=100, max_members=2)) == 2


def test_tree_mask_is_the_ancestor_relation():
    rows = packing.pack_requests([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7], [9, 9]], [[6], [7], [9]], max_row_tokens=64)
    _, position_ids, mask, _ = packing.batch_tensors(sorted(rows, key=len, reverse=True), torch.device("cpu"), "bool")
    tree = max(rows, key=len)
    seg = tree.segments
    for q in range(len(tree)):
        for k in range(len(tree)):
            ancestor = k <= q and (seg[k] == 0 or seg[k] == seg[q])
            assert bool(mask[0, 0, q, k]) == ancestor
    assert position_ids[0, : len(tree)].tolist() == tree.positions == [0, 1, 2, 3, 4, 5, 4]
    # the short row's padding only attends to itself; its real tokens are causal
    assert mask[1, 0, :2, :2].tolist() == [[True, False], [True, True]]
    assert mask[1, 0, 3].nonzero().flatten().tolist() == [3]


class _IgnoresPositions(LlamaModel):
    """A decoder that drops position ids and masks (as some architectures do): packing would be wrong for it."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_model_that_would_score_packed_rows_wrongly_runs_unpacked():
    model = make_model("sdpa")
    ignoring = _IgnoresPositions(model.config)
    ignoring.load_state_dict(model.model.state_dict())
    model.model = ignoring.eval()
    forward = loglik._Forward(model, "fp32", torch.device("cpu"))
    assert forward.mask_kind() is None
    reqs = multiple_choice(3, seed=1)
    assert all(r.segments is None for r in loglik._rows(reqs, None, forward, pack=True))
    for (ctx, cont), (ll, _) in zip(reqs, score_continuations(model, reqs, batch_size=8)):
        assert ll == pytest.approx(reference(model, ctx, cont)[0], rel=REL_TOL, abs=1e-6)


def test_sliding_window_models_keep_their_window_when_packed():
    """A 4-D mask replaces the model's own sliding-window mask, so the tree mask applies the window itself: packed
    and plain rows longer than the window still score as one request alone."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=6, initializer_range=0.2,
    )).eval()
    reqs = multiple_choice(5, seed=3)
    forward = loglik._Forward(model, "fp32", torch.device("cpu"))
    assert forward.window == 6 and forward.mask_kind() is not None
    rows = loglik._rows(reqs, None, forward, pack=True)
    assert any(r.segments is not None and len(r) > 12 for r in rows)  # packed rows well past the window
    for (ctx, cont), (ll, _) in zip(reqs, score_continuations(model, reqs, batch_size=8)):
        assert ll == pytest.approx(reference(model, ctx, cont)[0], rel=REL_TOL, abs=1e-6)
