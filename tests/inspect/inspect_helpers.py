"""Tiny students shared by the inspect tests (built in-test, no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch

import pocketlm  # noqa: F401  (registers the Auto classes)
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM


def tiny_student(vocab_size: int = 100, *, seed: int = 0, dtype=torch.float32, **overrides) -> PocketLMForCausalLM:
    """2 layers, 4 query heads in 2 KV groups of 2 (GQA), h_d 8, rotary unless overridden."""
    values = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
    )  # fmt: skip
    values.update(overrides)
    torch.manual_seed(seed)
    return PocketLMForCausalLM(PocketLMConfig(**values)).to(dtype).eval()


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules()
    )
