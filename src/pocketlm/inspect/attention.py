"""What a model attends to: per-layer, per-head attention patterns, their entropy, and head importance.

Capture works on the pocketlm student and on any Hugging Face causal LM:
- the student: forward hooks on its `hook_pattern` hook points (models/attention.py), added inside `hooks(...)`,
  a context manager that removes them afterwards (TransformerLens' `model.hooks`), with the explicit attention path
  switched on for the duration;
- any other model: its eager attention (`set_attn_implementation("eager")`, restored afterwards) and
  `output_attentions=True`, which is what transformers' own models return their probabilities through.

Head importance is Michel et al. (2019), "Are Sixteen Heads Really Better than One?", §4.1: a mask ξ_h multiplies
each head's output; I_h = E_x |∂L(x)/∂ξ_h| at ξ = 1, the expectation over examples x (each example gets its own mask,
so one backward pass yields every example's gradient). The mask sits inside attention for the student (`hook_z`,
each head's output before o_proj) and in a pre-hook on o_proj for any other model, which is the same place.

Shape legend:
    b     batch size
    s     tokens
    n_h   query heads of a layer (layers of a head-pruned student differ)
    n_kv  key/value heads of a layer
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HookFn = Callable[[torch.Tensor, int], "torch.Tensor | None"]  # (tensor, layer index) → replacement or None
HOOK_POINTS = ("hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z")


def is_student(model: nn.Module) -> bool:
    from pocketlm.models.student import PocketLMConfig

    return isinstance(getattr(model, "config", None), PocketLMConfig)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's self-attention module, in layer order: the student's, or any module named `*self_attn` that
    has an `o_proj` (Llama, Mistral, Qwen, Gemma, Phi-3, Mixtral, ... in transformers)."""
    if is_student(model):
        base = getattr(model, "model", model)
        return [layer.self_attn for layer in base.layers]
    found = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "o_proj")]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no `*.self_attn` modules with an `o_proj`; head masks and importance need "
            "a Llama-style attention (captured patterns through output_attentions still work)"
        )
    return found


def head_counts(model: nn.Module) -> list[tuple[int, int]]:
    """(n_h, n_kv) of every layer."""
    if is_student(model):
        return [(a.num_heads, a.num_kv_heads) for a in attention_modules(model)]
    cfg = model.config
    n_h = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_h
    for i, attn in enumerate(attention_modules(model)):
        if attn.o_proj.in_features % n_h:
            raise ValueError(f"layer {i}: o_proj takes {attn.o_proj.in_features} features, not a multiple of {n_h} heads")
    return [(n_h, n_kv)] * len(attention_modules(model))


# --- contexts: hooks, eager attention, head masks ---------------------------------------------------------------


