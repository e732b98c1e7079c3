"""What a real model measures, to set beside the size model's estimates (models/sizing.py): parameters, weight
storage, the KV cache a forward pass allocates, and FLOPs counted by `torch.utils.flop_counter.FlopCounterMode`.

FLOPs are counted on the explicit (eager) attention path: FlopCounterMode has no formula for CPU's fused SDPA
kernel and would count its attention as 0; the eager path computes the same scores with plain matmuls. transformers'
and pocketlm's MoE experts run `torch._grouped_mm`, which FlopCounterMode does not know either; `GROUPED_MM_FLOPS`
gives it the matmul rule (2 per multiply-add), checked in tests against the loop-over-experts path.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from pocketlm.models.size_moe import parameter_counts
from pocketlm.models.sizing import storage_bytes


def measured_parameters(model: nn.Module) -> dict[str, int]:
    """numel of the distinct parameters (total), embedding / routed / active: `size_moe.parameter_counts`."""
    return parameter_counts(model).to_dict()


def weight_storage_bytes(model: nn.Module) -> int:
    """Bytes of storage actually held by the model's parameters (`untyped_storage().nbytes()`, tied once)."""
    return storage_bytes(model.parameters())


def cache_bytes(cache: Any) -> int:
    """Bytes of storage held by the key and value tensors of a transformers `Cache` (one `layers` entry each)."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ValueError("the cache holds no key/value tensors; run a forward pass with use_cache=True first")
    return storage_bytes(tensors)


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


@torch.no_grad()
def measured_kv_cache_bytes(model: nn.Module, context: int, batch: int = 1, seed: int = 0) -> int:
    """Bytes of the KV cache holding `context` tokens × `batch`, as decoding leaves it: a prefill of context − 1
    random tokens, then one decoding step (after a prefill longer than a sliding window, and before the first
    step, transformers' sliding cache still holds the whole prompt's buffer)."""
    ids = _random_ids(model, context, batch, seed)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = None
    for part in ((ids[:, :-1], ids[:, -1:]) if context > 1 else (ids,)):
        mask = torch.ones(batch, part.shape[1] + (cache.get_seq_length() if cache is not None else 0),
                          dtype=torch.long, device=ids.device)
        past = {name: cache} if cache is not None else {}  # transformers 5 calls it `cache`, GPT-2 still not
        cache = _output_cache(model(input_ids=part, attention_mask=mask, use_cache=True, **past))
        if cache is None:
            raise ValueError(f"{type(model).__name__} returned no KV cache from a use_cache=True forward")
    return cache_bytes(cache)


def _random_ids(model: nn.Module, context: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g)
    return ids.to(next(model.parameters()).device)


def _grouped_mm_flops(a: tuple[int, ...], b: tuple[int, ...], *args: Any, out_shape: Any = None, **kw: Any) -> int:
    """2 × multiply-adds of `torch._grouped_mm(a, b, offs)`: whichever dimension `offs` splits, every row of the
    grouped operand meets one group's matrix, so the count is that of one plain matmul of the concatenation."""
    if len(a) == 2 and len(b) == 3:  # [M, K] rows grouped × [E, K, N]
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:  # [M, Ktot] × [Ktot, N], K grouped → [E, M, N]
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 2:  # [E, M, K] × [K, Ntot], N grouped
        return 2 * a[1] * a[2] * b[1]
    return 2 * math.prod(a) * b[-1]  # [E, M, K] × [E, K, N]: a batched matmul


GROUPED_MM_FLOPS: dict[Any, Callable[..., int]] = (
    {torch.ops.aten._grouped_mm: _grouped_mm_flops} if hasattr(torch.ops.aten, "_grouped_mm") else {}
)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn()` runs, as FlopCounterMode counts them (plus `GROUPED_MM_FLOPS`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=GROUPED_MM_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its explicit attention path for the duration (restored afterwards)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before not in (None, "eager"):
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before not in (None, "eager"):
            model.set_attn_implementation(before)


def measured_flops_per_token(model: nn.Module, context: int, batch: int = 1, seed: int = 0) -> dict[str, float]:
    """FLOPs per token of a forward pass, and of forward + backward of the next-token loss, over `batch` ×
    `context` random tokens, counted by FlopCounterMode on the eager attention path. Parameter gradients are
    cleared afterwards."""
    ids = _random_ids(model, context, batch, seed)
    tokens = batch * context
    with eager_attention(model):
        with torch.no_grad():
            forward = count_flops(lambda: model(input_ids=ids, use_cache=False))

        def train_step() -> None:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

        train = count_flops(train_step)
    model.zero_grad(set_to_none=True)
    return {"forward": forward / tokens, "train": train / tokens}


def measure(model: nn.Module, context: int, batch: int = 1, flops: bool = True) -> dict[str, float]:
    """The figures `pocketlm size --measure` measures on a model, under the names of `size.flatten`: parameters,
    weight storage and KV cache at the model's dtype (fp32 or bf16), and (with `flops`) FLOPs per token."""
    params = measured_parameters(model)
    out: dict[str, float] = {"params_total": params["total"], "params_active": params["active"]}
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(next(model.parameters()).dtype)
    if name is None:
        raise ValueError(f"measure a model in float32 or bfloat16, not {next(model.parameters()).dtype}")
    out[f"weight_bytes_{name}"] = weight_storage_bytes(model)
    out[f"kv_cache_total_{name}"] = measured_kv_cache_bytes(model, context, batch)
    if flops:
        counted = measured_flops_per_token(model, context, batch)
        out["flops_forward"], out["flops_train"] = counted["forward"], counted["train"]
    return out
