"""score_continuations against a plain one-request-at-a-time computation (no batching, no padding).

Tolerance: summed log-probabilities agree to math.isclose(rel_tol=1e-6); the reference computes log-softmax in
fp64 on the fp32 logits of an unpadded forward.
"""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pocketlm.eval import loglik
from pocketlm.eval.loglik import model_input, score_continuations

VOCAB = 100
REL_TOL = 1e-6


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,  # peaked, not near-uniform
    )
    return LlamaForCausalLM(config).eval()


def reference(model, context: list[int], continuation: list[int], max_length: int | None = None) -> tuple[float, bool]:
    """One request, one unpadded forward: Σ log p(cont_j | everything before it), and whether each is the argmax."""
    whole = context + continuation
    if max_length is not None:
        whole = whole[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()  # [len-1, v]
    logprobs = logits.log_softmax(-1)[-len(continuation):]  # rows predicting the continuation
    targets = torch.tensor(continuation)
    total = logprobs.gather(-1, targets[:, None]).sum().item()
    return total, bool((logprobs.argmax(-1) == targets).all())


def random_requests(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    def tokens(most: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(rng.randint(1, most))]

    return [(tokens(20), tokens(8)) for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_matches_one_request_at_a_time_in_any_batch_size(model, batch_size):
    requests = random_requests(13, seed=1)  # mixed lengths, so batches are padded and get reordered
    got = score_continuations(model, requests, batch_size=batch_size)
    assert len(got) == len(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):  # zip: results come back in the caller's order
        ref_ll, ref_greedy = reference(model, ctx, cont)
        assert math.isclose(ll, ref_ll, rel_tol=REL_TOL), (ll, ref_ll)
        assert greedy == ref_greedy


def test_chunked_fp32_scoring_matches_one_chunk(model, monkeypatch):
    requests = random_requests(6, seed=5)
    whole = score_continuations(model, requests, batch_size=4)
    monkeypatch.setattr(loglik, "_ROWS_PER_CHUNK", 3)  # split every batch's continuation rows into chunks
    chunked = score_continuations(model, requests, batch_size=4)
    assert [g for _, g in chunked] == [g for _, g in whole]
    torch.testing.assert_close(torch.tensor([ll for ll, _ in chunked]), torch.tensor([ll for ll, _ in whole]),
                               rtol=1e-5, atol=0)


def test_longest_requests_run_first(model):
    widths: list[int] = []

    def record(module, args, kwargs):
        widths.append(kwargs["input_ids"].shape[1])

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        score_continuations(model, random_requests(10, seed=4), batch_size=3, pack=False)
    finally:
        handle.remove()
    widths = widths[2:]  # the first two calls are the one-off 8-token probe (whole model, then decoder alone)
    assert len(widths) == 4 and widths == sorted(widths, reverse=True)  # an OOM would show on the first batch


def test_split_output_layer_equals_the_whole_forward_and_falls_back_when_it_would_not(model):
    requests = random_requests(8, seed=9)
    split = score_continuations(model, requests, batch_size=3)
    assert loglik._Forward(model, "fp32", torch.device("cpu")).decoder is not None

    class Scaled(torch.nn.Module):  # logits = 2 * lm_head(h): a split at the output layer would be wrong
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_decoder(self):
            return self.inner.get_decoder()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, **kwargs):
            out = self.inner(input_ids=input_ids, **kwargs)
            out.logits = out.logits * 2
            return out

    scaled = Scaled(model)
    assert loglik._Forward(scaled, "fp32", torch.device("cpu")).decoder is None  # the probe caught it
    got = score_continuations(scaled, requests, batch_size=3)
    for (ll, _), (ctx, cont) in zip(got, requests):
        with torch.no_grad():
            logits = 2 * model(torch.tensor([ctx + cont[:-1]])).logits[0].double()
        ref = logits[len(ctx) - 1:].log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert math.isclose(ll, ref, rel_tol=REL_TOL)
    assert not math.isclose(got[0][0], split[0][0], rel_tol=1e-3)


def test_bf16_body_with_fp32_head_is_closer_to_fp32_than_a_bf16_model(model):
    requests = random_requests(12, seed=11)
    fp32 = torch.tensor([ll for ll, _ in score_continuations(model, requests)], dtype=torch.float64)
    mixed = torch.tensor([ll for ll, _ in score_continuations(model, requests, precision="bf16")], dtype=torch.float64)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    pure = torch.tensor([ll for ll, _ in score_continuations(bf16_model, requests)], dtype=torch.float64)
    err_mixed, err_pure = (mixed - fp32).abs().sum(), (pure - fp32).abs().sum()
    assert 0 < err_mixed < err_pure  # mixed really ran in bf16, and kept more of fp32's answer
    torch.testing.assert_close(mixed, fp32, rtol=2e-2, atol=0)  # loose: bf16 body, stated per request
    with pytest.raises(ValueError, match="precision"):
        score_continuations(model, requests, precision="fp16")


def test_is_greedy_on_a_constructed_case(model):
    context = [5, 17, 42]
    greedy: list[int] = []
    with torch.no_grad():  # greedy decoding by hand: each next token is the argmax given all before it
        for _ in range(4):
            greedy.append(int(model(torch.tensor([context + greedy])).logits[0, -1].argmax()))
    off_by_one = greedy[:-1] + [(greedy[-1] + 1) % VOCAB]  # last token no longer the argmax
    first_off = [(greedy[0] + 1) % VOCAB] + greedy[1:]
    got = score_continuations(model, [(context, greedy), (context, off_by_one), (context, first_off)], batch_size=2)
    assert [g for _, g in got] == [True, False, False]
    assert got[0][0] > got[1][0]  # the argmax token is the likelier one


def test_left_truncation_follows_lm_eval(model):
    context, continuation = list(range(10, 30)), [7, 8, 9]
    max_length = 6
    # the model is fed (context + continuation)[-(max_length + 1):][:-1]: 6 tokens, context cut from the left
    assert model_input(context, continuation, max_length) == [26, 27, 28, 29, 7, 8]
    (ll, _), (ll_short, _) = score_continuations(
        model, [(context, continuation), (context[-2:], continuation)], max_length=max_length
    )
    ref_ll, _ = reference(model, context, continuation, max_length=max_length)
    assert math.isclose(ll, ref_ll, rel_tol=REL_TOL)
    assert not math.isclose(ll, reference(model, context, continuation)[0], rel_tol=1e-4)  # truncation mattered
    assert ll_short == pytest.approx(reference(model, context[-2:], continuation, max_length)[0], rel=REL_TOL)


def test_rejects_requests_it_cannot_score(model):
    with pytest.raises(ValueError, match="empty context"):
        score_continuations(model, [([], [1, 2])])
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(model, [([1], [])])
    with pytest.raises(ValueError, match="longer than max_length"):
        score_continuations(model, [([1], [2, 3, 4])], max_length=2)
    with pytest.raises(ValueError, match="batch_size"):
        score_continuations(model, [([1], [2])], batch_size=0)
    assert score_continuations(model, []) == []


def test_progress_bar_and_mode_restored(model, capsys):
    model.train()
    try:
        got = score_continuations(model, random_requests(3, seed=2), progress=True, desc="unit")
    finally:
        was_training = model.training
        model.eval()
    assert was_training, "the caller's train/eval mode must be restored"
    assert len(got) == 3
    assert "unit" in capsys.readouterr().err
