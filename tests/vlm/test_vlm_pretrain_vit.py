"""Encoder pretraining on the scenes' patch labels: labels checked against the mask by brute force; it learns."""
import numpy as np
import pytest
import torch

from pocketlm.data.scenes import COLOURS, KINDS, SIZES, Scene, SceneSpec, Shape, generate_scenes
from pocketlm.models.vit import ViT, ViTConfig
from pocketlm.models.images import ImageProcessor
from pocketlm.vlm.pretrain_vit import patch_labels, pretrain_encoder


def test_patch_labels_follow_the_mask():
    scene = Scene((Shape("circle", "red", "large", 12, 12, 8), Shape("square", "blue", "small", 28, 27, 3)), 32,
                  (240, 240, 240))
    labels = patch_labels(scene, 8, min_cover=0.15)  # [16, 3], raster order over a 4×4 grid
    mask = np.asarray(scene.mask())
    for i in range(16):
        r, c = divmod(i, 4)
        block = mask[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
        cover = [(block == k + 1).mean() for k in range(2)]
        if max(cover) < 0.15:
            assert (labels[i] == 0).all()
        else:
            s = scene.shapes[int(np.argmax(cover))]
            assert tuple(labels[i]) == (list(COLOURS).index(s.colour) + 1, list(KINDS).index(s.kind) + 1,
                                        list(SIZES).index(s.size) + 1)
    assert tuple(labels[5]) == (1, 1, 2)  # the patch at the circle's centre: red, circle, large
    # Independent of the mask: by geometry (pixel centres inside the disc) the circle covers ~9 % of the top-left
    # patch, under min_cover, so it is background; the small blue square fills most of the bottom-right one.
    ys, xs = np.mgrid[0:8, 0:8] + 0.5
    assert (((ys - 12) ** 2 + (xs - 12) ** 2) <= 8**2).mean() < 0.15
    assert (labels[0] == 0).all()
    assert tuple(labels[15]) == (list(COLOURS).index("blue") + 1, list(KINDS).index("square") + 1,
                                 list(SIZES).index("small") + 1)


def test_mask_covers_exactly_the_rendered_shapes():
    for scene in generate_scenes("train", 20, spec=SceneSpec(image_size=32)):
        img, mask = np.asarray(scene.render()), np.asarray(scene.mask())
        background = (img == np.array(scene.background)).all(-1)
        np.testing.assert_array_equal(mask == 0, background)


def test_pretraining_learns_the_patch_labels():
    spec = SceneSpec(image_size=16, max_shapes=1)
    train, held = generate_scenes("train", 64, spec=spec), generate_scenes("val", 16, spec=spec)
    torch.manual_seed(0)
    enc = ViT(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=2))
    rows = []
    r = pretrain_encoder(enc, ImageProcessor(16), train, steps=100, lr=3e-3, batch_size=32, held_out=held,
                         log=rows.append, log_every=10)
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.5
    # chance among the covered patches is about 1/6 (six colours)
    assert r["patch_accuracy"]["colour"] > 0.5 and set(r["patch_accuracy"]) == {"colour", "kind", "size"}
    with pytest.raises(ValueError, match="image_size"):
        pretrain_encoder(enc, ImageProcessor(16), generate_scenes("train", 2), steps=1, lr=1e-3, batch_size=2)
