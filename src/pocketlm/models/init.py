"""Initialise a student from a Llama-family teacher by keeping a subset of its layers.

As DistilBERT (Sanh et al., 2019) does, and as Minitron's depth pruning (Muralidharan et al., 2024) does before it
prunes width: the student takes the teacher's embeddings, final norm and output head, and a chosen subset of its
decoder layers. Every tensor's name and shape is checked before any is copied, so a mismatch is a `ValueError`
naming the parameter and both shapes, never a half-initialised student.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
from transformers import PreTrainedModel

from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM

DEFAULT_ROPE_THETA = 10000.0  # transformers' default when a Llama config names none


def evenly_spaced_layers(n_teacher: int, n_keep: int) -> list[int]:
    """`n_keep` layer indices spread evenly over `n_teacher`, always keeping the first and the last.

    Index i is round(i · (n_teacher - 1) / (n_keep - 1)), halves rounded up; e.g. 30 → 8 keeps
    [0, 4, 8, 12, 17, 21, 25, 29]. With n_keep == 1 the first layer is kept.
    """
    if not 1 <= n_keep <= n_teacher:
        raise ValueError(f"cannot keep {n_keep} of {n_teacher} layers: need 1 <= n_keep <= n_teacher")
    if n_keep == 1:
        return [0]
    span, steps = n_teacher - 1, n_keep - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(n_keep)]


def _check_layers(layers: Sequence[int], n_teacher: int) -> list[int]:
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("layers is empty: keep at least one teacher layer")
    if any(not 0 <= i < n_teacher for i in layers):
        raise ValueError(f"layers {layers} must be indices of the teacher's {n_teacher} layers")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers {layers} must be strictly increasing")
    return layers


def _rope_theta(get: Any) -> float:
    """RoPE base: transformers 5 keeps it in `rope_parameters["rope_theta"]`, older configs in `rope_theta`."""
    params = get("rope_parameters") or get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ValueError(
            f"the teacher uses rope_type {rope_type!r}; the student implements only default rotary embeddings"
        )
    if "rope_theta" not in params and any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("the teacher has per-layer-type rope_parameters; the student has one RoPE for all layers")
    theta = params.get("rope_theta", get("rope_theta"))
    return float(theta) if theta is not None else DEFAULT_ROPE_THETA


def student_config_from_teacher(
    teacher_config: Any,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    **overrides: Any,
) -> PocketLMConfig:
    """A `PocketLMConfig` with a Llama-family teacher's shape and fewer layers.

    `teacher_config` is a transformers config (llama, mistral, or any with Llama's field names) or a dict of one.
    Depth: `layers` (teacher indices) or `num_layers` (evenly spaced, see `evenly_spaced_layers`) or, if neither,
    `overrides["num_hidden_layers"]`, else all layers. `overrides` are `PocketLMConfig` fields applied last;
    overriding hidden_size or num_attention_heads without head_dim re-derives head_dim from them.
    Teachers whose layers the student cannot hold (biases, non-SiLU activations, scaled RoPE) are a `ValueError`.
    The teacher's config is not modified.
    """
    if hasattr(teacher_config, "get_text_config"):
        teacher_config = teacher_config.get_text_config(decoder=True)
    if isinstance(teacher_config, Mapping):
        source = dict(teacher_config)
        get = source.get
    else:
        get = lambda name, default=None: getattr(teacher_config, name, default)  # noqa: E731

    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if get(name) is None]
    if missing:
        raise ValueError(f"teacher config has no {', '.join(missing)}: not a Llama-family decoder config")
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"teacher hidden_act is {act!r}; the student's SwiGLU MLP uses silu")
    for name in ("attention_bias", "mlp_bias"):
        if get(name):
            raise ValueError(f"teacher config has {name}=True; the student has no biases")
    window = get("sliding_window")
    if get("use_sliding_window", True) and window is not None and window < (get("max_position_embeddings") or 0):
        warnings.warn(
            f"teacher attends within a sliding window of {window} tokens; the student attends to all tokens",
            stacklevel=2,
        )

    n_teacher = int(get("num_hidden_layers"))
    if layers is not None:
        layers = _check_layers(layers, n_teacher)
        if num_layers is not None and num_layers != len(layers):
            raise ValueError(f"num_layers={num_layers} but layers lists {len(layers)}: {layers}")
    else:
        n_keep = num_layers if num_layers is not None else overrides.get("num_hidden_layers", n_teacher)
        layers = evenly_spaced_layers(n_teacher, n_keep)
    if overrides.get("num_hidden_layers", len(layers)) != len(layers):
        raise ValueError(f"num_hidden_layers={overrides['num_hidden_layers']} but {len(layers)} layers are kept")

    num_heads = int(get("num_attention_heads"))
    values = {
        "vocab_size": int(get("vocab_size")),
        "hidden_size": int(get("hidden_size")),
        "intermediate_size": int(get("intermediate_size")),
        "num_hidden_layers": len(layers),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("num_key_value_heads") or num_heads),
        "head_dim": int(get("head_dim") or int(get("hidden_size")) // num_heads),
        "max_position_embeddings": int(get("max_position_embeddings", 2048)),
        "rms_norm_eps": float(get("rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(get),
        "tie_word_embeddings": bool(get("tie_word_embeddings", False)),
        "initializer_range": float(get("initializer_range", 0.02)),
        "bos_token_id": get("bos_token_id"),
        "eos_token_id": get("eos_token_id"),
        "pad_token_id": get("pad_token_id"),
    }
    known = {f.name for f in fields(PocketLMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown PocketLMConfig field(s) {unknown}; valid: {sorted(values)}")
    if "head_dim" not in overrides and ("hidden_size" in overrides or "num_attention_heads" in overrides):
        values["head_dim"] = None  # a narrower student: derive hidden_size // num_attention_heads again
    values.update(overrides)
    return PocketLMConfig(**values)


def _layer_map(student_keys: list[str], layers: list[int], tied: bool) -> dict[str, str]:
    """student parameter name → teacher parameter name."""
    mapping = {}
    for key in student_keys:
        if tied and key == "lm_head.weight":
            continue
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers.") :].split(".", 1)
            mapping[key] = f"model.layers.{layers[int(index)]}.{rest}"
        else:
            mapping[key] = key
    return mapping


def init_student_from_teacher(
    teacher: PreTrainedModel,
    config: PocketLMConfig | None = None,
    layers: Sequence[int] | None = None,
) -> PocketLMForCausalLM:
    """A student whose embeddings, final norm, output head (unless tied) and layers are copies of the teacher's.

    Student layer i is teacher layer `layers[i]`. Without `config`, the config is `student_config_from_teacher`'s;
    without `layers`, they are evenly spaced over the teacher's depth. Weights are cast to the student's dtype
    (fp32 by default). Raises `ValueError`, before copying anything, when a name or shape does not match, when the
    vocabularies differ, or when a kept teacher layer has parameters the student would drop (biases, extra norms).
    """
    n_teacher = int(teacher.config.get_text_config(decoder=True).num_hidden_layers)
    if config is None:
        config = student_config_from_teacher(teacher.config, layers=layers)
    if layers is None:
        layers = evenly_spaced_layers(n_teacher, config.num_hidden_layers)
    layers = _check_layers(layers, n_teacher)
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"config has {config.num_hidden_layers} layers but layers lists {len(layers)}: {layers}")

    teacher_vocab = teacher.get_input_embeddings().weight.shape[0]
    if teacher_vocab != config.vocab_size:
        raise ValueError(
            f"vocabulary size mismatch: student {config.vocab_size}, teacher {teacher_vocab}; "
            "the student must share the teacher's tokenizer and embedding rows"
        )

    student = PocketLMForCausalLM(config)
    ours = student.state_dict()
    theirs = teacher.state_dict()
    mapping = _layer_map(list(ours), layers, config.tie_word_embeddings)

    problems = []
    for name, source in mapping.items():
        if source not in theirs:
            problems.append(f"{name}: the teacher has no {source}")
        elif theirs[source].shape != ours[name].shape:
            problems.append(
                f"{name}: student shape {tuple(ours[name].shape)}, teacher {source} shape {tuple(theirs[source].shape)}"
            )
    used = set(mapping.values())
    kept_prefixes = tuple(f"model.layers.{t}." for t in layers)
    problems += [
        f"teacher parameter {key} has no place in the student (biases or a layout the student does not have)"
        for key in sorted(theirs)
        if key.startswith(kept_prefixes) and key not in used
    ]
    if problems:
        raise ValueError("cannot initialise the student from this teacher:\n  " + "\n  ".join(problems))

    with torch.no_grad():
        for name, source in mapping.items():
            ours[name].copy_(theirs[source])
    return student
