"""The VLM: projector shapes, image tokens where <image> stands, loss only on answers, save/load, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from pocketlm.models.projectors import PROJECTORS, ProjectorParams, build_projector
from pocketlm.models.student import IGNORE_INDEX, PocketLMConfig, PocketLMForCausalLM
from pocketlm.models.vision import IMAGE_TOKEN, PromptError, VisionLanguageModel, add_image_token
from pocketlm.models.vit import ViT, ViTConfig
from pocketlm.vlm.tokenizer import word_tokenizer

TEXTS = ["<image> describe the image .", "a small red circle left of a large blue square",
         "<image> question : what colour is the circle ? answer :", "red blue green one two three left right"]


def tiny_lm(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    return PocketLMForCausalLM(PocketLMConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def tiny_vlm(kind: str = "mlp", seed: int = 0, **params) -> VisionLanguageModel:
    tok = word_tokenizer(TEXTS)
    torch.manual_seed(seed)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, hidden_size=24, num_layers=1, num_heads=2))
    return VisionLanguageModel.build(vit, tiny_lm(len(tok), seed), tok, kind, ProjectorParams(**params)).eval()


def images(n: int = 2):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- projectors
@pytest.mark.parametrize("kind, params, tokens", [("linear", {}, 9), ("mlp", {"hidden_mult": 2}, 9),
                                                  ("resampler", {"num_tokens": 4, "depth": 2, "num_heads": 2}, 4)])
def test_projector_shapes_and_patch_maps(kind, params, tokens):
    proj = build_projector(kind, 24, 32, ProjectorParams(**params))
    x = torch.randn(3, 9, 24)  # [b, n, e]
    assert proj(x).shape == (3, tokens, 32)
    assert proj.num_tokens(9) == tokens
    m = proj.patch_map(x)
    assert m.shape == (3, tokens, 9)
    torch.testing.assert_close(m.sum(-1), torch.ones(3, tokens))  # each image token is a distribution over patches


def test_linear_projector_is_one_matrix_per_patch():
    proj = build_projector("linear", 24, 32)
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(proj(x), x @ proj.proj.weight.T + proj.proj.bias)


@pytest.mark.parametrize("kind", ["linear", "mlp", "resampler"])
def test_position_embeddings_tell_patches_apart(kind):
    """Without position embeddings a per-patch projector maps equal patches to equal tokens and the resampler does
    not see patch order at all; with them, both do."""
    params = {"num_tokens": 4, "num_heads": 2} if kind == "resampler" else {}
    torch.manual_seed(0)
    plain = build_projector(kind, 24, 32, ProjectorParams(**params), grid=(3, 3))
    torch.manual_seed(0)
    placed = build_projector(kind, 24, 32, ProjectorParams(pos_embed="learned", **params), grid=(3, 3))
    assert plain.pos is None and set(placed.state_dict()) == set(plain.state_dict()) | {"pos.table"}
    x = torch.randn(2, 9, 24)
    perm = torch.randperm(9)
    if kind == "resampler":
        torch.testing.assert_close(plain(x[:, perm]), plain(x))  # blind to patch order
        assert not torch.allclose(placed(x[:, perm]), placed(x), atol=1e-4)
    else:
        same = x[:, :1].expand(-1, 9, -1)
        assert torch.allclose(plain(same), plain(same)[:, :1].expand(-1, 9, -1))
        out = placed(same)  # equal patches now differ by exactly the position table
        torch.testing.assert_close(out - plain(same), placed.pos.table.expand(2, -1, -1))
    assert placed(x).shape == plain(x).shape


def test_2d_position_embeddings_are_row_plus_column():
    pos = build_projector("linear", 4, 8, ProjectorParams(pos_embed="2d"), grid=(2, 3)).pos
    table = pos.embeddings()  # [6, 8], raster order
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(table[r * 3 + c], pos.row[r, 0] + pos.col[0, c])
    with pytest.raises(ValueError, match="for 6 patches, got 5"):
        pos(torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match="needs the encoder's patch grid"):
        build_projector("mlp", 4, 8, ProjectorParams(pos_embed="2d"))
    with pytest.raises(ValueError, match="projector.pos_embed must be one of none, learned, 2d"):
        ProjectorParams(pos_embed="sinusoidal")


def test_projector_registry_names_the_valid_kinds():
    assert set(PROJECTORS.names()) >= {"linear", "mlp", "resampler"}
    with pytest.raises(KeyError, match="valid names: linear, mlp, resampler"):
        build_projector("qformer", 4, 4)
    with pytest.raises(ValueError, match="projector.num_tokens"):
        ProjectorParams(num_tokens=0)


# ---------------------------------------------------------------------------------------------- tokens
def test_image_token_is_added_and_embeddings_resized_keeping_old_rows():
    from conftest import make_tokenizer

    tok = make_tokenizer()
    assert IMAGE_TOKEN not in tok.get_vocab()
    lm = tiny_lm(len(tok))
    old = lm.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([tok("The cat sat on the mat.")["input_ids"]])
    before = lm(ids).logits
    image_id = add_image_token(tok, lm)
    assert image_id == len(tok) - 1 and tok.convert_ids_to_tokens(image_id) == IMAGE_TOKEN
    assert lm.get_input_embeddings().weight.shape[0] == len(tok) == lm.config.vocab_size
    torch.testing.assert_close(lm.get_input_embeddings().weight[: old.shape[0]], old)
    torch.testing.assert_close(lm(ids).logits[..., : old.shape[0]], before)  # old tokens score as before
    assert tok(f"x {IMAGE_TOKEN}{IMAGE_TOKEN} y")["input_ids"].count(image_id) == 2  # one token per marker


@pytest.mark.parametrize("kind", ["mlp", "resampler"])
def test_image_embeddings_stand_exactly_at_the_markers(kind):
    vlm = tiny_vlm(kind, num_tokens=3, num_heads=2)
    prompts = ["<image> describe the image .", "question : what colour is <image> the circle ? answer :"]
    batch = vlm.collate(prompts, left_pad=True)
    px = vlm.pixels(images())
    projected = vlm.projector(vlm.image_features(px))  # [b, q, d]
    embeds = vlm.embed(batch["input_ids"], projected)
    text = vlm.lm.get_input_embeddings()(batch["input_ids"])
    for i in range(2):
        pos = (batch["input_ids"][i] == vlm.image_token_id).nonzero().squeeze(-1)
        assert len(pos) == vlm.num_image_tokens and (pos.diff() == 1).all()  # one run, where <image> stood
        torch.testing.assert_close(embeds[i, pos], projected[i], rtol=0, atol=0)
        other = torch.ones(embeds.shape[1], dtype=torch.bool)
        other[pos] = False
        torch.testing.assert_close(embeds[i, other], text[i, other], rtol=0, atol=0)
    first = (batch["input_ids"][1] == vlm.image_token_id).nonzero()[0].item()
    words = vlm.tokenizer.convert_ids_to_tokens(batch["input_ids"][1, :first].tolist())
    assert [w for w in words if w != "<pad>"] == ["question", ":", "what", "colour", "is"]


def test_labels_count_only_answer_tokens_and_eos():
    vlm = tiny_vlm()
    batch = vlm.collate(["<image> describe the image .", "<image> question : what colour is the circle ? answer :"],
                        ["a small red circle", "red"])
    tok = vlm.tokenizer
    for row, answer in zip(range(2), ["a small red circle", "red"]):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == tok(answer)["input_ids"] + [tok.eos_token_id]
        start = (labels != IGNORE_INDEX).nonzero()[0].item()
        assert (ids[start:start + len(kept)] == torch.tensor(kept)).all()  # labels sit on the answer itself
        assert (labels[ids == vlm.image_token_id] == IGNORE_INDEX).all()
        assert (labels[batch["attention_mask"][row] == 0] == IGNORE_INDEX).all()


def test_loss_is_cross_entropy_over_answer_tokens_only():
    vlm = tiny_vlm()
    batch = vlm.collate(["<image> describe the image ."] * 2, ["a small red circle", "blue"])
    out = vlm(**batch, pixel_values=vlm.pixels(images()))
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = -torch.log_softmax(logits.float(), -1)[keep].gather(-1, labels[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)
    # changing prompt tokens' labels cannot change it: only answers count
    assert keep.sum() == (len(vlm.tokenizer("a small red circle")["input_ids"]) + 1) + 2


def test_batched_generation_equals_one_at_a_time():
    vlm = tiny_vlm("resampler", num_tokens=2, num_heads=2)
    prompts = ["<image> describe the image .", "<image> question : what colour is the circle ? answer :"]
    imgs = images()
    together = vlm.generate(prompts, imgs, max_new_tokens=5)
    alone = [vlm.generate([p], [im], max_new_tokens=5)[0] for p, im in zip(prompts, imgs)]
    assert together == alone


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind, pos", [("linear", "none"), ("resampler", "none"), ("mlp", "2d"),
                                       ("resampler", "learned")])
def test_save_load_round_trip_gives_equal_logits(tmp_path, kind, pos):
    vlm = tiny_vlm(kind, num_tokens=3, num_heads=2, pos_embed=pos)
    batch = vlm.collate(["<image> describe the image ."] * 2, ["a red circle", "blue"])
    px = vlm.pixels(images())
    with torch.no_grad():
        before = vlm(**batch, pixel_values=px).logits
    path = vlm.save(tmp_path / "vlm")
    assert sorted(p.name for p in path.iterdir()) == ["encoder", "lm", "projector.safetensors", "vlm_config.json"]
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt")) and not list(path.rglob("*.pkl"))
    loaded = VisionLanguageModel.load(path)
    assert loaded.projector_params.pos_embed == pos
    assert loaded.num_image_tokens == vlm.num_image_tokens and loaded.image_token_id == vlm.image_token_id
    with torch.no_grad():
        after = loaded(**loaded.collate(["<image> describe the image ."] * 2, ["a red circle", "blue"]),
                       pixel_values=loaded.pixels(images())).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    vlm.save(path)  # overwriting an existing folder is atomic and leaves nothing behind
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_load_refuses_a_folder_that_is_not_a_vlm(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vlm_config.json"):
        VisionLanguageModel.load(tmp_path)
    path = tiny_vlm().save(tmp_path / "v")
    (path / "projector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing projector.safetensors"):
        VisionLanguageModel.load(path)


def test_hf_clip_vision_tower_from_a_folder(tmp_path):
    """Any HF vision model from a folder: a tiny CLIP vision tower (class token dropped), a full CLIP model too."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    from pocketlm.models.vit import HFVisionEncoder

    vcfg = dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2)
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**vcfg)).save_pretrained(tmp_path / "tower")
    enc = HFVisionEncoder.from_folder(tmp_path / "tower", feature_layer=-2)
    px = torch.randn(2, 3, 16, 16)
    feats = enc(px)
    assert feats.shape == (2, 16, 16)
    ref = enc.model(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(feats, ref)
    CLIPModel(CLIPConfig(vision_config=vcfg, text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                              num_hidden_layers=1, num_attention_heads=2))
              ).save_pretrained(tmp_path / "clip")
    assert HFVisionEncoder.from_folder(tmp_path / "clip")(px).shape == (2, 16, 16)

    tok = word_tokenizer(TEXTS)
    vlm = VisionLanguageModel.build(enc, tiny_lm(len(tok)), tok, "mlp")
    batch = vlm.collate(["<image> describe the image ."] * 2, ["red", "blue"])
    with torch.no_grad():
        before = vlm(**batch, pixel_values=px).logits
    loaded = VisionLanguageModel.load(vlm.save(tmp_path / "vlm"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, pixel_values=px).logits, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feature_layer", [0, 1, -2])
def test_reload_keeps_the_hf_encoders_feature_layer(tmp_path, feature_layer):
    """Save → load reads the same hidden layer of an HF vision tower, layer 0 (the embeddings) included, and the
    reloaded VLM gives the original's logits on the same images (a wrong layer changes them: #17 item 5)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pocketlm.models.vit import HFVisionEncoder

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2)).save_pretrained(tmp_path / "tower")
    enc = HFVisionEncoder.from_folder(tmp_path / "tower", feature_layer=feature_layer)
    tok = word_tokenizer(TEXTS)
    vlm = VisionLanguageModel.build(enc, tiny_lm(len(tok)), tok, "mlp").eval()
    batch = vlm.collate(["<image> describe the image ."] * 2, ["a red circle", "blue"])
    loaded = VisionLanguageModel.load(vlm.save(tmp_path / "vlm"))
    assert loaded.encoder.feature_layer == feature_layer
    with torch.no_grad():
        before = vlm(**batch, pixel_values=vlm.pixels(images())).logits
        after = loaded(**batch, pixel_values=loaded.pixels(images())).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def test_prompt_without_marker_with_an_image_is_refused():
    vlm = tiny_vlm()
    with pytest.raises(PromptError, match="has no <image> marker"):
        vlm.generate(["describe the image ."], images(1))
    with pytest.raises(PromptError, match="has 2 <image> markers"):
        vlm.collate(["<image> <image> describe"])
    with pytest.raises(PromptError, match="no image was given"):
        vlm.collate(["<image> describe"], has_image=False)


def test_example_averaged_loss_weighs_each_answer_equally():
    from pocketlm.models.vision import answer_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 2:6] = torch.tensor([1, 2, 3, 4])  # a long answer
    labels[1, 4] = 5  # a one-token answer
    # row 2: no answer at all → left out
    logp = torch.log_softmax(logits, -1)
    row0 = -torch.stack([logp[0, t - 1, labels[0, t]] for t in range(2, 6)]).mean()
    row1 = -logp[1, 3, 5]
    torch.testing.assert_close(answer_loss(logits, labels, "example"), (row0 + row1) / 2)
    token = -(torch.stack([logp[0, t - 1, labels[0, t]] for t in range(2, 6)]).sum() + logp[1, 3, 5]) / 5
    torch.testing.assert_close(answer_loss(logits, labels, "token"), token)
    assert answer_loss(logits, torch.full((3, 6), IGNORE_INDEX), "example").item() == 0.0
    with pytest.raises(ValueError, match="valid: token, example"):
        answer_loss(logits, labels, "sequence")
