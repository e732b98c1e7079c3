"""Export a Llama-layout model as one GGUF file: llama.cpp runs it, transformers loads it back (`gguf_file=`).

What is written is what llama.cpp's `convert_hf_to_gguf.py` writes for Llama (its `LlamaModel`), from our own code
and the `gguf` package's writer:

- architecture `llama`, hyper-parameters under `llama.*`; `attention.key_length` / `value_length` and
  `rope.dimension_count` state the head dimension, so a pruned student whose hidden_size is not heads × head_dim
  loads (transformers reads head_dim from `rope.dimension_count`, llama.cpp from `key_length`);
- tensor names from `gguf.TENSOR_NAMES`; the rows of q and k permuted per head from transformers' rotary layout
  (a head's first and second halves rotate together, `rotate_half`) to llama.cpp's (adjacent pairs):
  `rope_permute`. transformers' GGUF loader applies the inverse;
- the tokenizer: copied key by key from a GGUF of the same vocabulary (the teacher's: its pre-tokenizer name, merges,
  token types and chat template as llama.cpp's converter wrote them), or built from a byte-level BPE tokenizer
  (`gguf.SpecialVocab` reads its merges, special ids and chat template from the saved files);
- a top-k softmax MoE student (Mixtral's router) as llama.cpp's Mixtral: `llama` with `expert_count` /
  `expert_used_count`, `ffn_gate_inp` and stacked `ffn_{gate,up,down}_exps`. transformers' GGUF loader has no
  llama-with-experts, so such a file runs in llama.cpp only (pocketlm's loader refuses it by its missing weights).

Quant types (`QUANT_NAMES`): f32, f16, bf16 and the block types the `gguf` package can write (q8_0, q5_1, q5_0,
q4_1, q4_0: blocks of 32 values with an fp16 scale, plus an fp16 minimum in the _1 types). Norms and the router
stay F32 in every type, as llama.cpp's converter and `llama-quantize` keep them; a matrix whose rows are not whole
blocks falls back to F16, as the converter does. K-quants are refused by name: `gguf` de-quantises them but cannot
write them (llama.cpp's `llama-quantize` makes them from an f16 export).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pocketlm.models.hf_export import (
    _llama_tensors,
    _matched,
    llama_config_from_student,
    mixtral_config_from_student,
)
from pocketlm.models.load import ModelLoadError, embedded_teacher_path
from pocketlm.models.student import PocketLMConfig
from pocketlm.core.outdir import MIN_FREE, write_folder


@dataclass(frozen=True)
class Quant:
    """A quant type users name: the type of the file's matrices, and the file type stated in its header."""

    ggml: Any  # gguf.GGMLQuantizationType
    file_type: Any  # gguf.LlamaFileType


def _quants() -> dict[str, Quant]:
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    return {"f32": Quant(T.F32, F.ALL_F32), "f16": Quant(T.F16, F.MOSTLY_F16), "bf16": Quant(T.BF16, F.MOSTLY_BF16),
            "q8_0": Quant(T.Q8_0, F.MOSTLY_Q8_0), "q5_1": Quant(T.Q5_1, F.MOSTLY_Q5_1),
            "q5_0": Quant(T.Q5_0, F.MOSTLY_Q5_0), "q4_1": Quant(T.Q4_1, F.MOSTLY_Q4_1),
            "q4_0": Quant(T.Q4_0, F.MOSTLY_Q4_0)}


QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
K_QUANTS = ("q2_k", "q3_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k", "q4_k_s", "q4_k_m", "q5_k", "q5_k_s", "q5_k_m",
            "q6_k")


def quant_type(name: str) -> Quant:
    """The `Quant` of a user's name; K-quants and unknown names are a ValueError that says what to do."""
    key = name.lower()
    if key in K_QUANTS:
        raise ValueError(f"--quant {name}: the gguf package can read K-quants but not write them; export f16 and "
                         f"quantise that file with llama.cpp's llama-quantize (e.g. `llama-quantize model-f16.gguf "
                         f"model-{key}.gguf {key.upper()}`)")
    if key not in QUANT_NAMES:
        raise ValueError(f"unknown --quant {name!r}; valid: {', '.join(QUANT_NAMES)}")
    return _quants()[key]


