"""Batched generation: left-padded batches equal each prompt alone; sampling is per-item reproducible.

References: greedy = `model.generate` on the prompt alone (exact token equality); sampling = the Gumbel-max trick
checked against the softmax distribution it must sample from (chi-square-free: empirical frequencies within 0.03).
"""
from __future__ import annotations

import pytest
import torch

from pocketlm.eval.generate import GenerationSettings, _RowSampler, generate, row_seed
from conftest import make_teacher

PROMPTS = ["The cat sat", "Rain falls on the hills and", "A", "Bread is baked from flour, water"]


@pytest.fixture(scope="module")
def lm(tokenizer):
    return make_teacher(len(tokenizer), seed=3)


def test_greedy_batch_equals_each_prompt_alone(lm, tokenizer):
    st = GenerationSettings(max_new_tokens=6, batch_size=4)
    batched = generate(lm, tokenizer, PROMPTS, st).texts
    for prompt, got in zip(PROMPTS, batched):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
        toks = out[0, ids.shape[1]:].tolist()
        toks = toks[: toks.index(2)] if 2 in toks else toks
        assert got == [tokenizer.decode(toks, skip_special_tokens=True)]


def test_sampling_is_per_item_reproducible_across_batch_sizes(lm, tokenizer):
    a = generate(lm, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=5, do_sample=True, num_samples=3,
                                                            batch_size=12, seed=7)).texts
    b = generate(lm, tokenizer, PROMPTS[::-1], GenerationSettings(max_new_tokens=5, do_sample=True, num_samples=3,
                                                                 batch_size=1, seed=7)).texts
    assert a == b[::-1]
    c = generate(lm, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=5, do_sample=True, num_samples=3,
                                                            batch_size=12, seed=8)).texts
    assert a != c  # another seed draws other samples
    assert any(len(set(samples)) > 1 for samples in a)  # samples of one prompt differ


def test_gumbel_sampler_draws_from_the_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 2
    for settings, expected in [
        (GenerationSettings(do_sample=True, temperature=0.7), (logits / 0.7).softmax(-1)[0]),
        (GenerationSettings(do_sample=True, top_k=3), None),
        (GenerationSettings(do_sample=True, top_p=0.6), None),
    ]:
        counts = torch.zeros(6)
        sampler = _RowSampler([row_seed(0, "x", 0)], settings, torch.device("cpu"))
        for _ in range(6000):
            counts[sampler(None, logits.clone()).argmax()] += 1
        freq = counts / counts.sum()
        if expected is None:  # top-k / top-p: the renormalised kept set
            probs = logits.softmax(-1)[0]
            order = probs.argsort(descending=True)
            if settings.top_k:
                keep = order[: settings.top_k]
            else:
                cum = probs[order].cumsum(0)
                keep = order[: int((cum - probs[order] < settings.top_p).sum())]
            expected = torch.zeros(6)
            expected[keep] = probs[keep] / probs[keep].sum()
        assert torch.allclose(freq, expected, atol=0.03), (settings, freq, expected)
        assert (freq[expected == 0] == 0).all()


def test_stop_strings_and_settings_errors(lm, tokenizer):
    out = generate(lm, tokenizer, ["The"], GenerationSettings(max_new_tokens=8)).texts[0][0]
    if len(out) > 2:
        cut = generate(lm, tokenizer, ["The"], GenerationSettings(max_new_tokens=8, stop=(out[2],))).texts[0][0]
        assert cut == out[: out.index(out[2])]
    with pytest.raises(ValueError, match="num_samples > 1 needs do_sample"):
        GenerationSettings(num_samples=2)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(temperature=0)
    with pytest.raises(ValueError, match="no prompts"):
        generate(lm, tokenizer, [], GenerationSettings())
