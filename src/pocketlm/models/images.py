"""Images in: read a file or take an array, make it RGB (saying so when converted), resize and normalise.

Accepted: anything PIL opens; arrays H×W (grayscale), H×W×1, H×W×3 (RGB) and H×W×4 (RGBA), uint8 0-255 or float
0-1. Grayscale, palette and alpha images are converted to RGB (alpha composited over white) and the conversion is
logged. Refused, with the reason: unreadable files, 2-channel or >4-channel arrays (no convention says what their
channels mean), channels-first arrays (ambiguous with a narrow image; transpose them to H×W×C first).

Shape legend: b images, c = 3 channels, H = W = image_size pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("pocketlm.vlm")


MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's bomb limit (it only warns below twice it)


class ImageError(ValueError):
    """An image that cannot be used; the message says which and why."""


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file; unreadable files are an ``ImageError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:  # before its pixels are decoded
                raise Image.DecompressionBombError(f"{img.width}×{img.height} pixels")
            img.load()
            return to_rgb(img, where=str(path))
    except Image.DecompressionBombError as e:  # PIL's own check, at open, for twice its limit
        raise ImageError(f"{path} is too large to read ({e}; at most {MAX_PIXELS:,} pixels): a decompression bomb, "
                         "or an image to shrink first") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None


def to_rgb(image: Any, *, where: str = "image") -> Image.Image:
    """``image`` (PIL image or array) as an RGB PIL image; converting modes is logged, impossible ones refused."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, where)
    if not isinstance(image, Image.Image):
        raise ImageError(f"{where}: expected a PIL image or an array, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        log.warning("%s: converted %s to RGB (transparent pixels composited over white)", where, image.mode)
        return out
    if image.mode in ("L", "1", "P", "I", "I;16", "F", "CMYK", "YCbCr", "LAB", "HSV"):
        log.warning("%s: converted %s to RGB", where, image.mode)
        if image.mode in ("I", "I;16", "F"):  # wide grayscale: scale to 0-255 first
            arr = np.asarray(image, dtype=np.float64)
            top = arr.max() if arr.max() > 255 else 255.0
            image = Image.fromarray(np.clip(arr / top * 255, 0, 255).astype(np.uint8), "L")
        return image.convert("RGB")
    raise ImageError(f"{where}: cannot convert an image of mode {image.mode!r} to RGB")


def _array_to_pil(arr: np.ndarray, where: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{where}: array of shape {arr.shape} looks channels-first (C×H×W); "
                         f"pass H×W×C (e.g. arr.transpose(1, 2, 0))")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ImageError(f"{where}: array of shape {arr.shape} is not an image (expected H×W or H×W×C)")
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise ImageError(
            f"{where}: array of shape {arr.shape} has {arr.shape[-1]} channels; images need 1 (grayscale), "
            f"3 (RGB) or 4 (RGBA) — {arr.shape[-1]} channels have no agreed meaning, so they are not guessed at")
    if arr.dtype == np.uint8:
        data = arr
    elif np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer):
        if not np.isfinite(arr).all():
            raise ImageError(f"{where}: array holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if np.issubdtype(arr.dtype, np.floating) and lo >= 0 and hi <= 1:
            data = np.round(arr * 255).astype(np.uint8)
        elif lo >= 0 and hi <= 255:
            data = np.round(arr).astype(np.uint8)
        else:
            raise ImageError(f"{where}: values range over [{lo}, {hi}]; expected 0-1 (float) or 0-255")
    else:
        raise ImageError(f"{where}: array of dtype {arr.dtype} is not an image")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[data.ndim if data.ndim == 2 else data.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(data), mode)


@dataclass(frozen=True)
class ImageProcessor:
    """Resize to ``image_size`` (bicubic), scale to 0-1, normalise by ``mean``/``std`` per channel."""

    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessor:
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]))

    def to_uint8(self, images: Sequence[Any]) -> torch.Tensor:
        """Resized RGB pixels, [b, c, H, W] uint8 (a compact form to keep a data set in memory)."""
        out = torch.empty(len(images), 3, self.image_size, self.image_size, dtype=torch.uint8)
        for i, img in enumerate(images):
            rgb = to_rgb(img, where=f"image {i}")
            if rgb.size != (self.image_size, self.image_size):
                rgb = rgb.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            out[i] = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
        return out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [b, c, H, W] → normalised float32 [b, c, H, W]."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (pixels.to(torch.float32) / 255.0 - mean) / std

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        return self.normalize(self.to_uint8(images))
