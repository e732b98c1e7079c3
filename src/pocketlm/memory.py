"""`--max-memory`: batch sizes chosen so that the estimated peak fits a memory budget, or a refusal before any work.

The budget covers what torch allocates for one model: its loaded weights (measured: the storage of its parameters
and buffers) plus the working set of one batch, estimated from the model's shapes (`models.sizing.architecture`).
An inference forward keeps no activations for a backward pass, so its peak is the larger of two phases: the
decoder layers, then the output layer. In bytes, for [b, t] tokens:

    body(b, t)  = 4·b·t·(5·d + 3·f + (n_h + 2·n_kv)·h_d)           the largest layer's live tensors, fp32 bound
                + 4·b·t²                 with a padding mask (left-padded generation builds a [b, 1, t, t] one)
                + 8·b·n_h·t²             with eager attention (scores and probabilities; SDPA does not keep them)
    head        = the logits b·t·V in the compute dtype and the fp32 copies each use makes of them
    KV cache    = `models.sizing.kv_cache_bytes` at t + new tokens (generation), plus one layer's copy while the
                  cache grows by concatenation

per use: the teacher cache, max(body, logits + 3 fp32 copies: log-softmax, the tail's masked copy, logsumexp's
temporary) plus the shard's top-k held until it is written (twice while it is concatenated); scoring, max(body,
hidden states + the fp32 output rows of one chunk and logsumexp's temporary); generation, the prefill (body, KV
cache, last-position logits) or the decoding (the whole KV cache and ~16 [b, V] fp32 rows for sampling), whichever
is larger. MoE layers count the k active experts' intermediate width. Measured with torch's profiler on CPU, these
are upper bounds within 1.6× of the real peak (tests/test_memory.py); the Python interpreter, the
tokenizer and CUDA's context are not in the budget.

Shape legend: b batch rows, t tokens per row, V vocabulary, d hidden size, f MLP width, n_h / n_kv query / key-value
heads, h_d head dimension.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from pocketlm.core.units import MemoryBudgetError, format_bytes, parse_bytes  # noqa: F401 - re-exported
from pocketlm.models.sizing import Architecture, architecture, kv_cache_bytes, storage_bytes

_FP32_LOGIT_COPIES = {"cache": 3, "scoring": 2, "generation": 16}


@dataclass(frozen=True)
class Footprint:
    """What a loaded model's memory use depends on."""

    name: str
    weights: int  # bytes of the parameters' and buffers' storage, as loaded
    vocab: int
    hidden: int
    mlp_width: int  # the MLP's intermediate width (for MoE: the active experts' and shared experts' together)
    heads: int
    kv_heads: int
    head_dim: int
    compute_bytes: int  # bytes per value of the logits the model returns (2 for a bf16 model, else 4)
    eager: bool  # eager attention keeps [b, n_h, t, t] scores
    last_logits_only: bool  # forward takes `logits_to_keep` (generate() then asks for the last position only)
    arch: Architecture  # for the KV cache

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Footprint":
        config = model.config
        try:
            arch = architecture(config)
        except ValueError as e:
            raise MemoryBudgetError(f"--max-memory cannot estimate this model's memory: {e}") from None
        f = arch.intermediate_size
        if arch.moe is not None:
            f = max(f, arch.moe.top_k * arch.moe.expert_size + arch.moe.shared_size)
        dtype = next(model.parameters()).dtype
        try:
            keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            keep = False
        return cls(
            name=str(getattr(config, "_name_or_path", "") or type(model).__name__),
            weights=storage_bytes(list(model.parameters()) + list(model.buffers())),
            vocab=arch.vocab_size, hidden=arch.hidden_size, mlp_width=f, heads=arch.num_heads,
            kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, compute_bytes=2 if dtype in (torch.bfloat16,
            torch.float16) else 4, eager=getattr(config, "_attn_implementation", None) == "eager",
            last_logits_only=keep, arch=arch,
        )  # fmt: skip

    # -------------------------------------------------------------------------------------------- parts
    def body(self, b: int, t: int, *, masked: bool = False) -> int:
        """Peak live tensors of the decoder layers over [b, t] tokens (see the module docstring)."""
        per_token = 4 * (5 * self.hidden + 3 * self.mlp_width + (self.heads + 2 * self.kv_heads) * self.head_dim)
        out = b * t * per_token
        if masked:
            out += 4 * b * t * t
        if self.eager:
            out += 8 * b * self.heads * t * t
        return out

    def kv_cache(self, b: int, t: int) -> int:
        total = kv_cache_bytes(self.arch, t, b)["total_bf16" if self.compute_bytes == 2 else "total_fp32"]
        return total + total // max(1, self.arch.num_layers)  # one layer's copy while the cache is concatenated

    # -------------------------------------------------------------------------------------------- per use
    def teacher_cache(self, b: int, t: int, k: int, shard_blocks: int) -> int:
        """One batch of `teacher_topk` over [b, t] blocks, with a shard of `shard_blocks` blocks' top-k held."""
        head = b * t * self.vocab * (self.compute_bytes + 4 * _FP32_LOGIT_COPIES["cache"]
                                     + (4 if self.compute_bytes != 4 else 0))  # + the .float() copy of bf16 logits
        head += b * t * (4 * self.hidden + k * (4 + 8 + 2 + 4))  # final hidden states; top-k and its stored casts
        held = 2 * shard_blocks * t * (k * (2 + 4) + 4)  # fp16 log-probs, int32 indices, fp32 tail; ×2 at torch.cat
        return max(self.body(b, t), head) + held

    def scoring(self, b: int, t: int, *, chunk_rows: int, split: bool) -> int:
        """One `score_continuations` batch of b rows padded to t tokens, its fp32 rows scored `chunk_rows` at a time
        (split: the output layer reads the decoder's hidden states, and the [b, t, V] logits never exist)."""
        rows = 4 * min(b * t, chunk_rows) * self.vocab * _FP32_LOGIT_COPIES["scoring"]
        kept = 2 * 4 * b * t * self.hidden if split else b * t * self.vocab * self.compute_bytes
        kept += 96 * b * t  # per scored token: row, position and target ids, fp64 log-prob, the gathers
        return max(self.body(b, t), kept + rows)

    def generation(self, b: int, t: int, new_tokens: int) -> int:
        """One `generate` batch of b left-padded prompts of t tokens writing `new_tokens` each."""
        prefill_logits = b * (1 if self.last_logits_only else t) * self.vocab * self.compute_bytes
        prefill = self.body(b, t, masked=True) + self.kv_cache(b, t) + prefill_logits
        decode = self.body(b, 1) + self.kv_cache(b, t + new_tokens) + 4 * b * self.vocab * _FP32_LOGIT_COPIES[
            "generation"]
        return max(prefill, decode)


def largest_batch(need: Callable[[int], int], most: int, fp: Footprint, budget: int, what: str) -> int:
    """The largest b in [1, most] with weights + need(b) ≤ budget (need grows with b); a `MemoryBudgetError`
    saying what one would take when even b = 1 does not fit."""
    room = budget - fp.weights
    if room <= 0 or need(1) > room:
        raise MemoryBudgetError(
            f"--max-memory {format_bytes(budget)} is too small for {what} with {fp.name}: the weights take "
            f"{format_bytes(fp.weights)} and one {'' if room > 0 else 'more '}row needs about "
            f"{format_bytes(need(1))} on top; raise --max-memory to at least {format_bytes(fp.weights + need(1))}"
            + (" or use shorter inputs" if room > 0 else ""))
    lo, hi = 1, most
    while lo < hi:  # need is monotone in b: bisect for the last b that fits
        mid = (lo + hi + 1) // 2
        if need(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo
