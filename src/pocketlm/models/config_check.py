"""A model's config.json checked before anything is built from it (issue #16).

transformers takes a config's numbers as they come: ``num_attention_heads: 0`` divides by zero, ``"4"`` or ``32.5``
fail deep inside a layer's constructor, and ``num_hidden_layers: 100000`` allocates until the machine gives out.
`check_model_config` refuses such a config by file and field; `estimated_weight_bytes` gives what its weights would
take (a rough upper bound of the parameter count: embeddings, attention, MLPs or experts), so a model that does
not fit the memory budget, or the machine, is refused before it is built.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from pocketlm.core.units import MemoryBudgetError, format_bytes

# field → (required for a decoder, largest sane value). Bounds are far above any released model (Llama-3.1-405B:
# 126 layers, 16,384 wide, 128 heads, 53,248 MLP, 128k vocabulary) and low enough that the size model's per-layer
# lists and any estimate stay small.
INT_FIELDS: dict[str, int] = {
    "vocab_size": 2**24, "hidden_size": 2**18, "intermediate_size": 2**20, "num_hidden_layers": 4096,
    "num_attention_heads": 2**12, "num_key_value_heads": 2**12, "head_dim": 2**14,
    "max_position_embeddings": 2**26, "sliding_window": 2**26, "num_local_experts": 2**12,
    "num_experts_per_tok": 2**12, "n_embd": 2**18, "n_layer": 4096, "n_head": 2**12, "n_positions": 2**26,
    "n_inner": 2**20, "n_ctx": 2**26,
}
MAX_PARAMETERS = 10**13  # 10 T: past every model that exists; a config above it is a typo or a bomb


class ModelConfigError(ValueError):
    """A model config whose numbers cannot describe a model; the message names the file and the field."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_model_config(raw: Mapping[str, Any], source: str) -> None:
    """Refuse (naming `source` and the field) a config whose size fields are not positive integers within
    `INT_FIELDS`' bounds, whose hidden size is not split evenly by its heads or heads by KV heads, or whose
    estimated parameter count is past `MAX_PARAMETERS`. Fields that are absent, or null where transformers
    derives them (KV heads, head_dim, sliding_window, n_inner), are left to transformers."""
    derived = ("num_key_value_heads", "head_dim", "sliding_window", "n_inner", "max_position_embeddings")
    for name, most in INT_FIELDS.items():
        if name not in raw or (raw[name] is None and name in derived):
            continue
        v = raw[name]
        if not _is_int(v):
            raise ModelConfigError(f"{source}: {name} must be a whole number, got {v!r}")
        if not 1 <= v <= most:
            raise ModelConfigError(f"{source}: {name} must be between 1 and {most:,}, got {v:,}")
    sub = raw.get("text_config")
    if isinstance(sub, Mapping):
        check_model_config(sub, f"{source} (text_config)")
    d, h = raw.get("hidden_size", raw.get("n_embd")), raw.get("num_attention_heads", raw.get("n_head"))
    kv = raw.get("num_key_value_heads")
    if _is_int(d) and _is_int(h) and d % h:  # transformers requires it even where head_dim is given
        raise ModelConfigError(f"{source}: hidden_size {d} is not divisible by num_attention_heads {h}")
    if _is_int(h) and _is_int(kv) and h % kv:
        raise ModelConfigError(f"{source}: num_attention_heads {h} is not divisible by num_key_value_heads {kv}")
    e, k = raw.get("num_local_experts"), raw.get("num_experts_per_tok")
    if _is_int(e) and _is_int(k) and k > e:
        raise ModelConfigError(f"{source}: num_experts_per_tok {k} is more than num_local_experts {e}")
    n = estimated_parameters(raw)
    if n > MAX_PARAMETERS:
        raise ModelConfigError(f"{source}: its sizes describe about {n:.3g} parameters (more than "
                               f"{MAX_PARAMETERS:.0g}); check num_hidden_layers, hidden_size and vocab_size")


def estimated_parameters(raw: Mapping[str, Any]) -> int:
    """A decoder's parameter count from its config.json (0 where its sizes are unknown), norms and biases left
    out: embedding (and untied output) rows, attention projections, and a SwiGLU MLP per expert."""
    def get(*names: str, default: int = 0) -> int:
        return next((raw[n] for n in names if _is_int(raw.get(n))), default)

    sub = raw.get("text_config")
    if isinstance(sub, Mapping) and "hidden_size" not in raw:
        return estimated_parameters(sub)
    d, layers, vocab = get("hidden_size", "n_embd"), get("num_hidden_layers", "n_layer"), get("vocab_size")
    f = get("intermediate_size", "n_inner", default=4 * d)
    heads = get("num_attention_heads", "n_head", default=1)
    kv, hd = get("num_key_value_heads", default=heads), get("head_dim", default=d // heads)
    attn = 2 * d * heads * hd + 2 * d * kv * hd
    mlp = 3 * d * f * max(1, get("num_local_experts"))
    return (1 + (raw.get("tie_word_embeddings") is False)) * vocab * d + layers * (attn + mlp)


def machine_memory() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(raw: Mapping[str, Any], source: str, bytes_per_value: int, budget: int | None) -> None:
    """Refuse, before it is built, a model whose estimated weights exceed `budget` (``--max-memory``) or this
    machine's memory (with or without a budget)."""
    need = estimated_parameters(raw) * bytes_per_value
    ram = machine_memory()
    if budget is not None and need > budget:
        raise MemoryBudgetError(f"--max-memory {format_bytes(budget)} is too small for {source}: its weights alone "
                                f"take about {format_bytes(need)}")
    if ram is not None and need > ram:
        raise MemoryBudgetError(f"{source}: its weights would take about {format_bytes(need)}, more than this "
                                f"machine's {format_bytes(ram)} of memory; check num_hidden_layers and hidden_size")