# ------------------------------------------------------------------------------------------ the model as Llama
@dataclass(frozen=True)
class LlamaLayout:
    """What a GGUF header states about a Llama (or Mixtral) model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    num_experts: int = 0
    experts_per_token: int = 0


def layout_of(config: Any) -> LlamaLayout:
    """The `LlamaLayout` of a `LlamaConfig` or `MixtralConfig`; anything llama.cpp's Llama does not compute
    (biases, another activation, scaled rotary positions, a sliding window) is a ValueError naming it."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    problems = [f"{name} is set" for name in ("attention_bias", "mlp_bias") if getattr(config, name, False)]
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config.hidden_act!r}; Llama uses silu")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope type {rope['rope_type']!r}; pocketlm writes plain rotary positions only")
    if getattr(config, "sliding_window", None):
        problems.append(f"sliding_window is {config.sliding_window}; llama.cpp's Llama attends the whole context")
    if problems:
        raise ValueError("this model cannot be written as llama.cpp's Llama:\n  " + "\n  ".join(problems))
    heads = config.num_attention_heads
    return LlamaLayout(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers, num_heads=heads, num_kv_heads=config.num_key_value_heads or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        context_length=config.max_position_embeddings, rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        num_experts=getattr(config, "num_local_experts", 0) or 0,
        experts_per_token=getattr(config, "num_experts_per_tok", 0) or 0,
    )


def llama_layout_tensors(model: Any) -> tuple[LlamaLayout, dict[str, torch.Tensor]]:
    """(layout, tensors under transformers' Llama / Mixtral names) of a pocketlm student (dense: Llama; top-k
    softmax MoE: Mixtral), a `LlamaForCausalLM` or a `MixtralForCausalLM`; anything else is a ValueError."""
    config = model.config
    if isinstance(config, PocketLMConfig):
        if config.moe is None:
            llama = llama_config_from_student(config)
            return layout_of(llama), _llama_tensors(model, llama, None)
        from transformers import MixtralForCausalLM

        mixtral = mixtral_config_from_student(config)
        with torch.device("meta"):
            reference = MixtralForCausalLM(mixtral)
        renamed = {name.replace(".mlp.router.proj.", ".mlp.gate."): t for name, t in model.state_dict().items()}
        refusal = "this student's tensors do not fit Mixtral's"
        return layout_of(mixtral), _matched(renamed, reference, "Mixtral", refusal)
    if config.model_type not in ("llama", "mixtral"):
        raise ValueError(f"GGUF export writes llama.cpp's Llama layout (Llama and Mixtral models, pocketlm students); "
                         f"this model is a {type(model).__name__} (model_type {config.model_type!r})")
    tensors = dict(model.state_dict())
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return layout_of(config), tensors


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows from transformers' rotary layout to llama.cpp's, head by head: within a head of h_d rows, row
    j < h_d/2 pairs with row j + h_d/2 (rotate_half); llama.cpp pairs rows 2j and 2j+1 (convert_hf_to_gguf's
    `LlamaModel.permute`). w: [heads·h_d, d_in]."""
    head_dim = w.shape[0] // heads
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # [n, h_d/2, 2, ..]


def _layer_names() -> dict[str, Any]:
    from gguf import MODEL_TENSOR as M

    return {"input_layernorm.weight": M.ATTN_NORM, "self_attn.q_proj.weight": M.ATTN_Q,
            "self_attn.k_proj.weight": M.ATTN_K, "self_attn.v_proj.weight": M.ATTN_V,
            "self_attn.o_proj.weight": M.ATTN_OUT, "post_attention_layernorm.weight": M.FFN_NORM,
            "mlp.gate_proj.weight": M.FFN_GATE, "mlp.up_proj.weight": M.FFN_UP, "mlp.down_proj.weight": M.FFN_DOWN,
            "mlp.gate.weight": M.FFN_GATE_INP, "mlp.experts.down_proj": M.FFN_DOWN_EXP}


def gguf_tensors(layout: LlamaLayout, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every tensor, q/k permuted, each Mixtral expert stack split into its gate
    and up stacks ([E, f, d] each)."""
    from gguf import MODEL_TENSOR as M
    from gguf import TENSOR_NAMES

    top = {"model.embed_tokens.weight": M.TOKEN_EMBD, "model.norm.weight": M.OUTPUT_NORM, "lm_head.weight": M.OUTPUT}
    per_layer = _layer_names()
    for name, t in tensors.items():
        a = t.detach().to("cpu", torch.float32).numpy()
        if name in top:
            yield TENSOR_NAMES[top[name]] + ".weight", a
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        part = m.group(2) if m else None
        if part == "mlp.experts.gate_up_proj":  # [E, 2f, d]: gate rows, then up rows
            gate, up = np.split(a, 2, axis=1)
            yield TENSOR_NAMES[M.FFN_GATE_EXP].format(bid=m.group(1)) + ".weight", gate
            yield TENSOR_NAMES[M.FFN_UP_EXP].format(bid=m.group(1)) + ".weight", up
            continue
        if part not in per_layer:
            raise ValueError(f"{name}: no place for it in llama.cpp's Llama layout")
        if part == "self_attn.q_proj.weight":
            a = rope_permute(a, layout.num_heads)
        elif part == "self_attn.k_proj.weight":
            a = rope_permute(a, layout.num_kv_heads)
        yield TENSOR_NAMES[per_layer[part]].format(bid=m.group(1)) + ".weight", a


