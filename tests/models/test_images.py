"""Images in (models/images.py): unreadable files refused, channels converted or refused with the reason, resizing
and normalisation."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pocketlm.models.images import ImageError, ImageProcessor, load_image, to_rgb


def test_unreadable_and_missing_image_files(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ImageError, match="cannot read .*x.png"):
        load_image(bad)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "none.png")


def test_channels_are_converted_or_refused_with_the_reason(tmp_path, caplog):
    gray = np.full((8, 8), 100, dtype=np.uint8)
    with caplog.at_level("WARNING", logger="pocketlm.vlm"):
        out = to_rgb(gray)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (100, 100, 100)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    rgba[0, 0, 3] = 0  # a transparent pixel goes over white
    with caplog.at_level("WARNING", logger="pocketlm.vlm"):
        out = to_rgb(rgba)
    assert out.getpixel((1, 1)) == (255, 0, 0) and out.getpixel((0, 0)) == (255, 255, 255)
    assert "converted L to RGB" in caplog.text and "converted RGBA to RGB" in caplog.text
    with pytest.raises(ImageError, match="has 2 channels; images need 1 .*3 .*4"):
        to_rgb(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ImageError, match="channels-first"):
        to_rgb(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageError, match="values range"):
        to_rgb(np.full((8, 8, 3), 300.0))
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").mode == "RGB"


def test_processor_resizes_and_normalises():
    proc = ImageProcessor(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = Image.new("RGB", (40, 30), (255, 0, 128))
    px = proc([img])
    assert px.shape == (1, 3, 16, 16)
    torch.testing.assert_close(px[0, :, 5, 5], torch.tensor([(1 - .5) / .25, (0 - .5) / .25, (128 / 255 - .5) / .25]))
    assert json.loads(json.dumps(proc.to_dict())) == proc.to_dict()
