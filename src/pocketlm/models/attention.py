"""Attention for the pocketlm student: RMSNorm, position schemes and grouped-query attention.

With the default rotary scheme everything here is numerically the same as transformers' Llama (same RMSNorm casts,
same `rotate_half` RoPE, same head grouping), so a student exports to a plain `LlamaForCausalLM` and matches it to
fp32 rounding.

Position schemes are a registry (`POSITION_SCHEMES`): "rotary" (RoPE, Su et al., 2021), "alibi" (linear biases,
Press et al., 2022) and "none" (no positional signal beyond the causal mask, Haviv et al., 2022). A scheme computes
what it needs once per forward: rotary gives cos/sin tables that rotate q and k; ALiBi gives an additive per-head
bias that is folded into the attention mask. An optional sliding window (Beltagy et al., 2020; Mistral) lets query i
see only keys j with i - w < j ≤ i.

MHA, GQA and MQA are one module: `n_kv` key/value heads each shared by a group of `n_h / n_kv` query heads. A layer
may keep only some of its original KV groups (head pruning, `kv_head_ids`); its query heads keep their original
indices in `head_ids`, so a per-head bias (ALiBi slopes) stays attached to the head it was trained with.

Hook points (`hook_q`, `hook_k`, `hook_v`, `hook_pattern`, `hook_z`) are identities that name intermediate tensors,
as TransformerLens' HookPoints do; `pocketlm.inspect.attention` adds hooks to them inside a context manager that
removes them afterwards. `hook_pattern` only runs on the explicit path.

Attention has two paths that compute the same thing:
- `sdpa_attention`: `torch.nn.functional.scaled_dot_product_attention`, the fast path;
- `explicit_attention`: softmax(Q Kᵀ / √h_d + mask) V written out, softmax in fp32. It also returns the attention
  probabilities, so it is the capture path (`output_attentions=True`, or `attn_implementation="eager"`), and it is
  the reference the fast path is tested against.

Masks are additive (0 = may attend, dtype-min = may not, plus any position bias), shape [b, 1 or n_h, s, s_kv].
`mask=None` means plain causal attention with query i at key position i (no cache, no padding, no window, no bias),
which lets SDPA use its `is_causal` kernels.

Shape legend:
    b     batch size
    s     query length (tokens in this forward call)
    s_kv  key/value length (cached tokens + s)
    d     hidden size
    n_h   query heads
    n_kv  key/value heads; n_h % n_kv == 0 (n_kv == n_h: MHA, 1 < n_kv < n_h: GQA, n_kv == 1: MQA)
    h_d   head dimension
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from pocketlm.core.registry import Registry


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), normalised in fp32 as Llama does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.promote_types(input_dtype, torch.float32))  # fp32, or fp64 for an fp64 model
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class HookPoint(nn.Module):
    """An identity that names an intermediate tensor so a forward hook can read or replace it (TransformerLens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --- position schemes -------------------------------------------------------------------------------------------


class PositionScheme(nn.Module):
    """How token positions enter attention; computed once per forward and shared by every layer.

    `tables` gives (cos, sin) [b, s, h_d] that rotate q and k, or (None, None); `bias` gives an additive score bias
    [1, n_h, s, s_kv] over all of the model's original query heads, or None. Neither holds parameters or buffers, so
    a checkpoint does not depend on the scheme's implementation.
    """

    def tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def bias(self, query_len: int, past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return None


POSITION_SCHEMES: Registry[type[PositionScheme]] = Registry("position scheme")


@POSITION_SCHEMES.register("rotary")
class RotaryEmbedding(PositionScheme):
    """cos/sin tables of rotary position embedding (Su et al., 2021, RoFormer), Llama's half-split layout.

    Frequency i of a head is θ^(-2i/h_d); dimension j and j + h_d/2 form the rotated pair (`rotate_half`).
    The h_d/2 frequencies are recomputed in fp32 on each call rather than kept in a buffer, so casting the model
    (`.to(torch.bfloat16)`) or loading it from the meta device cannot degrade or lose them.
    """

    def __init__(self, head_dim: int, theta: float, **_: Any) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """[h_d / 2] inverse frequencies θ^(-2i/h_d), fp32, computed exactly as transformers' Llama does."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] → (cos, sin), each [b, s, h_d], computed in fp32 and cast to `dtype`."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # [b, s, h_d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, h_d]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    tables = forward

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """[n_h] ALiBi slopes (Press et al., 2022, §3 and their reference code), fp32.

    For n a power of two: 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise the slopes of the largest power of two
    m < n, followed by every other slope of 2m until there are n.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(m)
    if m < num_heads:
        slopes += power_of_two(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


@POSITION_SCHEMES.register("alibi")
class ALiBi(PositionScheme):
    """Attention with linear biases (Press et al., 2022): head h adds -slope_h · (i - j) to the score of query i on
    key j. Distances are taken between cache slots, which equal position differences for left-padded batches."""

    def __init__(self, num_heads: int, **_: Any) -> None:
        super().__init__()
        self.num_heads = num_heads

    def bias(self, query_len: int, past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        query_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]  # [s, 1]
        key_pos = torch.arange(past_len + query_len, device=device)[None, :]  # [1, s_kv]
        distance = (query_pos - key_pos).clamp(min=0).float()  # [s, s_kv]; the future is masked anyway
        slopes = alibi_slopes(self.num_heads).to(device)[:, None, None]  # [n_h, 1, 1]
        return (-slopes * distance)[None].to(dtype)  # [1, n_h, s, s_kv]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


@POSITION_SCHEMES.register("none")
class NoPosition(PositionScheme):
    """No position signal: a causal decoder still infers order from the mask (Haviv et al., 2022, "NoPos")."""

    def __init__(self, **_: Any) -> None:
        super().__init__()


def build_position_scheme(config: Any) -> PositionScheme:
    """The scheme `config.position_scheme` names (default rotary), built from the config's head shape."""
    cls = POSITION_SCHEMES.get(getattr(config, "position_scheme", "rotary"))
    return cls(head_dim=config.head_dim, theta=config.rope_theta, num_heads=config.num_attention_heads)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, n_h, s, h_d] and k [b, n_kv, s, h_d] by cos/sin [b, s, h_d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, s, h_d], broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# --- masks ------------------------------------------------------------------------------------------------------


def build_attention_mask(
    padding_mask: torch.Tensor | None,
    query_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
    window: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Additive causal + padding (+ window, + bias) mask [b, 1 or n_h, s, s_kv], or None for plain causal attention.

    Query i sits at key position past_len + i and may attend keys j ≤ past_len + i that are not padding, and with a
    `window` w only keys j > past_len + i - w (w keys, itself included). `bias` [1, n_h, s, s_kv] (ALiBi) is added
    where attending is allowed. `padding_mask` is the usual 2D [b, s_kv] mask (1 = token, 0 = padding), covering
    cached tokens too. A query whose every visible key is padding (a left-pad position) gets a row of dtype-min,
    which softmax turns into uniform weights rather than NaN; its output is meaningless and is never read.
    """
    kv_len = past_len + query_len
    if padding_mask is not None:
        if padding_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be a 2D [batch, seq] padding mask, got shape {tuple(padding_mask.shape)}"
            )
        if padding_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {padding_mask.shape[-1]} positions but the keys are {kv_len} "
                f"({past_len} cached + {query_len} new); the mask must include the cached positions"
            )
        if bool(padding_mask.bool().all()):
            padding_mask = None
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be a positive number of tokens, got {window}")
    window_bites = window is not None and kv_len > window
    if padding_mask is None and past_len == 0 and not window_bites and bias is None:
        return None
    query_pos = torch.arange(past_len, kv_len, device=device)[:, None]  # [s, 1]
    key_pos = torch.arange(kv_len, device=device)[None, :]  # [1, s_kv]
    allowed = key_pos <= query_pos  # [s, s_kv]
    if window_bites:
        allowed = allowed & (key_pos > query_pos - window)
    allowed = allowed[None, None]  # [1, 1, s, s_kv]
    if padding_mask is not None:
        allowed = allowed & padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [b, 1, s, s_kv]
    zero = torch.zeros((), dtype=dtype, device=device) if bias is None else bias.to(dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)  # [b, 1 or n_h, s, s_kv]


def causal_mask(query_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive form [1, 1, s, s_kv] of `mask=None`: query i attends keys j ≤ i."""
    allowed = torch.ones(query_len, kv_len, dtype=torch.bool, device=device).tril()  # [s, s_kv]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def _fit_mask(mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """Fit the mask to the keys the cache returned. A cache that pre-allocates (StaticCache) returns more keys than
    filled: mask the unfilled tail. A sliding-window cache (what `generate()` builds when the config has a
    `sliding_window`) keeps only the latest keys: keep the mask's latest columns (the dropped ones were outside the
    window, so fully masked)."""
    if mask is None or mask.shape[-1] == kv_len:
        return mask
    if mask.shape[-1] > kv_len:
        return mask[..., -kv_len:]
    return F.pad(mask, (0, kv_len - mask.shape[-1]), value=torch.finfo(mask.dtype).min)


# --- the two attention paths ------------------------------------------------------------------------------------


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Fused attention: q [b, n_h, s, h_d], k/v [b, n_kv, s_kv, h_d] → [b, n_h, s, h_d]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
    )


def attention_pattern(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q Kᵀ / √h_d + mask) with the softmax in fp32 or wider (Vaswani et al., 2017), as q's dtype.

    q [b, n_h, s, h_d], k [b, n_kv, s_kv, h_d] → probabilities [b, n_h, s, s_kv]. Query head h reads key head
    h // (n_h / n_kv), as in GQA (Ainslie et al., 2023).
    """
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [b, n_h, s_kv, h_d]
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [b, n_h, s, s_kv]
    if mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], scores.dtype, scores.device)
    return torch.softmax((scores + mask).to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_pattern` times V: q [b, n_h, s, h_d], k/v [b, n_kv, s_kv, h_d] →
    (output [b, n_h, s, h_d], probabilities [b, n_h, s, s_kv]). The reference the SDPA path is tested against."""
    probs = attention_pattern(q, k, mask)
    return torch.matmul(probs, v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)), probs


# --- the module -------------------------------------------------------------------------------------------------


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with n_kv key/value heads shared by groups of n_h / n_kv query heads.

    Parameter names (q_proj, k_proj, v_proj, o_proj; no biases) are Llama's, so weights map one to one.
    `num_heads`/`num_kv_heads` are the model's (unpruned) counts; `kv_head_ids`, when given, are the original KV
    heads this layer keeps, each with its whole group of query heads (see `pocketlm.inspect.prune`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        kv_head_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        group = num_heads // num_kv_heads
        self.kv_head_ids = list(range(num_kv_heads)) if kv_head_ids is None else [int(i) for i in kv_head_ids]
        self.head_ids = [g * group + r for g in self.kv_head_ids for r in range(group)]  # original query heads
        self.pruned = len(self.kv_head_ids) != num_kv_heads
        self.num_heads = len(self.head_ids)
        self.num_kv_heads = len(self.kv_head_ids)
        self.head_dim = head_dim
        self.layer_idx = layer_idx  # this layer's slot in the KV cache
        self.q_proj = nn.Linear(hidden_size, self.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * head_dim, hidden_size, bias=False)
        self.hook_q = HookPoint()  # [b, n_h, s, h_d], after the position scheme
        self.hook_k = HookPoint()  # [b, n_kv, s, h_d], after the position scheme, before the cache
        self.hook_v = HookPoint()  # [b, n_kv, s, h_d]
        self.hook_pattern = HookPoint()  # [b, n_h, s, s_kv] attention probabilities (explicit path only)
        self.hook_z = HookPoint()  # [b, n_h, s, h_d] each head's output, before o_proj mixes the heads

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        explicit: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [b, s, d] → (output [b, s, d], probabilities [b, n_h, s, s_kv] if `explicit` else None).

        cos/sin are the rotary tables (None for other schemes); a per-head `mask` [b, N, s, s_kv] covers the model's
        N original heads and is narrowed to this layer's. `cache` (a transformers `Cache`) receives this call's
        keys/values and returns all of this layer's.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, n_h, s, h_d]
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, n_kv, s, h_d]
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, n_kv, s, h_d]
        if cos is not None:
            q, k = apply_rotary(q, k, cos, sin)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [b, n_kv, s_kv, h_d]
        mask = _fit_mask(mask, k.shape[-2])
        if mask is not None and mask.shape[1] > 1 and self.pruned:
            mask = mask[:, self.head_ids]  # [b, n_h, s, s_kv]: this layer's heads of a per-head bias
        if explicit:
            probs = self.hook_pattern(attention_pattern(q, k, mask))  # [b, n_h, s, s_kv]
            out = torch.matmul(probs, v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1))
        else:
            out, probs = sdpa_attention(q, k, v, mask), None
        out = self.hook_z(out)  # [b, n_h, s, h_d]
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # [b, s, n_h·h_d]
        return self.o_proj(out), probs

    def extra_repr(self) -> str:
        kept = f", kv_head_ids={self.kv_head_ids}" if self.pruned else ""
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}{kept}"


def attention_from_config(config: Any, layer_idx: int) -> GroupedQueryAttention:
    """Layer `layer_idx`'s attention from a student config (`kept_kv_heads` selects a pruned layer's groups)."""
    kept = getattr(config, "kept_kv_heads", None)
    return GroupedQueryAttention(
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim, layer_idx,
        kv_head_ids=None if kept is None else kept[layer_idx],
    )
