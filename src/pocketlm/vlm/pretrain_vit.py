"""A vision encoder for the shape scenes: our ViT pretrained on the generator's own per-patch labels.

LLaVA starts from a pretrained vision encoder (CLIP) and keeps it frozen. Our ViT is new, so before the LLaVA
stages it can be pretrained the way a supervised backbone is (on labels, then its classification heads thrown
away): every patch is labelled with the colour, kind and size of the shape covering most of it (or "none" when
shapes cover less than ``min_cover`` of the patch), read from the scene's exact mask, and three linear heads on
the patch features are trained with cross-entropy. Only the encoder is kept. This needs scenes (the generated
data); a user's folder of images has no such labels.

Shape legend: b images, n patches, d encoder width, p patch side.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pocketlm.data.scenes import COLOURS, KINDS, SIZES, Scene
from pocketlm.training import optimizer_step

FIELDS = {"colour": list(COLOURS), "kind": list(KINDS), "size": list(SIZES)}  # class 0 of each is "none"


def patch_labels(scene: Scene, patch: int, min_cover: float = 0.15) -> np.ndarray:
    """[n, 3] int labels (colour, kind, size) per patch in raster order; 0 = no shape covers ``min_cover``."""
    mask = np.asarray(scene.mask())  # [H, W], 0 or shape index + 1
    g = mask.shape[0] // patch
    blocks = mask[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    out = np.zeros((g * g, 3), dtype=np.int64)
    for i, block in enumerate(blocks):
        counts = np.bincount(block, minlength=len(scene.shapes) + 1)[1:]
        if counts.size and counts.max() >= min_cover * block.size:
            s = scene.shapes[int(counts.argmax())]
            out[i] = (FIELDS["colour"].index(s.colour) + 1, FIELDS["kind"].index(s.kind) + 1,
                      FIELDS["size"].index(s.size) + 1)
    return out


class PatchHeads(nn.Module):
    """One linear classifier per field over each patch's features."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, len(v) + 1) for v in FIELDS.values())

    def forward(self, feats: torch.Tensor) -> list[torch.Tensor]:
        return [h(feats) for h in self.heads]  # each [b, n, classes]


def pretrain_encoder(encoder: nn.Module, processor, scenes: Sequence[Scene], *, steps: int, lr: float,
                     batch_size: int, seed: int = 0, log: Callable[[dict], None] = lambda row: None,
                     log_every: int = 25, progress: bool = False, held_out: Sequence[Scene] = ()) -> dict:
    """Train ``encoder`` (our ViT) to label its patches; returns the final loss and held-out patch accuracy."""
    patch = encoder.config.patch_size
    if any(s.image_size != encoder.image_size for s in scenes):
        raise ValueError(f"scenes must be rendered at the encoder's image_size ({encoder.image_size})")
    device = next(encoder.parameters()).device
    pixels = processor.to_uint8([s.render() for s in scenes])  # [N, c, H, W]
    labels = torch.from_numpy(np.stack([patch_labels(s, patch) for s in scenes]))  # [N, n, 3]
    torch.manual_seed(seed)
    heads = PatchHeads(encoder.hidden_size).to(device)
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    encoder.train()
    start, losses = time.perf_counter(), []
    for step in tqdm(range(steps), desc="encoder", disable=not progress):
        idx = torch.randint(len(scenes), (min(batch_size, len(scenes)),), generator=g)
        logits = heads(encoder(processor.normalize(pixels[idx]).to(device)))
        y = labels[idx].to(device)
        loss = sum(F.cross_entropy(lg.flatten(0, 1), y[..., j].flatten()) for j, lg in enumerate(logits))
        losses.append(optimizer_step(loss, opt, sched, params))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log({"stage": "encoder", "step": step + 1, "loss": float(np.mean(losses[-log_every:])),
                 "elapsed_s": time.perf_counter() - start})
    encoder.eval()
    out = {"steps": steps, "final_loss": float(np.mean(losses[-max(1, steps // 10):])) if losses else float("nan"),
           "wall_s": time.perf_counter() - start, "trainable_parameters": sum(p.numel() for p in params)}
    if held_out:
        out["patch_accuracy"] = patch_accuracy(encoder, heads, processor, held_out)
    return out


@torch.no_grad()
def patch_accuracy(encoder: nn.Module, heads: PatchHeads, processor, scenes: Sequence[Scene]) -> dict[str, float]:
    """Share of patches whose colour / kind / size label is predicted exactly (on patches a shape covers)."""
    device = next(encoder.parameters()).device
    y = torch.from_numpy(np.stack([patch_labels(s, encoder.config.patch_size) for s in scenes])).to(device)
    logits = heads(encoder(processor([s.render() for s in scenes]).to(device)))
    covered = y[..., 0] > 0
    return {name: float((lg.argmax(-1) == y[..., j])[covered].float().mean())
            for j, (name, lg) in enumerate(zip(FIELDS, logits))}
