"""Routers of a sparse Mixture-of-Experts layer: which experts see each token, and with what weight.

Each router is an `nn.Module` registered by name in `ROUTERS`. `forward(x, token_ids)` returns a `Routing`: the
combine weights and expert ids of each token's k slots, the router's distribution over experts (for telemetry) and
its auxiliary losses, each already multiplied by its coefficient. Nothing is kept in globals: the layer returns what
its router returns, and a router with per-step state (aux_free's bias) is nudged by `after_step(tokens_per_expert)`,
which the trainer calls after each optimizer step with the step's expert loads.

An empty slot (a token dropped over an expert's capacity, or an expert that did not choose it) has expert id -1 and
weight 0; a token whose slots are all empty passes through the layer's residual connection only.

Shape legend:
    b  batch size        s  sequence length      n  tokens in the call (b·s)
    d  hidden size       E  routed experts       k  slots per token
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pocketlm.core.registry import Registry

HASH_SEED = 1_000_003  # hash router of layer i draws its token → expert map from seed HASH_SEED + i


class Routing(NamedTuple):
    weights: Tensor  # [n, k] combine weights (fp32); 0 in an empty slot
    experts: Tensor  # [n, k] expert ids (int64); -1 in an empty slot
    probs: Tensor | None  # [n, E] the router's distribution over experts; None for a router that learns nothing
    losses: dict[str, Tensor]  # auxiliary losses (scalars), each already × its coefficient


def load_balancing_loss(probs: Tensor, experts: Tensor, num_experts: int) -> Tensor:
    """E · Σ_i f_i · P_i: Switch Transformer's auxiliary loss (Fedus et al., 2021, eq. 4; GShard's for top-k).

    f_i is the share of tokens whose slots select expert i (summed over the k slots, as transformers'
    `load_balancing_loss_func` for Mixtral does; empty slots count for no expert), P_i the mean router probability
    of expert i. It is k at uniform routing, and larger the more the load and probability mass concentrate.
    probs: [n, E]; experts: [n, k].
    """
    n = probs.shape[0]
    selected = F.one_hot(experts.clamp(min=0), num_experts).to(probs.dtype) * (experts >= 0).unsqueeze(-1)
    f = selected.sum(dim=(0, 1)) / max(n, 1)  # [E]
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """mean over tokens of logsumexp(logits)²: ST-MoE's router z-loss (Zoph et al., 2022, eq. 5). logits: [n, E]."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class Router(nn.Module):
    """Base class. `causal_safe`: a token's route depends only on itself (and so cannot leak later tokens)."""

    causal_safe: bool = True
    wants_token_ids: bool = False  # hash routing reads token ids; the block passes them only when asked

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k

    def upcycle_scale(self) -> float:
        """The combine weight a token's experts sum to under a uniform router. Upcycling divides the copied down
        projections by it, so that an upcycled layer with a fresh (near-uniform) router starts near the dense MLP."""
        return 1.0

    def after_step(self, tokens_per_expert: Tensor) -> None:
        """Called by the trainer after each optimizer step with that step's load per expert [E]; most do nothing."""

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:  # x: [b, s, d]
        raise NotImplementedError


ROUTERS: Registry[type[Router]] = Registry("router")