@contextmanager
def hooks(model: nn.Module, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[nn.Module]:
    """Add forward hooks to the student's hook points for the duration of the block, then remove every one of them
    (also on error). `fwd_hooks` is [(hook point name, fn)], fn(tensor, layer) → a replacement tensor or None."""
    if not is_student(model):
        raise TypeError(f"hook points exist on pocketlm students, not on a {type(model).__name__}")
    handles = []
    try:
        for name, fn in fwd_hooks:
            if name not in HOOK_POINTS:
                raise ValueError(f"unknown hook point {name!r}; valid: {', '.join(HOOK_POINTS)}")
            for i, attn in enumerate(attention_modules(model)):
                handles.append(getattr(attn, name).register_forward_hook(
                    lambda _m, _inp, out, fn=fn, i=i: fn(out, i)
                ))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run attention through the explicit (eager) path inside the block; the previous implementation is restored."""
    previous = model.config._attn_implementation
    try:
        if is_student(model):
            model.config._attn_implementation = "eager"  # the student reads it on every forward
        else:
            model.set_attn_implementation("eager")
            if model.config._attn_implementation != "eager":
                raise ValueError(f"{type(model).__name__} cannot switch to eager attention, so its probabilities "
                                 "cannot be captured")
        yield model
    finally:
        if is_student(model):
            model.config._attn_implementation = previous
        elif model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


@contextmanager
def head_mask(model: nn.Module, masks: Sequence[torch.Tensor], *, via: str = "auto") -> Iterator[nn.Module]:
    """Multiply each head's output by a mask inside the block. `masks[l]` is [n_h] or [b, n_h] for layer l.

    `via="hook_z"` (the student's default) scales the heads at the student's `hook_z` hook point; `via="o_proj"`
    (any other model's) scales the slices of o_proj's input that belong to each head: the same tensor, reached from
    outside. Both hooks are removed on exit.
    """
    counts = head_counts(model)
    if len(masks) != len(counts):
        raise ValueError(f"head_mask needs one mask per layer ({len(counts)}), got {len(masks)}")
    for i, (m, (n_h, _)) in enumerate(zip(masks, counts)):
        if m.shape[-1] != n_h or m.dim() not in (1, 2):
            raise ValueError(f"layer {i} has {n_h} heads; its mask must be [{n_h}] or [batch, {n_h}], got {tuple(m.shape)}")
    via = ("hook_z" if is_student(model) else "o_proj") if via == "auto" else via
    if via == "hook_z":
        def scale_z(z: torch.Tensor, layer: int) -> torch.Tensor:  # z [b, n_h, s, h_d]
            m = masks[layer].to(z.dtype)
            return z * (m[None, :, None, None] if m.dim() == 1 else m[:, :, None, None])

        with hooks(model, [("hook_z", scale_z)]):
            yield model
        return
    if via != "o_proj":
        raise ValueError(f"unknown head_mask route {via!r}; valid: auto, hook_z, o_proj")

    def scale_o_proj_input(layer: int) -> Callable:
        def pre_hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # [b, s, n_h·h_d]
            m = masks[layer].to(x.dtype)
            n_h = m.shape[-1]
            heads = x.view(*x.shape[:-1], n_h, x.shape[-1] // n_h)  # [b, s, n_h, h_d]
            heads = heads * (m[None, None, :, None] if m.dim() == 1 else m[:, None, :, None])
            return (heads.reshape(x.shape), *args[1:])

        return pre_hook

    with ExitStack() as stack:
        for i, attn in enumerate(attention_modules(model)):
            stack.callback(attn.o_proj.register_forward_pre_hook(scale_o_proj_input(i)).remove)
        yield model


# --- capture ----------------------------------------------------------------------------------------------------


def capture_patterns(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Attention probabilities of every layer, each [b, n_h, s, s], fp32 on the CPU. No gradients, no cache."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    with torch.no_grad(), eager_attention(model):
        if is_student(model):
            captured: dict[int, torch.Tensor] = {}

            def store(pattern: torch.Tensor, layer: int) -> None:
                captured[layer] = pattern.detach().float().cpu()

            with hooks(model, [("hook_pattern", store)]):
                model(input_ids, attention_mask=attention_mask, use_cache=False)
            return [captured[i] for i in range(len(captured))]
        out = model(input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False)
    if not out.attentions or any(a is None for a in out.attentions):
        raise ValueError(f"{type(model).__name__} returned no attention probabilities under eager attention")
    return [a.detach().float().cpu() for a in out.attentions]


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token as the text it decodes to on its own (byte-level pieces of a character show as the tokenizer
    decodes them), with newlines and tabs made visible."""
    return [tokenizer.decode([i]).replace("\n", "\\n").replace("\t", "\\t") for i in ids]


@dataclass
class AttentionMaps:
    """One text's attention in one model: `patterns[l]` [n_h, s, s] fp32; `head_ids[l]` the original index of each
    head (differs from 0..n_h-1 in a head-pruned student)."""

    spec: str
    token_ids: list[int]
    tokens: list[str]
    patterns: list[torch.Tensor]
    head_ids: list[list[int]]

    @property
    def num_layers(self) -> int:
        return len(self.patterns)

    def entropy(self) -> list[torch.Tensor]:
        """Per layer [n_h]: each head's attention entropy in nats, averaged over query positions."""
        return [attention_entropy(p) for p in self.patterns]


def capture_attention(
    model: nn.Module, tokenizer, text: str, *, spec: str = "", max_tokens: int | None = None
) -> AttentionMaps:
    """Tokenize `text` as the model's tokenizer does by default and capture every layer's attention."""
    if not text or not text.strip():
        raise ValueError("the text to inspect is empty")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # [1, s]
    if max_tokens is not None and ids.shape[1] > max_tokens:
        raise ValueError(f"the text is {ids.shape[1]} tokens; heat-maps stay readable up to max_tokens={max_tokens} "
                         "(raise it or shorten the text)")
    patterns = [p[0] for p in capture_patterns(model, ids)]  # [n_h, s, s] each
    if is_student(model):
        head_ids = [list(a.head_ids) for a in attention_modules(model)]
    else:
        head_ids = [list(range(p.shape[0])) for p in patterns]
    row = ids[0].tolist()
    return AttentionMaps(spec=spec, token_ids=row, tokens=token_labels(tokenizer, row), patterns=patterns,
                         head_ids=head_ids)


def attention_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """pattern [..., n_h, s, s_kv] → [..., n_h]: mean over queries of -Σ_j p_ij ln p_ij (nats; 0 ln 0 = 0)."""
    p = pattern.float()
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean(-1)


# --- head importance (Michel et al., 2019) ----------------------------------------------------------------------


@dataclass
class HeadImportance:
    """E_x |∂L_x/∂ξ| per head ([n_h] per layer) and per KV group ([n_kv] per layer: the group's heads masked
    together, E_x |Σ_{h∈g} ∂L_x/∂ξ_h|), over `n_examples` examples."""

    per_head: list[torch.Tensor]
    per_group: list[torch.Tensor]
    n_examples: int

    @staticmethod
    def layer_normalized(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's scores divided by their L2 norm, as Michel et al. (§4.1, after Molchanov et al., 2017) do
        before ranking heads across layers."""
        return [s / s.norm().clamp_min(1e-20) for s in scores]

    def to_dict(self) -> dict[str, list[list[float]] | int]:
        return {
            "per_head": [s.tolist() for s in self.per_head],
            "per_group": [s.tolist() for s in self.per_group],
            "per_group_layer_normalized": [s.tolist() for s in self.layer_normalized(self.per_group)],
            "n_examples": self.n_examples,
        }


def per_example_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """logits [b, s, v], ids [b, s] → [b] mean next-token cross-entropy of each row, in fp32 (or fp64)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # [b, s-1]
    return nll.mean(-1)


def head_gradients(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [b, n_h]: ∂L_x/∂ξ_h at ξ = 1 for each row x of `input_ids` [b, s] (L_x: its mean next-token loss)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    input_ids = input_ids.to(device)
    masks = [torch.ones(input_ids.shape[0], n_h, device=device, dtype=dtype, requires_grad=True)
             for n_h, _ in head_counts(model)]
    with torch.enable_grad(), head_mask(model, masks):
        logits = model(input_ids, use_cache=False).logits
        losses = per_example_loss(logits, input_ids)  # [b]
        grads = torch.autograd.grad(losses.sum(), masks)  # row x's mask only reaches row x's loss
    return [g.detach().cpu() for g in grads]


def head_importance(
    model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = False
) -> HeadImportance:
    """Michel et al.'s head importance over token blocks [n, s] (each block one example)."""
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n >= 1, s >= 2] token ids, got shape {tuple(blocks.shape)}")
    counts = head_counts(model)
    per_head = [torch.zeros(n_h, dtype=torch.float64) for n_h, _ in counts]
    per_group = [torch.zeros(n_kv, dtype=torch.float64) for _, n_kv in counts]
    starts = range(0, blocks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="head importance", unit="batch")
    for start in starts:
        grads = head_gradients(model, blocks[start : start + batch_size])
        for layer, (g, (n_h, n_kv)) in enumerate(zip(grads, counts)):
            per_head[layer] += g.abs().sum(0).double()
            per_group[layer] += g.view(-1, n_kv, n_h // n_kv).sum(-1).abs().sum(0).double()  # [n_kv]
    n = blocks.shape[0]
    return HeadImportance([(s / n).float() for s in per_head], [(s / n).float() for s in per_group], n)


def mean_entropy(entropies: Sequence[torch.Tensor]) -> float:
    """Mean attention entropy over every head of every layer."""
    values = torch.cat([e.flatten() for e in entropies])
    return float(values.mean()) if values.numel() else math.nan
