"""Projectors: image-encoder features → tokens in the language model's embedding space. Chosen by name.

    linear     one matrix per patch (LLaVA, Liu et al. 2023)
    mlp        Linear → GELU → Linear per patch (LLaVA-1.5, Liu et al. 2023b)
    resampler  a perceiver-style resampler (Flamingo's Perceiver Resampler, Alayrac et al. 2022): a fixed number
               of learned queries cross-attend to the patches, so the LM sees ``num_tokens`` image tokens
               whatever the number of patches.

Position embeddings (``pos_embed``): a frozen encoder trained on position-free labels (our ViT on the scenes'
patch labels) can lose where a patch is, and the LM's own positions (raster order under RoPE) do not say which
column a patch is in. ``learned`` adds one learned vector per patch; ``2d`` adds a learned row vector plus a learned
column vector (factorised, so "same column" is one direction the LM can read). The per-patch projectors add them to
their output; the resampler adds them to the patches it attends to. ``none`` (the default) adds nothing.

Every projector also says which patches each image token stands for (`patch_map`), so attention over image
tokens can be drawn over the image: the identity for the per-patch projectors; for the resampler, each query's
cross-attention over patches, averaged over heads and layers (an approximation for more than one layer).

Adding one: a class taking (in_dim, out_dim, params, grid) decorated with ``@PROJECTORS.register("name")``.

Shape legend: b images, n patches, e encoder width, q image tokens out, d LM width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pocketlm.core.registry import Registry

PROJECTORS: Registry[type] = Registry("projector")


@dataclass(frozen=True)
class ProjectorParams:
    num_tokens: int = 16  # resampler: image tokens out
    depth: int = 2  # resampler: cross-attention layers
    num_heads: int = 4  # resampler
    hidden_mult: int = 1  # mlp: hidden width = hidden_mult · d
    pos_embed: str = "none"  # none | learned | 2d: position embeddings of the patch grid (module docstring)

    def __post_init__(self) -> None:
        for name in ("num_tokens", "depth", "num_heads", "hidden_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"projector.{name} must be a positive integer, got {value!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"projector.pos_embed must be one of {', '.join(POS_EMBEDS)}, got {self.pos_embed!r}")


POS_EMBEDS = ("none", "learned", "2d")


class PatchPositions(nn.Module):
    """Learned position embeddings of a gh × gw patch grid, added to per-patch vectors [b, n, d] (n = gh·gw,
    raster order): ``learned`` one vector per patch, ``2d`` row[r] + column[c]."""

    def __init__(self, kind: str, grid: tuple[int, int], d: int) -> None:
        super().__init__()
        gh, gw = grid
        self.n = gh * gw
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(self.n, d) * 0.02)  # [n, d]
        elif kind == "2d":
            self.row = nn.Parameter(torch.randn(gh, 1, d) * 0.02)  # [gh, 1, d]
            self.col = nn.Parameter(torch.randn(1, gw, d) * 0.02)  # [1, gw, d]
        else:
            raise ValueError(f"unknown pos_embed {kind!r}; valid: learned, 2d")

    def embeddings(self) -> torch.Tensor:
        return self.table if hasattr(self, "table") else (self.row + self.col).flatten(0, 1)  # [n, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.n:
            raise ValueError(f"position embeddings are for {self.n} patches, got {x.shape[1]}")
        return x + self.embeddings().to(x.dtype)


def _positions(params: ProjectorParams, grid: tuple[int, int] | None, d: int) -> PatchPositions | None:
    if params.pos_embed == "none":
        return None
    if grid is None:
        raise ValueError(f"projector.pos_embed {params.pos_embed!r} needs the encoder's patch grid")
    return PatchPositions(params.pos_embed, grid, d)


@PROJECTORS.register("linear")
class LinearProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, params: ProjectorParams = ProjectorParams(),
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.proj = self._layers(in_dim, out_dim, params)
        self.pos = _positions(params, grid, out_dim)

    @staticmethod
    def _layers(in_dim: int, out_dim: int, params: ProjectorParams) -> nn.Module:
        return nn.Linear(in_dim, out_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [b, n, e] → [b, n, d]
        return x if self.pos is None else self.pos(x)

    def patch_map(self, x: torch.Tensor) -> torch.Tensor:
        """[b, q, n]: image token i is patch i."""
        return torch.eye(x.shape[1], device=x.device).expand(x.shape[0], -1, -1)


@PROJECTORS.register("mlp")
class MLPProjector(LinearProjector):
    @staticmethod
    def _layers(in_dim: int, out_dim: int, params: ProjectorParams) -> nn.Module:
        hidden = params.hidden_mult * out_dim
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class _ResamplerLayer(nn.Module):
    """latents + CrossAttn(norm(latents), norm(x)), then latents + MLP(norm(latents))."""

    def __init__(self, d: int, n_h: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_h, batch_first=True)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, latents: torch.Tensor, x: torch.Tensor, need_weights: bool = False):
        kv = self.norm_kv(x)
        a, weights = self.attn(self.norm_q(latents), kv, kv, need_weights=need_weights)  # weights [b, q, n]
        latents = latents + a
        return latents + self.mlp(self.norm_mlp(latents)), weights


@PROJECTORS.register("resampler")
class ResamplerProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, params: ProjectorParams = ProjectorParams(),
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        if out_dim % params.num_heads:
            raise ValueError(f"projector.num_heads ({params.num_heads}) must divide the LM width ({out_dim})")
        self.inp = nn.Linear(in_dim, out_dim)
        self.pos = _positions(params, grid, out_dim)
        self.latents = nn.Parameter(torch.randn(params.num_tokens, out_dim) * out_dim**-0.5)  # [q, d]
        self.layers = nn.ModuleList(_ResamplerLayer(out_dim, params.num_heads) for _ in range(params.depth))
        self.norm = nn.LayerNorm(out_dim)
        self.out = nn.Linear(out_dim, out_dim)

    def num_tokens(self, num_patches: int) -> int:
        return self.latents.shape[0]

    def _run(self, x: torch.Tensor, need_weights: bool):
        x = self.inp(x)  # [b, n, d]
        if self.pos is not None:
            x = self.pos(x)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # [b, q, d]
        maps = []
        for layer in self.layers:
            latents, w = layer(latents, x, need_weights)
            maps.append(w)
        return self.out(self.norm(latents)), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, False)[0]  # [b, q, d]

    def patch_map(self, x: torch.Tensor) -> torch.Tensor:
        """[b, q, n]: each query's cross-attention over patches, averaged over heads and layers."""
        return torch.stack(self._run(x, True)[1]).mean(0)


def build_projector(kind: str, in_dim: int, out_dim: int, params: ProjectorParams = ProjectorParams(),
                    grid: tuple[int, int] | None = None) -> nn.Module:
    """A projector of ``kind``; ``grid`` (patches per side, rows × columns) is needed for position embeddings."""
    return PROJECTORS.get(kind)(in_dim, out_dim, params, grid)