class LearnedRouter(Router):
    """A linear map to one logit per expert (`proj`, [E, d]), plus the z-loss every learned router may add."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, z_loss_coef: float = 0.0, **_: object):
        super().__init__(hidden_size, num_experts, top_k)
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.z_loss_coef = z_loss_coef

    def logits(self, x: Tensor) -> Tensor:
        return self.proj(x)  # [b, s, E]

    def _z(self, logits: Tensor) -> dict[str, Tensor]:
        return {"z_loss": self.z_loss_coef * router_z_loss(logits)} if self.z_loss_coef > 0 else {}


@ROUTERS.register("topk_softmax")
class TopKSoftmaxRouter(LearnedRouter):
    """Top-k of a softmax over experts, the k weights renormalised to sum to one (Shazeer et al., 2017, without the
    noise; Mixtral's router), with the Switch/GShard load-balancing loss α·E·Σ f_i·P_i. Dropless."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, balance_coef: float = 0.0, **kw: object):
        super().__init__(hidden_size, num_experts, top_k, **kw)
        self.balance_coef = balance_coef

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.logits(x).reshape(-1, self.num_experts)  # [n, E]
        probs = logits.float().softmax(dim=-1)
        top, experts = probs.topk(self.top_k, dim=-1)  # [n, k] each
        weights = top / top.sum(dim=-1, keepdim=True)
        losses = self._z(logits)
        if self.balance_coef > 0:
            losses["balance_loss"] = self.balance_coef * load_balancing_loss(probs, experts, self.num_experts)
        return Routing(weights, experts, probs, losses)


@ROUTERS.register("switch")
class SwitchRouter(LearnedRouter):
    """Switch Transformer routing (Fedus et al., 2021): each token to its most probable expert, weighted by that
    probability. In training an expert takes at most ceil(capacity_factor · n / E) tokens, first come first served
    in token order; the rest are dropped (their slot emptied) and counted. At evaluation every token is routed, so a
    decoding step computes what the full forward does."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int = 1, *, balance_coef: float = 0.0,
        capacity_factor: float = 1.25, **kw: object,
    ) -> None:  # fmt: skip
        if top_k != 1:
            raise ValueError(f"top_k: the switch router sends each token to one expert, got {top_k}")
        super().__init__(hidden_size, num_experts, 1, **kw)
        self.balance_coef, self.capacity_factor = balance_coef, capacity_factor

    def capacity(self, n_tokens: int) -> int:
        return math.ceil(self.capacity_factor * n_tokens / self.num_experts)

    def upcycle_scale(self) -> float:
        return 1.0 / self.num_experts

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.logits(x).reshape(-1, self.num_experts)  # [n, E]
        probs = logits.float().softmax(dim=-1)
        gate, expert = probs.max(dim=-1)  # [n] each
        losses = self._z(logits)
        if self.balance_coef > 0:  # f_i counts the tokens sent to i before any is dropped, as in the paper
            losses["balance_loss"] = self.balance_coef * load_balancing_loss(probs, expert[:, None], self.num_experts)
        if self.training:
            onehot = F.one_hot(expert, self.num_experts)  # [n, E]
            position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # [n]: place in its expert's queue
            kept = position < self.capacity(expert.numel())
            expert = torch.where(kept, expert, -1)
            gate = gate * kept
        return Routing(gate[:, None], expert[:, None], probs, losses)


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(LearnedRouter):
    """Expert choice routing (Zhou et al., 2022): each expert picks its top-C tokens of each sequence by router
    probability, C = ceil(top_k · s / E), so every expert is exactly full and a token gets top_k experts on average
    (any number from 0 to E). A token's route depends on the whole sequence, later tokens included: not causal-safe,
    and refused for generation unless the config's moe.allow_noncausal_generation is set."""

    causal_safe = False

    def upcycle_scale(self) -> float:
        return self.top_k / self.num_experts

    def capacity(self, seq_len: int) -> int:
        return min(seq_len, math.ceil(self.top_k * seq_len / self.num_experts))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        b, s, _ = x.shape
        logits = self.logits(x)  # [b, s, E]
        probs = logits.float().softmax(dim=-1)
        gate, token = probs.transpose(1, 2).topk(self.capacity(s), dim=-1)  # [b, E, C] each
        ids = torch.arange(self.num_experts, device=x.device).view(1, 1, -1).expand(b, token.shape[-1], -1)
        experts = torch.full((b, s, self.num_experts), -1, device=x.device).scatter(1, token.mT, ids)  # [b, s, E]
        weights = probs.new_zeros(b, s, self.num_experts).scatter(1, token.mT, gate.mT)  # [b, s, E]
        n = b * s
        return Routing(weights.reshape(n, -1), experts.reshape(n, -1), probs.reshape(n, -1),
                       self._z(logits.reshape(n, -1)))


@ROUTERS.register("hash")
class HashRouter(Router):
    """Hash layers (Roller et al., 2021): a fixed token id → expert map, nothing learned, weight 1.

    The map is a seeded random balanced assignment (each expert gets vocab/E ids), different per layer, kept as a
    buffer (`table`, [vocab]) so it is saved with the model and can be inspected or replaced."""

    wants_token_ids = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, vocab_size: int, layer_idx: int = 0,
                 **_: object) -> None:
        if top_k != 1:
            raise ValueError(f"top_k: the hash router sends each token to one expert, got {top_k}")
        super().__init__(hidden_size, num_experts, 1)
        g = torch.Generator().manual_seed(HASH_SEED + layer_idx)
        self.register_buffer("table", torch.randperm(vocab_size, generator=g, device="cpu") % num_experts)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("hash routing maps token ids to experts: call the model with input_ids, not inputs_embeds")
        experts = self.table.to(token_ids.device)[token_ids.reshape(-1)].unsqueeze(-1)  # [n, 1]
        return Routing(torch.ones(experts.shape, device=x.device), experts, None, {})


@ROUTERS.register("aux_free")
class AuxFreeRouter(LearnedRouter):
    """DeepSeek-V3's auxiliary-loss-free balancing (Liu et al., 2024, §2.1.2; Wang et al., 2024): sigmoid affinities,
    top-k chosen on affinity + a per-expert bias, weights the chosen affinities renormalised. The bias steers
    selection only; after each step `after_step` moves it by γ towards balance: b_i += γ·sign(mean load − load_i)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, bias_update_rate: float = 1e-3,
                 **kw: object) -> None:
        super().__init__(hidden_size, num_experts, top_k, **kw)
        self.bias_update_rate = bias_update_rate
        self.register_buffer("bias", torch.zeros(num_experts))

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:
        logits = self.logits(x).reshape(-1, self.num_experts)  # [n, E]
        scores = torch.sigmoid(logits.float())
        experts = (scores + self.bias.float()).topk(self.top_k, dim=-1).indices  # [n, k]
        top = scores.gather(-1, experts)
        weights = top / top.sum(dim=-1, keepdim=True)
        return Routing(weights, experts, scores / scores.sum(dim=-1, keepdim=True), self._z(logits))

    @torch.no_grad()
    def after_step(self, tokens_per_expert: Tensor) -> None:
        load = tokens_per_expert.to(device=self.bias.device, dtype=torch.float32)
        self.bias += (self.bias_update_rate * torch.sign(load.mean() - load)).to(self.bias.dtype)


def build_router(name: str, hidden_size: int, moe: dict, *, vocab_size: int, layer_idx: int) -> Router:
    """The router `name` for one layer, given the (validated) MoE config as a dict; each takes what it uses."""
    return ROUTERS.get(name)(
        hidden_size, moe["num_experts"], moe["top_k"], balance_coef=moe["balance_coef"],
        z_loss_coef=moe["z_loss_coef"], capacity_factor=moe["capacity_factor"],
        bias_update_rate=moe["bias_update_rate"], vocab_size=vocab_size, layer_idx=layer_idx,
    )  # fmt: skip
