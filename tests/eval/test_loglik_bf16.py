"""bf16 scoring's fp32 first positions: the predictions made at a sequence's first `EXACT_POSITIONS` positions are
fp32's (where the attention sinks' massive activations make bf16 err by nats on SmolLM2), whether rows are plain
or packed; the rest of the sequence is still bf16."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_teacher

from pocketlm.eval import loglik, packing
from pocketlm.eval.loglik import EXACT_POSITIONS, score_continuations


@pytest.fixture(scope="module")
def model():
    return make_teacher(300, layers=2, hidden=64, seed=3)


def requests(seed: int, n: int, lengths: tuple[int, int]):
    """Whole sentences after a BOS (1), as CrowS scores them; every few share their first word (packable)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        first = int(rng.integers(3, 300)) if k % 3 else 7
        rest = rng.integers(3, 300, int(rng.integers(*lengths)) - 1).tolist()
        out.append(([1], [first] + rest))
    return out


def test_predictions_at_the_first_positions_are_fp32s(model):
    short = requests(0, 24, (1, EXACT_POSITIONS + 1))  # every token predicted at a position < EXACT_POSITIONS
    fp32 = score_continuations(model, short, batch_size=5, precision="fp32")
    bf16 = score_continuations(model, short, batch_size=5, precision="bf16")
    np.testing.assert_allclose([b[0] for b in bf16], [f[0] for f in fp32], rtol=0, atol=1e-5)
    assert [b[1] for b in bf16] == [f[1] for f in fp32]


def test_packed_rows_take_the_first_positions_by_position_id(model):
    """Packed so that requests share only the BOS, a request's position 1 sits further along the row: it is found
    by its position id, not its place in the row (`score_continuations` packs only prefixes of >= 4 tokens, so
    this layout is built here directly)."""
    short = requests(2, 12, (EXACT_POSITIONS, EXACT_POSITIONS + 1))
    inputs = [loglik.model_input(c, t, None) for c, t in short]
    forward = loglik._Forward(model, "bf16", loglik.model_device(model))
    assert forward.mask_kind() is not None
    rows = packing.pack_requests(inputs, [t for _, t in short], max_row_tokens=64, min_shared=1)
    assert any(r.segments is not None and len(r.tokens) > EXACT_POSITIONS + 1 for r in rows)
    with torch.no_grad(), forward.session():
        exact = loglik._exact_early(forward, inputs, [t for _, t in short], range(len(short)))
        got = loglik._score_batch(forward, rows, exact)
    fp32 = score_continuations(model, short, precision="fp32")
    np.testing.assert_allclose([got[i][0] for i in range(len(short))], [f[0] for f in fp32], rtol=0, atol=1e-5)


def test_the_rest_of_a_sequence_is_still_bf16(model, monkeypatch):
    """Later positions keep bf16's answers: the same as with no fp32 first positions once those are taken out."""
    long = requests(1, 12, (6, 10))
    fp32 = np.array([a[0] for a in score_continuations(model, long, precision="fp32")])
    bf16 = np.array([a[0] for a in score_continuations(model, long, precision="bf16")])
    assert np.abs(bf16 - fp32).max() > 1e-4  # bf16 is really on
    monkeypatch.setattr(loglik, "EXACT_POSITIONS", 0)
    plain = np.array([a[0] for a in score_continuations(model, long, precision="bf16")])
    # what moved is exactly the first positions' bf16 error, which the fp32 start removed
    first = [(c, t[:EXACT_POSITIONS]) for c, t in long]
    f32_first = np.array([a[0] for a in score_continuations(model, first, precision="fp32")])
    b16_first = np.array([a[0] for a in score_continuations(model, first, precision="bf16")])
    assert np.abs(b16_first - f32_first).max() > 1e-4  # (EXACT_POSITIONS is 0 here: plain bf16)
    np.testing.assert_allclose(bf16 - plain, f32_first - b16_first, rtol=0, atol=2e-5)
