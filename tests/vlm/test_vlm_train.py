"""Two-stage training, evaluation, inspection and the CLI, end to end on tiny models and a few shape scenes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from pocketlm.config import ConfigError, load_config
from pocketlm.data.scenes import scenes_data
from pocketlm.models.vision import VisionLanguageModel
from pocketlm.vlm.config import VLMConfig
from pocketlm.vlm.evaluate import evaluate_vlm, exact_match, normalise_answer
from pocketlm.training import balanced_batches, cosine_with_warmup, warmup_steps
from pocketlm.vlm.train import LR_FLOOR, build_vlm, item_group, run_stage, run_train, set_trainable, stage0_texts

ROOT = Path(__file__).resolve().parents[2]
TINY = ["output_dir={out}", "encoder.image_size=16", "encoder.patch_size=4", "encoder.hidden_size=16",
        "encoder.num_layers=1", "encoder.num_heads=2", "lm.hidden_size=32", "lm.intermediate_size=64",
        "lm.num_hidden_layers=1", "lm.num_attention_heads=4", "lm.num_key_value_heads=2", "lm.pretrain_steps=4",
        "data.shapes.image_size=16", "data.shapes.n_train=24", "data.shapes.n_val=4", "data.shapes.n_test=6",
        "stage1.steps=3", "stage1.batch_size=8", "stage2.steps=3", "stage2.batch_size=8", "log_every=1",
        "eval.max_new_tokens=4"]


def tiny_cfg(out: Path, *extra: str) -> VLMConfig:
    return load_config(VLMConfig, None, [s.format(out=out) for s in TINY] + list(extra))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_stage1_trains_only_the_projector_and_stage2_also_the_lm(tmp_path):
    cfg = tiny_cfg(tmp_path, "projector.kind=resampler", "projector.num_tokens=2", "projector.num_heads=2")
    train, val = scenes_data("train", 24, spec=_spec()), scenes_data("val", 4, spec=_spec())
    vlm = build_vlm(cfg, train.texts())
    pixels = {"train": vlm.processor.to_uint8(train.images), "val": vlm.processor.to_uint8(val.images)}
    enc, proj, lm = _snapshot(vlm.encoder), _snapshot(vlm.projector), _snapshot(vlm.lm)
    r1 = run_stage(vlm, "stage1", cfg.stage1, train, val, pixels, cfg, log=lambda row: None, progress=False)
    assert _changed(enc, vlm.encoder) == [] and _changed(lm, vlm.lm) == []
    assert set(_changed(proj, vlm.projector)) == set(proj)  # every projector tensor moved
    assert r1["tasks"] == ["caption"] and r1["trained"] == ["projector"] and np.isfinite(r1["val_loss"])
    proj = _snapshot(vlm.projector)
    run_stage(vlm, "stage2", cfg.stage2, train, val, pixels, cfg, log=lambda row: None, progress=False)
    assert _changed(enc, vlm.encoder) == []
    assert _changed(proj, vlm.projector) and len(_changed(lm, vlm.lm)) == len(lm)


def _spec():
    from pocketlm.data.scenes import SceneSpec

    return SceneSpec(image_size=16)


def test_stage2_can_train_the_encoder_too(tmp_path):
    cfg = tiny_cfg(tmp_path, "stage2.train=[projector,lm,encoder]", "stage1.steps=0")
    train = scenes_data("train", 24, spec=_spec())
    vlm = build_vlm(cfg, train.texts())
    enc = _snapshot(vlm.encoder)
    run_stage(vlm, "stage2", cfg.stage2, train, None, {"train": vlm.processor.to_uint8(train.images)}, cfg,
              log=lambda row: None, progress=False)
    assert len(_changed(enc, vlm.encoder)) == len(enc)


def test_balanced_batches_give_every_group_the_same_share_and_cycle_each_group():
    groups = ["caption"] * 100 + ["colour"] * 10 + ["count"] * 1000  # as unequal as the scenes' questions
    batches = list(balanced_batches(groups, 32, 500, seed=3))
    assert all(len(b) == 32 for b in batches)
    drawn = torch.cat(batches).tolist()
    for name, size in (("caption", 100), ("colour", 10), ("count", 1000)):
        seq = [i for i in drawn if groups[i] == name]
        assert abs(len(seq) / len(drawn) - 1 / 3) < 0.02  # expected 1/3 each; binomial sd 0.004
        for start in range(0, len(seq) - size + 1, size):  # each pass over a group is a permutation of it
            assert sorted(seq[start:start + size]) == [i for i, g in enumerate(groups) if g == name]
    again = list(balanced_batches(groups, 32, 500, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # seeded
    assert not all(torch.equal(a, b) for a, b in zip(batches, balanced_batches(groups, 32, 500, seed=4)))


def test_item_groups_are_question_types_and_tasks():
    data = scenes_data("train", 6, spec=_spec())
    got = {item_group(it) for it in data.items}
    assert {"caption", "count"} <= got <= {"caption", "colour", "count", "position"}
    assert all(item_group(it) == it.qtype for it in data.items if it.task == "vqa")
    from pocketlm.data.scenes import VLItem

    assert item_group(VLItem(0, "<image> q", "a", "vqa")) == "vqa"  # a user's question without a type
    assert item_group(VLItem(0, "<image> describe", "a cat", "caption", "colour")) == "caption"


def test_balanced_stage_reports_its_groups(tmp_path):
    cfg = tiny_cfg(tmp_path, "stage2.sampling=balanced", "projector.pos_embed=2d")
    train = scenes_data("train", 24, spec=_spec())
    vlm = build_vlm(cfg, train.texts())
    pixels = {"train": vlm.processor.to_uint8(train.images)}
    r = run_stage(vlm, "stage2", cfg.stage2, train, None, pixels, cfg, log=lambda row: None, progress=False)
    assert r["sampling"] == "balanced"
    assert r["items_per_group"] == {g: sum(item_group(it) == g for it in train.items)
                                    for g in sorted({item_group(it) for it in train.items})}
    assert np.isfinite(r["final_loss"])


def test_stage0_text_is_each_item_without_its_image_and_optionally_after_the_caption():
    data = scenes_data("train", 5, spec=_spec())
    plain = stage0_texts(data)
    assert plain == [" ".join(it.prompt.replace("<image>", " ").split()) + " " + it.target for it in data.items]
    assert not any("<image>" in t for t in plain)
    described = stage0_texts(data, with_captions=True)
    vqa = [it for it in data.items if it.task == "vqa"]
    assert described[:len(plain)] == plain and len(described) == len(plain) + len(vqa)
    caption = {it.image: it.target for it in data.items if it.task == "caption"}
    assert all(t.startswith("describe the image . " + caption[it.image] + " question :")
               for t, it in zip(described[len(plain):], vqa))


def test_set_trainable_freezes_and_returns_the_rest():
    from test_vlm_model import tiny_vlm

    vlm = tiny_vlm()
    params = set_trainable(vlm, ["projector"])
    assert {id(p) for p in params} == {id(p) for p in vlm.projector.parameters()}
    assert not any(p.requires_grad for p in vlm.lm.parameters()) and not vlm.lm.training


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    f = cosine_with_warmup(warmup_steps(0.1, 100), 100, LR_FLOOR)  # what `optimise` schedules
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(99) == pytest.approx(0.1, abs=1e-3)
    assert all(f(i) >= f(i + 1) for i in range(10, 99))


def test_run_train_writes_every_folder_and_eval_scores_against_the_blind_lm(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "encoder.pretrain_steps=2")
    res = run_train(cfg)
    out = Path(cfg.output_dir)
    for name in ("text_lm", "stage1", "model", "results.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    assert res.kind == "vlm_train" and {m.group for m in res.metrics} == {"encoder", "stage0", "stage1", "stage2"}
    assert set(res.details["stages"]["encoder"]["patch_accuracy"]) == {"colour", "kind", "size"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["encoder"] * 2 + ["stage0"] * 4 + ["stage1"] * 3 + ["stage2"] * 3
    vlm = VisionLanguageModel.load(out / "model")
    from pocketlm.models.load import load_model

    test = scenes_data("test", 6, spec=_spec())
    ev = evaluate_vlm(vlm, test, settings=cfg.eval, blind_lm=load_model(out / "text_lm"))
    names = {(m.name, m.group) for m in ev.metrics}
    for q in ("colour", "count", "position", None):
        assert {("vqa_accuracy", q), ("baseline_vqa_accuracy", q), ("delta_vqa_accuracy", q)} <= names
    assert {("rougeL", "caption"), ("baseline_rougeL", "caption")} <= names
    acc = ev.get("vqa_accuracy")
    items = [i for i in ev.details["items"] if i["task"] == "vqa"]
    assert acc.value == pytest.approx(np.mean([exact_match(i["prediction"], i["reference"]) for i in items]))
    assert ev.get("delta_vqa_accuracy").value == pytest.approx(
        acc.value - ev.get("baseline_vqa_accuracy").value)


def test_caption_rouge_is_rouge_score_on_the_same_texts(tmp_path):
    from rouge_score import rouge_scorer

    from test_vlm_model import tiny_vlm

    data = scenes_data("test", 5, spec=_spec())
    ev = evaluate_vlm(tiny_vlm(), data, settings=VLMConfig().eval.model_copy(update={"max_new_tokens": 6}))
    caps = [i for i in ev.details["items"] if i["task"] == "caption"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expect = np.mean([scorer.score(c["reference"], c["prediction"])["rougeL"].fmeasure for c in caps])
    assert ev.get("rougeL", "caption").value == pytest.approx(expect)


def test_answer_normalisation():
    assert normalise_answer("  The Red!") == "red" and exact_match("two .", "two") and not exact_match("to", "two")
    assert exact_match("grey", ["gray", "grey"])


def test_attention_over_patches_png(tmp_path):
    from test_vlm_model import tiny_vlm

    from pocketlm.vlm.inspect import attention_over_patches, draw_patch_attention

    for kind in ("mlp", "resampler"):
        vlm = tiny_vlm(kind, num_tokens=3, num_heads=2)
        img = scenes_data("test", 1, spec=_spec()).images[0]
        pa = attention_over_patches(vlm, img, "<image> describe the image .", max_new_tokens=3)
        assert pa.maps.shape == (len(pa.tokens), 4, 4)
        assert len(pa.tokens) > 0
        np.testing.assert_allclose(pa.maps.sum((1, 2)), pa.image_share, rtol=1e-5)
        assert ((pa.image_share > 0) & (pa.image_share <= 1 + 1e-6)).all()
        path = draw_patch_attention(img, pa, tmp_path / f"{kind}.png")
        assert Image.open(path).size[0] > 100


def test_attention_matches_a_hand_computed_row():
    """The image-patch weights are the head- and layer-mean attention of the predicting query, at image slots."""
    from test_vlm_model import tiny_vlm

    from pocketlm.vlm.inspect import attention_over_patches

    vlm = tiny_vlm("linear")
    img = scenes_data("test", 1, spec=_spec()).images[0]
    prompt = "<image> describe the image ."
    pa = attention_over_patches(vlm, img, prompt, max_new_tokens=2)
    ids, _ = vlm.encode(prompt)
    answer = vlm.generate([prompt], [img], max_new_tokens=2)[0]
    full = torch.tensor([ids + answer])
    with torch.no_grad():
        embeds = vlm.embed(full, vlm.projector(vlm.image_features(vlm.pixels([img]))))
        att = vlm.lm(inputs_embeds=embeds, output_attentions=True).attentions
    mean = torch.stack([a[0] for a in att]).mean((0, 1))  # [s, s]
    row = mean[len(ids) - 1, (full[0] == vlm.image_token_id)]
    np.testing.assert_allclose(pa.maps[0].reshape(-1), row.numpy(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- config & CLI
def test_shipped_vlm_config_validates():
    cfg = load_config(VLMConfig, ROOT / "configs" / "vlm_shapes.yaml")
    assert cfg.stage1.train == ["projector"] and set(cfg.stage2.train) == {"projector", "lm"}
    assert yaml.safe_load((ROOT / "configs" / "vlm_shapes.yaml").read_text())["projector"]["kind"] == cfg.projector.kind


@pytest.mark.parametrize("override, field", [
    ("projector.kind=qformer", "projector.kind"), ("stage1.trian=[lm]", "stage1.trian"),
    ("stage2.train=[projector,vision]", "stage2.train"), ("encoder.kind=hf", "encoder.path"),
    ("encoder.patch_size=5", "encoder.patch_size"), ("data.kind=folder", "data.train"),
    ("encoder.image_size=64", "encoder.image_size"), ("lm.num_key_value_heads=3", "lm.num_key_value_heads"),
])
def test_bad_config_fields_are_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(VLMConfig, None, [override])


def test_encoder_pretraining_needs_generated_scenes():
    with pytest.raises(ConfigError, match="encoder.pretrain_steps needs"):
        load_config(VLMConfig, None, ["encoder.pretrain_steps=5", "data.kind=folder",
                                      "data.train={images: x, captions: y.jsonl}"])


def test_cli_train_eval_caption(tmp_path):
    from pocketlm.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({}))
    args = ["vlm", "train", str(cfg_path), "--quiet"]
    for s in TINY:
        args += ["--set", s.format(out=run)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "train_loss" in r.output
    r = runner.invoke(app, ["vlm", "eval", "--model", str(run / "model"), "--n", "4", "--image-size", "16",
                            "--blind-lm", str(run / "text_lm"), "--out", str(tmp_path / "ev.json"), "--quiet",
                            "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev.json").read_text())["kind"] == "vlm_eval"
    img = tmp_path / "rgba.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(img)
    r = runner.invoke(app, ["vlm", "caption", str(img), "--model", str(run / "model"), "--attention",
                            str(tmp_path / "att.png"), "--out", str(tmp_path / "cap.json"), "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "att.png").is_file() and json.loads((tmp_path / "cap.json").read_text())["kind"] == "vlm_caption"
    # bad input: one line, no traceback
    (tmp_path / "bad.png").write_bytes(b"nope")
    r = runner.invoke(app, ["vlm", "caption", str(tmp_path / "bad.png"), "--model", str(run / "model")])
    assert r.exit_code == 2 and "cannot read" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["vlm", "caption", str(img), "--model", str(run / "model"), "--prompt", "describe it"])
    assert r.exit_code == 2 and "needs exactly one <image> marker" in r.output
