"""Which image patches each generated token attends to, drawn over the image.

The VLM answers greedily; then the whole sequence (prompt, image tokens, answer) is run once more with attention
captured (the eager / explicit path), which gives the attention each answer token was produced with (causal
attention: later tokens change nothing before them). For the query that predicts answer token t, the attention
to the image-token positions, averaged over heads and layers, is carried to patches through the projector's
`patch_map` (the identity for per-patch projectors; the resampler's cross-attention for it), reshaped to the
patch grid and drawn over the image. ``image_share`` is how much of that query's attention falls on image tokens.

Shape legend: L layers, n_h heads, s sequence, q image tokens, n = g_h·g_w patches, t answer tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketlm.models.images import to_rgb
from pocketlm.models.vision import VisionLanguageModel


@dataclass
class PatchAttention:
    tokens: list[str]  # the answer, token by token
    maps: np.ndarray  # [t, g_h, g_w], each summing to the image share of that token's attention
    image_share: np.ndarray  # [t]
    text: str  # the whole answer


@torch.no_grad()
def attention_over_patches(vlm: VisionLanguageModel, image: Any, prompt: str, *,
                           max_new_tokens: int = 24) -> PatchAttention:
    pixels = vlm.pixels([image])
    answer = vlm.generate_ids([prompt], pixels, max_new_tokens)[0]
    ids, _ = vlm.encode(prompt)
    n_prompt = len(ids)
    full = torch.tensor([ids + answer], device=vlm.device)  # [1, s]
    feats = vlm.image_features(pixels)  # [1, n, e]
    embeds = vlm.embed(full, vlm.projector(feats))
    lm = vlm.lm
    previous = getattr(lm.config, "_attn_implementation", None)
    if previous not in (None, "eager") and hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation("eager")
    try:
        out = lm(inputs_embeds=embeds, attention_mask=torch.ones_like(full), output_attentions=True,
                 use_cache=False)
    finally:
        if previous not in (None, "eager") and hasattr(lm, "set_attn_implementation"):
            lm.set_attn_implementation(previous)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError(f"{type(lm).__name__} returned no attention weights; it cannot be inspected")
    attn = torch.stack([a[0].float() for a in out.attentions]).mean((0, 1))  # [s, s]
    image_pos = (full[0] == vlm.image_token_id).nonzero().squeeze(-1)  # [q]
    queries = torch.arange(n_prompt - 1, n_prompt - 1 + len(answer), device=vlm.device)  # predict answer tokens
    to_image = attn[queries][:, image_pos]  # [t, q]
    patches = to_image @ vlm.projector.patch_map(feats)[0].float()  # [t, n]
    g_h, g_w = vlm.encoder.grid
    return PatchAttention(
        tokens=[vlm.tokenizer.decode([i]) for i in answer],
        maps=patches.reshape(len(answer), g_h, g_w).cpu().numpy(),
        image_share=to_image.sum(-1).cpu().numpy(),
        text=vlm.decode(answer),
    )


def _safe(text: str) -> str:
    """Model output shown as plain text: no mathtext ($), no control characters."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text.replace("$", r"\$")


def draw_patch_attention(image: Any, result: PatchAttention, path: str | Path, *, max_tokens: int = 12) -> Path:
    """A PNG: the image, then one panel per answer token with its attention over patches laid on the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = np.asarray(to_rgb(image))
    k = min(len(result.tokens), max_tokens)
    fig, axes = plt.subplots(1, k + 1, figsize=(2.2 * (k + 1), 2.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=9)
    h, w = rgb.shape[:2]
    for j in range(k):
        ax = axes[j + 1]
        m = result.maps[j]
        ax.imshow(rgb)
        ax.imshow(m / (m.max() or 1.0), cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest",
                  vmin=0, vmax=1)
        ax.set_title(f"{_safe(result.tokens[j])!s}\n{result.image_share[j]:.0%} on image", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(_safe(result.text)[:120], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
