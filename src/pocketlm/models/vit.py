"""A small Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), and HF vision towers.

Patch embedding (a strided convolution), learned position embeddings, pre-norm blocks of multi-head
self-attention and a GELU MLP, a final LayerNorm. No class token: a VLM reads the patch tokens (LLaVA drops
CLIP's class token too). Attention has the explicit softmax path beside SDPA, so it can be captured.

`HFVisionEncoder` wraps any Hugging Face vision model from a folder (CLIP, SigLIP vision towers, or a full
CLIP/SigLIP model, whose vision tower is used) behind the same interface: pixels in, patch features out.

Shape legend:
    b   images
    c   channels (3)
    H   image side in pixels, p = patch side, g = H // p patches per side, n = g·g patches
    d   encoder width, n_h heads, h_d = d // n_h
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.core.integrity import RecordError, read_json

VIT_KIND = "pocketlm_vit"


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 48
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class ViTAttention(nn.Module):
    """Multi-head self-attention over patches (no mask: every patch sees every patch)."""

    def __init__(self, d: int, n_h: int) -> None:
        super().__init__()
        self.n_h = n_h
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, explicit: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_h, d // self.n_h).permute(2, 0, 3, 1, 4)  # 3 × [b, n_h, n, h_d]
        probs = None
        if explicit:  # softmax(q kᵀ / √h_d) v, written out; returns the probabilities
            probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).float().softmax(-1).to(q.dtype)  # [b, n_h, n, n]
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # [b, n_h, n, h_d]
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), probs


class ViTBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = ViTAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, x: torch.Tensor, explicit: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, probs = self.attn(self.norm1(x), explicit)
        x = x + a
        return x + self.mlp(self.norm2(x)), probs


class ViT(nn.Module):
    """Pixels [b, c, H, W] → patch features [b, n, d]."""

    kind = VIT_KIND

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid**2, cfg.hidden_size) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def grid(self) -> tuple[int, int]:
        return (self.config.grid, self.config.grid)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        """Patch features [b, n, d]; with ``output_attentions`` also the per-block probabilities [b, n_h, n, n]."""
        if pixel_values.shape[-2:] != (self.config.image_size,) * 2 or pixel_values.shape[1] != 3:
            raise ValueError(f"the ViT takes [b, 3, {self.config.image_size}, {self.config.image_size}] pixels, "
                             f"got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed  # [b, n, d]
        attentions = []
        for block in self.blocks:
            x, probs = block(x, explicit=output_attentions)
            attentions.append(probs)
        x = self.norm(x)
        return (x, tuple(attentions)) if output_attentions else x

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"kind": VIT_KIND, **asdict(self.config)}, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> ViT:
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / "config.json"
        cfg = read_json(path, "ViT config")
        if not isinstance(cfg, dict):
            raise RecordError(f"{path} is not a valid ViT config: a JSON {type(cfg).__name__}, not an object")
        cfg.pop("kind", None)
        try:
            conf = ViTConfig(**cfg)
        except TypeError as e:
            raise RecordError(f"{path} is not a valid ViT config: {e}") from None
        model = cls(conf)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model


class HFVisionEncoder(nn.Module):
    """Any Hugging Face vision model from a folder, as patch features from hidden layer ``feature_layer``
    (LLaVA reads CLIP's second-to-last, -2); a class token, where the model has one, is dropped."""

    kind = "hf"

    def __init__(self, model: nn.Module, feature_layer: int = -1) -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        cfg = model.config
        self._image_size = int(cfg.image_size)
        self._patch = int(cfg.patch_size)
        self._hidden = int(cfg.hidden_size)

    @classmethod
    def from_folder(cls, folder: str | Path, feature_layer: int = -1) -> HFVisionEncoder:
        from transformers import AutoConfig, AutoModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json; an HF vision encoder is a save_pretrained folder")
        config = AutoConfig.from_pretrained(folder)
        if getattr(config, "vision_config", None) is not None:  # a full CLIP/SigLIP model: load its vision tower
            from transformers.models.auto.modeling_auto import MODEL_MAPPING

            try:
                tower = MODEL_MAPPING[type(config.vision_config)]
            except KeyError:
                raise ValueError(f"{folder}: transformers has no model class for its vision_config "
                                 f"({type(config.vision_config).__name__})") from None
            model = tower.from_pretrained(folder)
        else:
            model = AutoModel.from_pretrained(folder)
        for name in ("image_size", "patch_size", "hidden_size"):
            if not isinstance(getattr(model.config, name, None), int):
                raise ValueError(f"{folder}: {type(model).__name__}'s config has no integer {name!r}; "
                                 f"not a ViT-style vision model")
        return cls(model, feature_layer)

    @property
    def hidden_size(self) -> int:
        return self._hidden

    @property
    def grid(self) -> tuple[int, int]:
        g = self._image_size // self._patch
        return (g, g)

    @property
    def image_size(self) -> int:
        return self._image_size

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]  # [b, n (+1), d]
        g = self.grid
        if feats.shape[1] == g[0] * g[1] + 1:
            feats = feats[:, 1:]  # drop the class token
        return (feats, None) if output_attentions else feats

    def save(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
