"""Attention for the pocketlm student: RMSNorm, rotary positions and grouped-query attention.

Everything here is numerically the same as transformers' Llama (same RMSNorm casts, same `rotate_half` RoPE, same
head grouping), so a student exports to a plain `LlamaForCausalLM` and matches it to fp32 rounding.

Attention has two paths that compute the same thing:
- `sdpa_attention`: `torch.nn.functional.scaled_dot_product_attention`, the fast path;
- `explicit_attention`: softmax(Q Kᵀ / √h_d + mask) V written out, softmax in fp32. It also returns the attention
  probabilities, so it is the capture path (`output_attentions=True`, or `attn_implementation="eager"`), and it is
  the reference the fast path is tested against.

Masks are additive (0 = may attend, dtype-min = may not), shape [b, 1, s, s_kv]. `mask=None` means plain causal
attention with query i at key position i (no cache, no padding), which lets SDPA use its `is_causal` kernels.

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

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), normalised in fp32 as Llama does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embedding (Su et al., 2021, RoFormer), Llama's half-split layout.

    Frequency i of a head is θ^(-2i/h_d); dimension j and j + h_d/2 form the rotated pair (`rotate_half`).
    The h_d/2 frequencies are recomputed in fp32 on each call rather than kept in a buffer, so casting the model
    (`.to(torch.bfloat16)`) or loading it from the meta device cannot degrade or lose them.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
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

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


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


def build_attention_mask(
    padding_mask: torch.Tensor | None,
    query_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive causal + padding mask [b, 1, s, s_kv] (s_kv = past_len + s), or None for plain causal attention.

    Query i sits at key position past_len + i and may attend keys j ≤ past_len + i that are not padding.
    `padding_mask` is the usual 2D [b, s_kv] mask (1 = token, 0 = padding), covering cached tokens too.
    A query whose every visible key is padding (a left-pad position) gets a row of dtype-min, which softmax turns
    into uniform weights rather than NaN; its output is meaningless and is never read.
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
    if padding_mask is None and past_len == 0:
        return None
    query_pos = torch.arange(past_len, kv_len, device=device)[:, None]  # [s, 1]
    key_pos = torch.arange(kv_len, device=device)[None, :]  # [1, s_kv]
    allowed = (key_pos <= query_pos)[None, None]  # [1, 1, s, s_kv]
    if padding_mask is not None:
        allowed = allowed & padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [b, 1, s, s_kv]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def causal_mask(query_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive form [1, 1, s, s_kv] of `mask=None`: query i attends keys j ≤ i."""
    allowed = torch.ones(query_len, kv_len, dtype=torch.bool, device=device).tril()  # [s, s_kv]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def _fit_mask(mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """A cache that pre-allocates (StaticCache) returns more keys than filled; mask the unfilled tail."""
    if mask is None or mask.shape[-1] >= kv_len:
        return mask
    return F.pad(mask, (0, kv_len - mask.shape[-1]), value=torch.finfo(mask.dtype).min)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Fused attention: q [b, n_h, s, h_d], k/v [b, n_kv, s_kv, h_d] → [b, n_h, s, h_d]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
    )


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q Kᵀ / √h_d + mask) V with the softmax in fp32 (Vaswani et al., 2017).

    q [b, n_h, s, h_d], k/v [b, n_kv, s_kv, h_d] → (output [b, n_h, s, h_d], probabilities [b, n_h, s, s_kv]).
    Query head h reads key/value head h // (n_h / n_kv), as in GQA (Ainslie et al., 2023).
    """
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # [b, n_h, s_kv, h_d]
    v = v.repeat_interleave(n_rep, dim=1)  # [b, n_h, s_kv, h_d]
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [b, n_h, s, s_kv]
    if mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], scores.dtype, scores.device)
    probs = torch.softmax((scores + mask).float(), dim=-1).to(q.dtype)  # [b, n_h, s, s_kv]
    return torch.matmul(probs, v), probs


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with n_kv key/value heads shared by groups of n_h / n_kv query heads.

    Parameter names (q_proj, k_proj, v_proj, o_proj; no biases) are Llama's, so weights map one to one.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx  # this layer's slot in the KV cache
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        explicit: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [b, s, d] → (output [b, s, d], probabilities [b, n_h, s, s_kv] if `explicit` else None).

        `cache` (a transformers `Cache`) receives this call's keys/values and returns all of this layer's.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, n_h, s, h_d]
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, n_kv, s, h_d]
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, n_kv, s, h_d]
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [b, n_kv, s_kv, h_d]
        mask = _fit_mask(mask, k.shape[-2])
        if explicit:
            out, probs = explicit_attention(q, k, v, mask)
        else:
            out, probs = sdpa_attention(q, k, v, mask), None
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # [b, s, n_h·h_d]
        return self.o_proj(out), probs
