"""Initialising a student from a teacher. Oracle: a tiny random transformers `LlamaForCausalLM` (GQA); a student
that keeps every layer must reproduce its logits at fp32 rtol=atol=1e-5."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pocketlm.models.init import evenly_spaced_layers, init_student_from_teacher, student_config_from_teacher

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_teacher(tied: bool = False, layers: int = 3, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    values = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    values.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**values)).eval()


# --- layer choice -----------------------------------------------------------------------------------------------


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert evenly_spaced_layers(3, 2) == [0, 2]
    assert evenly_spaced_layers(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced_layers(7, 1) == [0]
    for n in range(1, 33):
        for k in range(2, n + 1):
            kept = evenly_spaced_layers(n, k)
            assert len(set(kept)) == k and kept == sorted(kept) and kept[0] == 0 and kept[-1] == n - 1
    with pytest.raises(ValueError, match="n_keep"):
        evenly_spaced_layers(4, 5)


# --- config mapping ---------------------------------------------------------------------------------------------


SMOLLM2_135M = {  # the embedded teacher's config.json, as shipped (legacy top-level rope_theta)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000,
    "rope_scaling": None, "tie_word_embeddings": True, "initializer_range": 0.041666666666666664,
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2,
}  # fmt: skip


@pytest.mark.parametrize("as_object", [False, True], ids=["dict", "LlamaConfig"])
def test_smollm2_config_maps_to_a_student(as_object):
    teacher_config = LlamaConfig(**SMOLLM2_135M) if as_object else dict(SMOLLM2_135M)
    if as_object:  # transformers 5 moves rope_theta into rope_parameters
        assert teacher_config.rope_parameters["rope_theta"] == 100000
    config = student_config_from_teacher(teacher_config, num_layers=8)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (576, 9, 3)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
    assert config.num_hidden_layers == 8 and config.tie_word_embeddings is True
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    if as_object:
        assert teacher_config.num_hidden_layers == 30  # the caller's config is untouched


def test_config_overrides_and_layer_choices():
    teacher_config = tiny_teacher().config
    assert student_config_from_teacher(teacher_config).num_hidden_layers == 3
    assert student_config_from_teacher(teacher_config, layers=[0, 2]).num_hidden_layers == 2
    assert student_config_from_teacher(teacher_config, num_hidden_layers=2).num_hidden_layers == 2
    assert student_config_from_teacher(teacher_config, intermediate_size=48).intermediate_size == 48
    assert student_config_from_teacher(teacher_config, hidden_size=64).head_dim == 16  # re-derived: 64 // 4
    assert student_config_from_teacher(teacher_config, hidden_size=64, head_dim=8).head_dim == 8
    with pytest.raises(ValueError, match="unknown PocketLMConfig field"):
        student_config_from_teacher(teacher_config, hidden_dim=8)
    with pytest.raises(ValueError, match="num_layers=3"):
        student_config_from_teacher(teacher_config, num_layers=3, layers=[0, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        student_config_from_teacher(teacher_config, layers=[2, 0])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("attention_bias", True, "attention_bias"),
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "rope_type"),
    ],
)
def test_teachers_the_student_cannot_hold_are_refused(field, value, message):
    config = dict(SMOLLM2_135M, **{field: value})
    with pytest.raises(ValueError, match=message):
        student_config_from_teacher(config)


# --- weight copy ------------------------------------------------------------------------------------------------


def test_kept_layers_are_copied_exactly():
    teacher = tiny_teacher()
    student = init_student_from_teacher(teacher, layers=[0, 2])
    ours, theirs = student.state_dict(), teacher.state_dict()
    assert student.config.num_hidden_layers == 2
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    for student_layer, teacher_layer in [(0, 0), (1, 2)]:
        prefix = f"model.layers.{student_layer}."
        names = [n for n in ours if n.startswith(prefix)]
        assert len(names) == 9  # q, k, v, o, gate, up, down, two norms
        for name in names:
            source = f"model.layers.{teacher_layer}." + name[len(prefix) :]
            assert torch.equal(ours[name], theirs[source]), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_keeping_every_layer_reproduces_the_teacher(tied):
    teacher = tiny_teacher(tied=tied)
    student = init_student_from_teacher(teacher).eval()
    assert student.config.tie_word_embeddings == tied
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ours, theirs = student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], **TOL)


def test_a_different_hidden_size_names_the_parameter_and_both_shapes():
    teacher = tiny_teacher()
    config = student_config_from_teacher(teacher.config, hidden_size=64)
    with pytest.raises(ValueError) as err:
        init_student_from_teacher(teacher, config=config)
    message = str(err.value)
    assert "model.embed_tokens.weight: student shape (100, 64), teacher model.embed_tokens.weight shape (100, 32)" in (
        message
    )
    assert "model.layers.1.self_attn.q_proj.weight" in message  # every mismatch is listed, not just the first


def test_a_vocabulary_mismatch_is_an_error():
    teacher = tiny_teacher()
    config = student_config_from_teacher(teacher.config, vocab_size=120)
    with pytest.raises(ValueError, match="vocabulary size mismatch: student 120, teacher 100"):
        init_student_from_teacher(teacher, config=config)


def test_a_teacher_with_biases_is_refused_before_anything_is_copied():
    teacher = tiny_teacher(attention_bias=True)
    config = student_config_from_teacher(tiny_teacher().config)  # a plain config, so the weight check must catch it
    with pytest.raises(ValueError, match=r"teacher parameter model\.layers\.0\.self_attn\.q_proj\.bias"):
        init_student_from_teacher(teacher, config=config)


def test_layers_must_fit_the_teacher_and_the_config():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="indices of the teacher's 3 layers"):
        init_student_from_teacher(teacher, layers=[0, 3])
    config = student_config_from_teacher(teacher.config, num_layers=2)
    with pytest.raises(ValueError, match="config has 2 layers"):
        init_student_from_teacher(teacher, config=config, layers=[0, 1, 2])
