"""Export a dense pocketlm student as a plain `LlamaForCausalLM` folder that loads with no pocketlm installed.

The student's parameter names are Llama's, so the export is its state dict under a `LlamaConfig`. Before anything
is written, every tensor is checked against the names and shapes a `LlamaForCausalLM` of that config has (built on
the meta device, so it costs no memory); a student that is not a plain Llama (e.g. one with MoE layers) is refused.
The folder is written next to its destination and renamed into place, so a reader never sees half of it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM


def llama_config_from_student(config: PocketLMConfig) -> LlamaConfig:
    """The `LlamaConfig` whose `LlamaForCausalLM` computes exactly what a student of `config` computes."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        architectures=["LlamaForCausalLM"],
        dtype=config.dtype,
    )


def _llama_tensors(model: PocketLMForCausalLM, llama_config: LlamaConfig, dtype: torch.dtype | None) -> dict:
    """The student's state dict as Llama's, checked name by name and shape by shape; tied lm_head left out."""
    with torch.device("meta"):
        reference = LlamaForCausalLM(llama_config)
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    ours = model.state_dict()
    if llama_config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        ours.pop("lm_head.weight", None)
    problems = [f"{name}: not in the student" for name in sorted(expected.keys() - ours.keys())]
    problems += [f"{name}: not a Llama parameter" for name in sorted(ours.keys() - expected.keys())]
    problems += [
        f"{name}: student shape {tuple(ours[name].shape)}, Llama expects {shape}"
        for name, shape in sorted(expected.items())
        if name in ours and tuple(ours[name].shape) != shape
    ]
    if problems:
        raise ValueError("this student is not a plain Llama and cannot be exported as one:\n  " + "\n  ".join(problems))
    return {
        name: t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous() for name, t in sorted(ours.items())
    }


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`; an existing `out_dir` is moved aside first and removed after."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_llama(
    model: PocketLMForCausalLM,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` as a `LlamaForCausalLM` folder: config.json (model_type llama), generation_config.json,
    model.safetensors and, if given, the tokenizer's files. `dtype` converts the weights (default: as they are).
    Returns the folder's path."""
    if not isinstance(model.config, PocketLMConfig):
        raise TypeError(f"export_llama takes a pocketlm student, got a {type(model).__name__}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    llama_config = llama_config_from_student(model.config)
    tensors = _llama_tensors(model, llama_config, dtype)
    if dtype is not None:
        llama_config.dtype = dtype
    else:
        llama_config.dtype = next(iter(tensors.values())).dtype

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
        llama_config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
