"""The deployment clock (`pocketlm.eval.speed`): rates are ratios of sums with the median over passes, greedy decoding
with each engine's KV cache gives the tokens a no-cache float64 reference gives, and the peak memory a worker
reports is its own — not the parent's, which Linux carries into a child's ru_maxrss — and that of a llama.cpp
process that never imported torch."""
from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from pocketlm.eval.speed import PROMPTS, SpeedSettings, Timing, greedy, measure, prompt_ids, summarise

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is installed by `make setup` (the dev extra)")
SETTINGS = SpeedSettings(threads=1, new_tokens=6, repeats=1, warmup=0, max_prompt_tokens=12)


def test_summarise_is_a_ratio_of_sums_then_the_median_over_passes():
    def t(n, prefill, ttft, decode):
        return Timing(n, prefill, ttft, decode, (0,) * 5)

    passes = [[t(10, 1.0, 1.5, 2.0), t(30, 1.0, 2.5, 6.0)],  # prompt 40/2 = 20; decode 8/8 = 1; ttft 2
              [t(10, 0.5, 0.5, 1.0), t(30, 0.5, 1.5, 1.0)],  # 40; 4; 1
              [t(10, 4.0, 4.0, 4.0), t(30, 4.0, 4.0, 4.0)]]  # 5; 1; 4
    got = summarise(passes, new_tokens=5)
    assert got["prompt_tokens_per_s"] == pytest.approx(20.0)  # median of 20, 40, 5 (the mean of rates would be 25)
    assert got["decode_tokens_per_s"] == pytest.approx(1.0)  # median of 1, 4, 1: 4 decoded tokens per prompt
    assert got["ttft_s"] == pytest.approx(2.0)
    assert [p["prompt_tokens_per_s"] for p in got["passes"]] == pytest.approx([20.0, 40.0, 5.0])


def test_greedy_prefills_once_then_decodes_one_token_at_a_time():
    calls, resets = [], []

    def forward(ids):
        calls.append(list(ids))
        if len(ids) > 1:
            time.sleep(0.02)
        logits = np.zeros(10)
        logits[(ids[-1] + 3) % 10] = 1.0
        return logits

    t = greedy(forward, lambda: resets.append(1), [1, 2, 4], new_tokens=4)
    assert resets == [1] and calls == [[1, 2, 4], [7], [0], [3]]
    assert t.generated == (7, 0, 3, 6) and t.prompt_tokens == 3
    assert t.prefill_s >= 0.02 and t.ttft_s >= t.prefill_s and t.decode_s < t.prefill_s


def test_prompts_are_cut_to_fit_the_settings_and_the_context(tokenizer):
    ids = prompt_ids(tokenizer, SpeedSettings(max_prompt_tokens=20, new_tokens=8))
    assert [len(x) for x in ids] == [20] * len(PROMPTS)
    assert ids[0] == list(tokenizer(PROMPTS[0])["input_ids"])[:20]
    assert [len(x) for x in prompt_ids(tokenizer, SpeedSettings(max_prompt_tokens=20, new_tokens=8), 18)] == [10] * 3
    with pytest.raises(ValueError, match="leaves no room"):
        prompt_ids(tokenizer, SpeedSettings(new_tokens=8), 8)
    with pytest.raises(ValueError, match="new_tokens must be at least 2"):
        SpeedSettings(new_tokens=1)


@pytest.fixture(scope="module")
def model_files(tokenizer, tmp_path_factory):
    """A tiny Llama with large weights (clear argmax margins), as a Hugging Face folder and an f32 GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pocketlm.models.gguf_export import export_gguf

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    root = tmp_path_factory.mktemp("speed")
    model.save_pretrained(root / "hf")
    return model, root / "hf", export_gguf(model, root / "gguf", tokenizer, "f32")


def reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy decoding from the definition: the whole sequence through the model in float64 at every step, no
    cache. Returns the tokens and the smallest top-1 − top-2 logit margin met."""
    m = model.double()
    ids, margin = list(prompt), np.inf
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2).values
            margin = min(margin, float(top[0] - top[1]))
            ids.append(int(logits.argmax()))
    model.float()
    return ids[len(prompt):], margin


@needs_llama_cpp
def test_both_engines_decode_what_the_no_cache_reference_decodes(model_files, tokenizer):
    model, folder, gguf = model_files
    prompts = prompt_ids(tokenizer, SETTINGS)
    want = []
    for p in prompts:
        tokens, margin = reference_greedy(model, p, SETTINGS.new_tokens)
        assert margin > 1e-3  # far above fp32 (and llama.cpp's f16 KV cache) error: the comparison is fair
        want.append(tokens)
    hf = measure("transformers", folder, "fp32", prompts, SETTINGS)
    cpp = measure("llama.cpp", gguf, "f32", prompts, SETTINGS)
    assert hf["generated"] == want and cpp["generated"] == want
    for row in (hf, cpp):
        assert row["prompt_tokens"] == [len(p) for p in prompts] and row["settings"]["threads"] == 1
        assert min(row["prompt_tokens_per_s"], row["decode_tokens_per_s"], row["ttft_s"]) > 0
    assert hf["versions"]["class"] == "LlamaForCausalLM"
    assert hf["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    bf16 = measure("transformers", folder, "bf16", prompts, SETTINGS)
    assert bf16["weight_bytes"] * 2 == hf["weight_bytes"] and [len(g) for g in bf16["generated"]] == [6] * 3


@needs_llama_cpp
def test_peak_memory_is_the_workers_own_and_llama_cpp_runs_without_torch(model_files, tokenizer):
    """The parent holds 512 MiB more than the worker ever does: a figure read from getrusage(RUSAGE_CHILDREN) or
    wait4 would be at least the parent's high-water mark (Linux keeps it across exec)."""
    _, _, gguf = model_files
    ballast = np.ones(512 << 17)  # 512 MiB, touched
    row = measure("llama.cpp", gguf, "f32", prompt_ids(tokenizer, SETTINGS), SETTINGS)
    assert 0 < row["rss_before_load_bytes"] < row["peak_rss_bytes"] < 150 << 20  # `import torch` alone: ~220 MiB
    assert ballast.sum() == 512 << 17


@needs_llama_cpp
def test_a_failed_worker_and_bad_arguments_are_named_errors(tmp_path, tokenizer):
    with pytest.raises(RuntimeError, match="timing .*missing.gguf in llama.cpp \\(f16\\) failed"):
        measure("llama.cpp", tmp_path / "missing.gguf", "f16", [[1, 2]], SETTINGS)
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        measure("vllm", tmp_path, "f16", [[1]], SETTINGS)
    with pytest.raises(ValueError, match="transformers precision 'fp16'; valid: fp32, bf16"):
        measure("transformers", tmp_path, "fp16", [[1]], SETTINGS)
