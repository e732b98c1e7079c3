"""`student.init: pruned` through `pocketlm distill`: the teacher pruned by calibration importance, trained, saved,
loadable; the importance record beside the student and read back by a later run; bad targets refused before work."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from pocketlm.config import ConfigError, DistillConfig
from pocketlm.distill import run as run_mod
from pocketlm.distill.run import run_distill


def pruned_cfg(teacher_dir, corpus_file, out, student: dict, **train) -> DistillConfig:
    return DistillConfig.model_validate({
        "teacher": str(teacher_dir),
        "data": {"source": str(corpus_file), "block_size": 16, "val_fraction": 0.15},
        "student": {"init": "pruned", **student,
                    "pruning": {"calibration_blocks": 8, "removal_blocks": 2, **student.get("pruning", {})}},
        "distill": {"mode": "cache", "top_k": 8},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "eval_every": 3, "save_every": 3,
                  **train},
        "output_dir": str(out),
    })


def test_pruned_student_distills_saves_and_loads(tmp_path, teacher_dir, corpus_file):
    from transformers import AutoModelForCausalLM

    cfg = pruned_cfg(teacher_dir, corpus_file, tmp_path / "run", {"target_params": "50%"})
    res = run_distill(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in res.train.history])))
    student = AutoModelForCausalLM.from_pretrained(res.student_dir)
    # the tiny teacher: hidden 32, MLP 64, 4 heads; 50% of its non-embedding parameters by the width rule (hidden
    # a multiple of 8, MLP of 32: at hidden 24 no MLP of 32 fits, so hidden 16 with the whole MLP)
    assert (student.config.hidden_size, student.config.intermediate_size) == (16, 64)
    assert student.config.num_hidden_layers == 4
    doc = json.loads((tmp_path / "run" / "importance.json").read_text())
    assert len(doc["importance"]["block_influence"]) == 4 and doc["importance"]["n_blocks"] == 8
    assert doc["plan"]["config"]["hidden_size"] == 16
    assert doc["plan"]["non_embedding_params"] <= 0.5 * doc["plan"]["source_non_embedding_params"]


def test_depth_pruning_keeps_the_layers_of_highest_influence(tmp_path, teacher_dir, corpus_file, monkeypatch):
    cfg = pruned_cfg(teacher_dir, corpus_file, tmp_path / "run", {"num_layers": 2}, steps=1)
    prep = run_mod.prepare(cfg, progress=False)
    student = run_mod.build_student(cfg, prep.teacher, prep=prep, out=tmp_path / "run")
    doc = json.loads((tmp_path / "run" / "importance.json").read_text())
    bi = doc["importance"]["block_influence"]
    assert doc["plan"]["layers"] == sorted(sorted(range(4), key=lambda i: -bi[i])[:2])
    assert student.config.num_hidden_layers == 2
    # a second build reads the scores back instead of measuring them again
    calls = []
    import pocketlm.models.pruning as pruning

    real = pruning.compute_importance
    monkeypatch.setattr(pruning, "compute_importance", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_mod.build_student(cfg, prep.teacher, prep=prep, out=tmp_path / "run")
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                                 again.state_dict().values()))
    other = cfg.model_copy(update={"student": cfg.student.model_copy(
        update={"pruning": cfg.student.pruning.model_copy(update={"calibration_blocks": 4})})})
    run_mod.build_student(other, prep.teacher, prep=prep, out=tmp_path / "run")
    assert calls == [1]  # other calibration settings: measured again


def test_pruned_moe_student_starts_equal_to_its_dense_twin(tmp_path, teacher_dir, corpus_file):
    cfg = pruned_cfg(teacher_dir, corpus_file, tmp_path / "run", {"num_layers": 3, "intermediate_size": 32})
    prep = run_mod.prepare(cfg, progress=False)
    dense = run_mod.build_student(cfg, prep.teacher, prep=prep, out=tmp_path / "run")
    tree = cfg.model_dump()
    tree["student"]["moe"] = {"router": "topk_softmax", "num_experts": 4, "top_k": 1}  # one expert a token
    moe_cfg = DistillConfig.model_validate(tree)
    moe = run_mod.build_student(moe_cfg, prep.teacher, prep=prep, out=tmp_path / "run")
    ids = prep.blocks.train[:2]
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids, use_cache=False).logits,
                                   dense(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("student, named", [
    ({"num_layers": 5}, "num_layers"),  # the tiny teacher has 4
    ({"hidden_size": 30}, "hidden_size"),  # not divisible by its 4 heads
    ({"hidden_size": 40}, "hidden_size"),  # more than its 32
    ({"intermediate_size": 65}, "intermediate_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"target_params": "1%"}, "target_params"),  # no width of the teacher is that small
    ({"target_params": "1%", "pruning": {"axis": "depth"}}, "target_params"),  # less than one layer
])
def test_bad_target_is_refused_before_any_work(tmp_path, teacher_dir, corpus_file, student, named):
    cfg = pruned_cfg(teacher_dir, corpus_file, tmp_path / "run", student)
    with pytest.raises(ConfigError, match=f"student.{named}"):
        run_distill(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("student, named", [
    ({"target_params": "50%", "num_layers": 2}, "not both"),
    ({}, "needs a target"),
    ({"target_params": 0}, "target_params"),
    ({"target_params": "120%"}, "target_params"),
    ({"num_attention_heads": 2, "num_layers": 2}, "num_attention_heads"),
    ({"layers": [0, 1]}, "layers"),
])
def test_bad_pruned_config_names_the_field(student, named):
    with pytest.raises(ValueError, match=named):
        DistillConfig.model_validate({"student": {"init": "pruned", **student}})
    with pytest.raises(ValueError, match="target_params"):
        DistillConfig.model_validate({"student": {"init": "teacher_layers", "target_params": "50%"}})


def test_size_reads_a_pruned_yaml(tmp_path, teacher_dir):
    from pocketlm.inspect.size import student_config_from_yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"teacher": str(teacher_dir),
                                    "student": {"init": "pruned", "target_params": "50%"}}))
    conf = student_config_from_yaml(path)
    assert (conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers) == (16, 64, 4)
