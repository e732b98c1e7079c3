"""Parameter counts that know Mixture-of-Experts: total parameters vs those one token's forward pass uses.

A sparse layer holds E experts but a token passes through k of them (on average k for expert choice), so its
active share of the routed expert parameters is k/E; everything else (embeddings, attention, norms, routers, shared
experts, dense MLPs) is counted as active. An MoE block is any module with a `top_k` and an `experts` child that has
`num_experts`: pocketlm's `MoELayer` and transformers' Mixtral-style sparse blocks both are, so a student and its
Mixtral export count the same.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # every parameter (a tied output head counted once)
    embedding: int  # input embeddings, and the output head when it is not tied
    routed: int  # parameters of routed experts, all of them
    active: int  # parameters a token's forward pass uses: total − routed + routed · k / E

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "non_embedding": self.non_embedding, "active_non_embedding": self.active_non_embedding}


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules()
        if isinstance(getattr(m, "top_k", None), int) and hasattr(getattr(m, "experts", None), "num_experts")
    ]  # fmt: skip


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total, embedding, routed-expert and active-per-token parameter counts of a (possibly sparse) causal LM."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding_params = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embedding_params[id(head.weight)] = head.weight
    embedding = sum(p.numel() for p in embedding_params.values())
    routed = 0
    active = total
    for block in _moe_blocks(model):
        n = sum(p.numel() for p in block.experts.parameters())
        routed += n
        active -= n - n * min(block.top_k, block.experts.num_experts) // block.experts.num_experts
    return ParameterCounts(total=total, embedding=embedding, routed=routed, active=active)