def encode(name: str, a: np.ndarray, quant: Quant) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of one tensor in a `quant` file: vectors and the router in F32, matrices in the quant
    type, or F16 where a row is not a whole number of the type's blocks."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if a.ndim == 1 or ".ffn_gate_inp." in name or quant.ggml == T.F32:
        return a.astype(np.float32), T.F32
    qtype = quant.ggml if a.shape[-1] % GGML_QUANT_SIZES[quant.ggml][0] == 0 else T.F16
    if qtype == T.F16:
        return a.astype(np.float16), T.F16
    return quantize(a, qtype), qtype


# ------------------------------------------------------------------------------------------ the tokenizer
def bpe_pre_name(tokenizer: Any) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level BPE tokenizer's pre-tokenizer: GPT-2's regex
    ("gpt-2"), SmolLM's digits-then-GPT-2 ("smollm"), or a split regex transformers' GGUF loader names."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"the tokenizer is a {spec['model']['type']} tokenizer; pocketlm writes byte-level BPE "
                         "tokenizers into GGUF (or copies one from a GGUF of the same vocabulary: --tokenizer-from)")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        names = [n for n, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern]
        if names:
            return names[0]
    raise ValueError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one pocketlm "
                     "can name for llama.cpp; copy the tokenizer from a GGUF of the same vocabulary (--tokenizer-from)")


