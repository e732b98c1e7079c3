"""Fingerprints: short hashes that say whether two models (or two tokenizers) are the same, and `model_info`, how a
result names its model. Pure functions of the objects given; nothing here loads a model.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def fingerprint_model(model) -> str:
    """A short hash of a model's architecture and of every byte of its weights, with their dtypes and shapes.

    Every byte, not a sample: two teachers that differ only in rows a sample never reads (an edited special-token
    embedding) must not share a teacher cache. Streamed tensor by tensor (no copy of the model); a tied tensor is
    hashed once and named as an alias. On the embedded SmolLM2-135M it takes 0.31 s in fp32 (538 MB), 0.16 s in bf16, on 2 cores."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    seen: dict[tuple, str] = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{str(p.dtype).removeprefix('torch.')}:{tuple(p.shape)}".encode())
            where = (p.device.type, p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.stride()), p.dtype)
            if p.numel() and where in seen:  # a tied weight: the same bytes under a second name
                h.update(f"=alias:{seen[where]}".encode())
                continue
            seen[where] = name
            t = p.detach().cpu().contiguous()
            h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()[:16]


def fingerprint_tokenizer(tokenizer) -> str:
    """A short hash of the vocabulary and special tokens: two tokenizers with equal fingerprints encode alike."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id], default=str).encode())
    return h.hexdigest()[:16]


def model_info(spec: str, model=None, tokenizer=None) -> dict[str, Any]:
    """How a result names its model: what the user passed, and fingerprints of the weights and tokenizer."""
    info: dict[str, Any] = {"spec": str(spec)}
    if model is not None:
        info["fingerprint"] = fingerprint_model(model)
    if tokenizer is not None:
        info["tokenizer_fingerprint"] = fingerprint_tokenizer(tokenizer)
    return info
