"""Configs: every shipped YAML validates; bad fields are named; overrides are validated like the file."""
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketlm.config import ConfigError, DistillConfig, apply_overrides, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    if path.name.startswith("accelerate_"):  # launcher configs: validated by accelerate's own loader
        from accelerate.commands.config.config_args import ClusterConfig

        cfg = ClusterConfig.from_yaml_file(str(path))
        assert cfg.num_processes >= 1 and cfg.distributed_type is not None
        return
    if path.name.startswith("vlm_"):  # vision-language training configs (pocketlm vlm train) are VLMConfig
        from pocketlm.vlm.config import VLMConfig

        load_config(VLMConfig, path)
        return
    if path.name.startswith("pipeline"):  # pipeline configs (pocketlm run) are PipelineConfig
        from pocketlm.config_pipeline import PipelineConfig

        load_config(PipelineConfig, path)
        return
    load_config(DistillConfig, path)


def test_demo_yaml_mirrors_the_demo_config():
    from pocketlm.demo import DEMO_CONFIG

    from_yaml = load_config(DistillConfig, ROOT / "configs" / "demo.yaml")
    assert from_yaml == DistillConfig.model_validate(DEMO_CONFIG)


@pytest.mark.parametrize(
    "tree, field",
    [
        ({"trian": {}}, "trian"),
        ({"train": {"stepz": 3}}, "train.stepz"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"distill": {"loss": "kl_forward"}}, "distill.loss"),
        ({"distill": {"temperature": -1}}, "distill.temperature"),
        ({"distill": {"ce_weight": 1.5}}, "distill.ce_weight"),
        ({"distill": {"mode": "offline"}}, "distill.mode"),
        ({"data": {"block_size": 2}}, "data.block_size"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
        ({"student": {"init": "teacher_layers", "hidden_size": 64}}, "hidden_size"),
        ({"student": {"layers": [0, 0]}}, "layers"),
    ],
)
def test_bad_field_is_named(tmp_path, tree, field):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, p)
    assert field in str(e.value)


def test_unknown_loss_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match="forward_kl"):
        load_config(DistillConfig, None, ["distill.loss=nope"])


def test_overrides_apply_and_validate():
    cfg = load_config(DistillConfig, None, ["train.steps=7", "distill.loss=jsd", "distill.beta=0.25"])
    assert (cfg.train.steps, cfg.distill.loss, cfg.distill.beta) == (7, "jsd", 0.25)
    assert cfg.distill.loss_params() == {"beta": 0.25}
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(DistillConfig, None, ["train.steps=-3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DistillConfig, None, ["train.steps"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(DistillConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DistillConfig, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DistillConfig, scalar)


def test_overrides_do_not_mutate_the_input():
    tree = {"train": {"steps": 3}}
    out = apply_overrides(tree, ["train.lr=0.1"])
    assert tree == {"train": {"steps": 3}} and out["train"] == {"steps": 3, "lr": 0.1}


keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(path=st.lists(keys, min_size=1, max_size=4), value=st.one_of(st.integers(), st.booleans(), keys))
def test_parse_override_roundtrip(path, value):
    parts, parsed = parse_override(".".join(path) + "=" + yaml.safe_dump(value).strip().removesuffix("..."))
    assert parts == path and parsed == value


@settings(max_examples=60, deadline=None)
@given(tree=st.dictionaries(keys, st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=4))
def test_random_top_level_trees_either_validate_or_raise_config_error(tree):
    try:
        load_config(DistillConfig, None, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in tree.items()
                                          if v is not None])
    except ConfigError as e:
        assert "invalid config" in str(e) or "--set" in str(e)


def test_student_attention_fields_are_validated_and_reach_the_student(teacher_dir):
    from pocketlm.distill.run import build_student
    from pocketlm.models.load import load_model

    with pytest.raises(ValueError, match="position_scheme: unknown .xpos.; valid: alibi, none, rotary"):
        DistillConfig.model_validate({"teacher": "x", "student": {"init": "random", "position_scheme": "xpos"}})
    with pytest.raises(ValueError, match="position_scheme: teacher layers were trained with rotary"):
        DistillConfig.model_validate({"teacher": "x", "student": {"position_scheme": "alibi"}})
    teacher, _ = load_model(teacher_dir)
    cfg = DistillConfig.model_validate({"teacher": str(teacher_dir), "student": {
        "init": "random", "num_layers": 2, "position_scheme": "alibi", "sliding_window": 4}})
    student = build_student(cfg, teacher)
    assert (student.config.position_scheme, student.config.sliding_window) == ("alibi", 4)