def _write_bpe_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Tokens, their types, merges, special ids and chat template of a byte-level BPE tokenizer, as
    convert_hf_to_gguf's `get_vocab_base` writes them (ids the tokenizer lacks below vocab_size: `[PAD{i}]`)."""
    from gguf import SpecialVocab, TokenType

    pre = bpe_pre_name(tokenizer)
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)} but the model embeds {vocab_size} tokens")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        tokens.append(f"[PAD{i}]" if token is None else token)
        if token is None:
            types.append(TokenType.UNUSED)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="pocketlm-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def gguf_tokens(path: str | os.PathLike) -> list[str]:
    """The token list of a GGUF file (its metadata only, read in about 0.1 s)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    return list(metadata.get("tokenizer.ggml.tokens") or [])


def same_vocabulary(tokenizer: Any, tokens: list[str]) -> bool:
    """Whether `tokenizer` maps exactly `tokens[i]` to id i, for every i."""
    vocab = tokenizer.get_vocab()
    return len(vocab) == len(tokens) and all(vocab.get(t) == i for i, t in enumerate(tokens))


def tokenizer_source(tokenizer: Any, given: str | os.PathLike | None = None) -> Path | None:
    """The GGUF whose tokenizer an export copies: `given`; else the embedded teacher's when `tokenizer` has its
    vocabulary (a student distilled from it keeps the teacher's pre-tokenizer name and chat template this way);
    else None (the tokenizer is written from its own files)."""
    if given is not None:
        return Path(given)
    try:
        teacher = embedded_teacher_path()
    except ModelLoadError:
        return None
    return teacher if tokenizer is not None and same_vocabulary(tokenizer, gguf_tokens(teacher)) else None


def _copy_tokenizer(writer: Any, source: Path, tokenizer: Any, vocab_size: int) -> None:
    """Every `tokenizer.*` key of the GGUF `source`, as it is, after checking its vocabulary is the model's."""
    from gguf import GGUFReader, GGUFValueType

    tokens = gguf_tokens(source)
    if len(tokens) != vocab_size:
        raise ValueError(f"--tokenizer-from {source}: its vocabulary has {len(tokens)} tokens but the model embeds "
                         f"{vocab_size}")
    if tokenizer is not None and not same_vocabulary(tokenizer, tokens):
        raise ValueError(f"--tokenizer-from {source}: its vocabulary is not the model's tokenizer's")
    for key, field in GGUFReader(str(source)).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


# ------------------------------------------------------------------------------------------ the file
def _write_header(writer: Any, layout: LlamaLayout, quant: Quant, name: str) -> None:
    from gguf import GGML_QUANT_VERSION
    from gguf import GGMLQuantizationType as T

    w = writer
    keys = [(w.add_type, "model"), (w.add_name, name), (w.add_vocab_size, layout.vocab_size),
            (w.add_context_length, layout.context_length), (w.add_embedding_length, layout.hidden_size),
            (w.add_block_count, layout.num_layers), (w.add_feed_forward_length, layout.intermediate_size),
            (w.add_head_count, layout.num_heads), (w.add_head_count_kv, layout.num_kv_heads),
            (w.add_key_length, layout.head_dim), (w.add_value_length, layout.head_dim),
            (w.add_rope_dimension_count, layout.head_dim), (w.add_rope_freq_base, layout.rope_theta),
            (w.add_layer_norm_rms_eps, layout.rms_norm_eps), (w.add_file_type, int(quant.file_type))]
    if layout.num_experts:
        keys += [(w.add_expert_count, layout.num_experts), (w.add_expert_used_count, layout.experts_per_token)]
    for add, value in keys:  # llama.* keys as convert_hf_to_gguf writes a Llama's (general.* first)
        add(value)
    if quant.ggml not in (T.F32, T.F16, T.BF16):
        writer.add_quantization_version(GGML_QUANT_VERSION)


def write_gguf(path: Path, model: Any, tokenizer: Any, quant: Quant, *, tokenizer_gguf: Path | None = None,
               name: str = "pocketlm export") -> None:
    """Write `model` (see `llama_layout_tensors`) and its tokenizer as the GGUF file `path`."""
    from gguf import GGUFWriter

    layout, tensors = llama_layout_tensors(model)
    writer = GGUFWriter(str(path), "llama")
    _write_header(writer, layout, quant, name)
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, Path(tokenizer_gguf), tokenizer, layout.vocab_size)
    elif tokenizer is not None:
        _write_bpe_tokenizer(writer, tokenizer, layout.vocab_size)
    else:
        raise ValueError("a GGUF file carries its tokenizer: give the model's tokenizer, or a GGUF to copy one from")
    for gguf_name, a in gguf_tensors(layout, tensors):
        data, qtype = encode(gguf_name, a, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model: Any, out_dir: str | os.PathLike, tokenizer: Any = None, quant: str = "f16", *,
                tokenizer_gguf: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write `model` as the folder `out_dir` holding one file, `model-<quant>.gguf` (`from_pretrained(out_dir,
    gguf_file=...)` and llama.cpp read it), by the output-folder rules of `pocketlm.core.outdir.write_folder`.
    `tokenizer_gguf`: a GGUF of the same vocabulary (e.g. the teacher's) whose tokenizer keys are copied.
    Returns the file's path."""
    q = quant_type(quant)
    filename = f"model-{quant.lower()}.gguf"
    name = Path(str(getattr(model.config, "_name_or_path", "") or "pocketlm export")).name or "pocketlm export"
    need = MIN_FREE + sum(p.numel() * 4 for p in model.parameters())
    folder = write_folder(
        Path(out_dir),
        lambda tmp: write_gguf(tmp / filename, model, tokenizer, q, tokenizer_gguf=tokenizer_gguf, name=name),
        kind="export", overwrite=overwrite, need=need,
    )
    return folder / filename


# ------------------------------------------------------------------------------------------ reading a file back
def gguf_file_bytes(path: str | os.PathLike) -> dict[str, Any]:
    """What a GGUF file holds, by type: {"file_bytes", "tensor_bytes", "file_type" (the header's name, e.g.
    "MOSTLY_Q8_0"), "by_type": {GGML type name: {"tensors", "params", "bytes"}}}. Read with transformers' header
    reader, which stops at the tensor table (0.01 s on the embedded teacher, where `gguf.GGUFReader` parses every
    token string first: 2.8 s); tests check it against `gguf.GGUFReader`."""
    from gguf import GGMLQuantizationType, LlamaFileType
    from transformers.integrations.gguf import GgufHeader, read_gguf_metadata

    by_type: dict[str, dict[str, int]] = {}
    for t in GgufHeader.from_file(str(path)).tensors:
        row = by_type.setdefault(GGMLQuantizationType(t.ggml_type).name, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += int(np.prod(t.shape))
        row["bytes"] += int(t.nbytes)
    file_type = read_gguf_metadata(str(path))[0].get("general.file_type")
    return {"file_bytes": Path(path).stat().st_size, "tensor_bytes": sum(r["bytes"] for r in by_type.values()),
            "file_type": LlamaFileType(int(file_type)).name if file_type is not None else None, "by_type": by_type}
