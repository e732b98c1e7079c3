"""Sparse Mixture-of-Experts MLP: a router sends each token to a few SwiGLU experts and mixes their outputs.

`MoELayer` stands where a dense MLP stands (`student.build_mlp` picks it when the config has `moe`); it is given
its router (models/routers.py), its experts and optional always-on shared experts (DeepSeekMoE, Dai et al., 2024).
Fine-grained experts (Dai et al., 2024) are just more, smaller experts: `expert_size` below the dense width.

The expert computation has two implementations that compute the same thing (tested equal in fp32 to 1e-5,
forward and backward):
- `experts_reference`: a loop over experts, each applied to the tokens routed to it. Obvious, and slow.
- `experts_dropless`: the token slots sorted by expert, so each expert's tokens are one contiguous slice; the
  SwiGLU runs over all slices at once, each projection one grouped matmul (`torch._grouped_mm`), or, when experts
  get many tokens each (or grouped_mm cannot take the tensors), expert by expert over `torch.split` slices; the
  outputs are weighted and scattered back. Dropless as in MegaBlocks (Gale et al., 2022): no expert has a
  capacity to pad to or drop at (only the switch router drops, by its own rule).
Measured on these cores, one thread, fwd+bwd, d=512 (E=8/k=2/f=1024 and E=32/k=4/f=256, 256-8192 tokens): the
grouped matmul is up to 1.4× the split loop when experts get few tokens (its loop is in C++, with fewer autograd
nodes), the split loop 5-10 % ahead from ~1,024 tokens per expert (one expert's SwiGLU stays in cache); a padded
bmm was 0-40 % slower, and per-expert slices of the [E, ...] weights 2-5× slower (each slice's backward writes a
full-size zero gradient). benchmarks/moe_dispatch.py compares the whole layer with transformers' Mixtral block.

The layer returns `(output, aux)`: `aux["aux_loss"]` is the sum of the router's weighted auxiliary losses (the
trainer adds it to the loss), the rest is telemetry of this call (`router_telemetry`).

Shape legend:
    b  batch size     s  sequence length    n  tokens (b·s)       d  hidden size
    f  expert size    E  routed experts     k  slots per token    a  filled slots (≤ n·k)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedConfig

from pocketlm.models.routers import Router, Routing, build_router
from pocketlm.models.mlp import SwiGLUMLP


class Experts(nn.Module):
    """E SwiGLU experts as two 3D tensors in transformers' Mixtral layout (so export is a rename):
    `gate_up_proj` [E, 2f, d] (an expert's gate rows, then its up rows) and `down_proj` [E, d, f]."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_size = num_experts, hidden_size, expert_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, expert_size={self.expert_size}"


def _swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)  # [.., f] each
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------ the reference
def experts_reference(x: Tensor, weights: Tensor, experts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Σ over a token's filled slots of weight · expert(x), one expert at a time. x: [n, d] → [n, d]."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(experts == e)  # the tokens that chose expert e, and in which slot
        if token.numel() == 0:
            continue
        y = F.linear(_swiglu(F.linear(x[token], gate_up[e])), down[e])  # [m, d]
        out = out.index_add(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------ the fast path
def _grouped_mm_fits(x: Tensor, weight: Tensor) -> bool:
    """torch._grouped_mm on CPU needs 16-byte aligned pointers and strides; on CUDA we use it in bf16 only."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    size = x.element_size()
    return all(v * size % 16 == 0 for v in (x.shape[-1], weight.shape[-2], x.data_ptr(), weight.data_ptr()))


LOOP_ROWS = 1024  # from this many token slots per expert (on average), run the experts one by one


def _autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast to the autocast dtype when autocast is on (grouped_mm is not autocast-aware; F.linear is)."""
    if not torch.is_autocast_enabled(tensors[0].device.type):
        return tensors
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t.to(dtype) for t in tensors)


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """Rows of `x` in E consecutive groups of `counts` rows; group e is multiplied by weight[e]ᵀ.
    x: [a, i], weight: [E, o, i], counts: [E] → [a, o]."""
    x, weight = _autocast(x, weight)
    if _grouped_mm_fits(x, weight):
        offsets = counts.cumsum(0).to(torch.int32)  # [E]: end row of each group
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    parts = [F.linear(xe, we) for xe, we in zip(x.split(counts.tolist()), weight.unbind(0))]
    return torch.cat(parts)


def _expert_by_expert(xs: Tensor, gate_up: Tensor, down: Tensor, counts: Tensor) -> Tensor:
    """Each expert's whole SwiGLU over its slice of `xs` [a, d], one expert after another → [a, d]."""
    xs, gate_up, down = _autocast(xs, gate_up, down)
    slices = xs.split(counts.tolist())
    return torch.cat([F.linear(_swiglu(F.linear(xe, gu)), dn)
                      for xe, gu, dn in zip(slices, gate_up.unbind(0), down.unbind(0))])


def experts_dropless(x: Tensor, weights: Tensor, experts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """What `experts_reference` computes, with every expert's tokens in one grouped pass. x: [n, d] → [n, d]."""
    n, k = experts.shape
    num_experts = gate_up.shape[0]
    flat = experts.reshape(-1)  # [n·k]
    key = torch.where(flat < 0, num_experts, flat)  # empty slots sort last
    order = torch.argsort(key, stable=True)  # [n·k]
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]  # [E]
    order = order[: int(counts.sum())]  # [a]: the filled slots, grouped by expert
    token = order // k  # [a]
    xs, gate_up, down = _autocast(x[token], gate_up, down)  # [a, d]: each expert's tokens in one slice
    if order.numel() >= LOOP_ROWS * num_experts or not _grouped_mm_fits(xs, gate_up):
        y = _expert_by_expert(xs, gate_up, down, counts)  # [a, d]
    else:
        y = grouped_linear(_swiglu(grouped_linear(xs, gate_up, counts)), down, counts)  # [a, 2f] → [a, d]
    y = y.float() * weights.reshape(-1)[order, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add(0, token, y).to(x.dtype)


DISPATCH = {"dropless": experts_dropless, "reference": experts_reference}


# ------------------------------------------------------------------------------------------ telemetry
@torch.no_grad()
def router_telemetry(routing: Routing, num_experts: int) -> dict[str, Tensor]:
    """Statistics of one call: `tokens_per_expert` [E] (filled slots per expert), `load_cv` (std / mean of those,
    population std), `dropped_share` (share of tokens no expert processed), `router_entropy` (mean entropy of the
    router's distribution over experts, nats; absent when the router has none) and `tokens` (n)."""
    experts = routing.experts
    filled = experts[experts >= 0]
    load = torch.bincount(filled, minlength=num_experts).float()  # [E]
    mean = load.mean()
    stats = {
        "tokens_per_expert": load,
        "load_cv": load.std(unbiased=False) / mean if mean > 0 else torch.zeros((), device=load.device),
        "dropped_share": (experts < 0).all(dim=-1).float().mean(),
        "tokens": torch.tensor(float(experts.shape[0]), device=load.device),
    }
    if routing.probs is not None:
        p = routing.probs.float()
        stats["router_entropy"] = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
    return stats


# ------------------------------------------------------------------------------------------ the layer
class MoELayer(nn.Module):
    """router → experts (dropless) → weighted sum, plus shared experts when given. x: [b, s, d] → ([b, s, d], aux)."""

    def __init__(self, router: Router, experts: Experts, shared: nn.Module | None = None,
                 dispatch: str = "dropless") -> None:
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"unknown dispatch {dispatch!r}; valid: {', '.join(DISPATCH)}")
        self.router, self.experts, self.shared = router, experts, shared
        self.dispatch = dispatch

    @property
    def causal_safe(self) -> bool:
        return self.router.causal_safe

    @property
    def wants_token_ids(self) -> bool:
        return self.router.wants_token_ids

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def after_step(self, tokens_per_expert: Tensor) -> None:
        self.router.after_step(tokens_per_expert)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        b, s, d = x.shape
        routing = self.router(x, token_ids)
        flat = x.reshape(-1, d)  # [n, d]
        out = DISPATCH[self.dispatch](
            flat, routing.weights, routing.experts, self.experts.gate_up_proj, self.experts.down_proj
        )
        if self.shared is not None:
            out = out + self.shared(flat)
        losses = routing.losses
        aux: dict[str, Tensor] = {
            "aux_loss": sum(losses.values()) if losses else torch.zeros((), device=x.device),
            **{name: value.detach() for name, value in losses.items()},
            **router_telemetry(routing, self.experts.num_experts),
        }
        return out.view(b, s, d), aux


def moe_layer_ids(config: PreTrainedConfig) -> list[int]:
    """The student layers that have an MoE MLP under `config`, a `PocketLMConfig` (none when config.moe is unset)."""
    if config.moe is None:
        return []
    chosen = config.moe.get("layers")
    return list(range(config.num_hidden_layers)) if chosen is None else sorted(chosen)


def build_moe(config: PreTrainedConfig, layer_idx: int) -> MoELayer:
    """The MoE MLP of layer `layer_idx` as `config.moe` describes it."""
    moe: dict[str, Any] = config.moe
    size = moe["expert_size"] or config.intermediate_size
    router = build_router(moe["router"], config.hidden_size, moe, vocab_size=config.vocab_size, layer_idx=layer_idx)
    experts = Experts(moe["num_experts"], config.hidden_size, size)
    shared = SwiGLUMLP(config.hidden_size, moe["num_shared_experts"] * size) if moe["num_shared_experts"] else None
    return MoELayer(router, experts, shared)


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """Layer index → MoE MLP of a pocketlm student (PocketLMForCausalLM or PocketLMModel)."""
    base = getattr(model, "model", model)
    return {i: layer.mlp for i, layer in enumerate(base.layers) if isinstance(layer.mlp, MoELayer)}


def apply_router_updates(model: nn.Module, tokens_per_expert: dict[int, Tensor]) -> None:
    """After an optimizer step: hand each MoE layer's router the step's load per expert (aux_free moves its bias)."""
    layers = moe_layers(model)
    for i, load in tokens_per_expert.items():
        layers[i].after_step(load)
