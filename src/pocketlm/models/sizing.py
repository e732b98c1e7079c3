"""What is large: an analytic size model of a decoder-only causal LM, from its config alone (no weights).

`architecture(config)` reads a pocketlm student config (dense or MoE) or a transformers config of a known family
(llama, mistral, qwen2, mixtral, gpt2) into an `Architecture`: the shapes of every weight tensor. `estimate()` turns
it into figures, each checked against the real model in tests/inspect/test_size.py (within 2 % unless stated;
`inspect.size_measure` measures the model, `inspect.size` reports both):

- parameters by part (embedding, attention, MLP or routed experts + router + shared experts, norms), total, and
  active per token for MoE: total − routed + routed·k/E per layer (k on average for expert choice), the convention
  of `pocketlm.models.size_moe.parameter_counts`, which measures it on a model.
- weight bytes at fp32 / bf16, and at int8 / int4 as GGUF's Q8_0 / Q4_0 store them: every matrix in groups of
  `QUANT_GROUP` = 32 values along its input dimension, each group with one fp16 scale (34 and 18 bytes per group);
  vectors (norms, biases) stay at 16 bits. Buffers that are not parameters (rotary tables, hash-router tables) are
  not weights and are not counted.
- KV-cache bytes: 2 (K and V) · n_kv · h_d · bytes per token per layer (GQA-aware); a sliding-window layer holds at
  most W tokens (transformers' sliding cache keeps W − 1 and the newest token's in one buffer), at batch B.
- training memory with AdamW (Rajbhandari et al., 2020, ZeRO; "Transformer Math 101", EleutherAI 2023): fp32 =
  weights 4N + gradients 4N + moments 8N = 16N bytes; mixed precision = bf16 weights 2N + bf16 gradients 2N +
  fp32 master copy 4N + fp32 moments 8N = 16N. Activations for a batch b × s, without recomputation: for
  Llama-family layers the tensors each part saves for backward, by dtype (`activation_bytes`: attention kernel,
  GQA, head-pruned layers, routed experts and shared experts included; tested to 1 % against autograd's saved
  tensors); for GPT-2 layers Korthikanti et al. (2022, eq. 2 and §4.3).
- FLOPs per token at context T, two conventions:
  * `kaplan`: 2N + 2·L·T·d_attn forward (Kaplan et al., 2020, table 1: N non-embedding (active) parameters,
    d_attn = n_h·h_d; the lm_head is NOT counted); training 3× forward (6N + 6·L·T·d_attn).
  * `executed`: what the matmuls compute, as `torch.utils.flop_counter.FlopCounterMode` counts them: 2 per
    multiply-add of every weight matrix a token passes through (active experts only), the lm_head (2·d·V)
    INCLUDED, and attention over the full T×T score matrix, 4·L·T·d_attn (QKᵀ and AV; kernels do not skip the
    causal half); norms, softmax and activations are not counted. Training = 3× forward (backward computes the
    gradients of both operands of every matmul).
- Chinchilla-optimal training tokens ≈ 20 × total parameters (Hoffmann et al., 2022).

Shape legend: V vocabulary, d hidden size, L layers, n_h query heads, n_kv key/value heads, h_d head dimension,
f MLP intermediate size, E experts, k experts per token, T context length, b batch.

Pure functions of a config (or an `Architecture`), below `pocketlm.memory`, which budgets batches with them;
`storage_bytes` is the one byte count taken on a real model (the weights as loaded).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from transformers import AutoConfig

from pocketlm.core.registry import Registry
from pocketlm.models.moe import moe_layer_ids
from pocketlm.models.student import register_auto_classes

QUANT_GROUP = 32  # values per quantisation group (GGUF Q8_0 / Q4_0 blocks)
SCALE_BYTES = 2  # one fp16 scale per group
CHINCHILLA_TOKENS_PER_PARAM = 20
BYTES = {"fp32": 4, "bf16": 2}
PARTS = ("embedding", "attention", "mlp", "experts", "router", "shared_experts", "norms")


# ------------------------------------------------------------------------------------------ the architecture
@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int  # experts per token (average, for expert choice)
    expert_size: int  # each expert's intermediate size
    shared_size: int  # intermediate size of the always-on shared SwiGLU (0: none)
    router_params: bool  # a learned [E, d] router (hash routing has none)


@dataclass(frozen=True)
class Architecture:
    """The shapes that decide a decoder's size. Built by `architecture(config)`; nothing here holds weights."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied: bool
    norm: str = "rmsnorm"  # rmsnorm (weight) | layernorm (weight + bias)
    mlp: str = "swiglu"  # swiglu (gate, up, down) | gelu (fc, proj)
    attn_bias: tuple[bool, bool, bool, bool] = (False, False, False, False)  # q, k, v, o
    mlp_bias: bool = False
    learned_positions: int = 0  # rows of a learned position embedding (GPT-2); 0 for rotary
    moe: MoESpec | None = None
    moe_layers: tuple[int, ...] = ()
    windows: tuple[int | None, ...] = ()  # per layer: sliding window, None for full attention
    layer_kv_heads: tuple[int, ...] = ()  # per layer KV heads where pruning left fewer (empty: num_kv_heads each)
    attn_kernel: str = "sdpa"  # sdpa (or flash: no score matrix kept for backward) | eager (keeps softmax(QKᵀ))

    @property
    def d_attn(self) -> int:
        return self.num_heads * self.head_dim

    def kv_heads(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def q_heads(self, layer: int) -> int:
        """Query heads of `layer`: each kept KV group keeps its n_h / n_kv query heads."""
        return self.kv_heads(layer) * (self.num_heads // self.num_kv_heads)


@dataclass(frozen=True)
class Tensor:
    """`count` weight tensors of `shape` ([out, in] for a matrix, [n] for a vector) in `part`.

    kind: linear (a matmul per token), lookup (an embedding row read), vector (norm weight, bias),
    tied (the lm_head sharing the embedding's storage: FLOPs, no parameters). `active` is the share of the
    `count` tensors one token uses (k/E for routed experts)."""

    part: str
    shape: tuple[int, ...]
    count: int = 1
    kind: str = "linear"
    active: float = 1.0

    @property
    def numel(self) -> int:
        return 0 if self.kind == "tied" else self.count * math.prod(self.shape)


def _linear(part: str, out: int, inp: int, bias: bool, count: int = 1, active: float = 1.0) -> list[Tensor]:
    w = [Tensor(part, (out, inp), count, "linear", active)]
    return w + [Tensor(part, (out,), count, "vector", active)] if bias else w


def _swiglu(part: str, d: int, f: int, bias: bool, count: int = 1, active: float = 1.0) -> list[Tensor]:
    return (_linear(part, f, d, bias, count, active) + _linear(part, f, d, bias, count, active)
            + _linear(part, d, f, bias, count, active))


def tensors(arch: Architecture) -> list[Tensor]:
    """Every weight tensor of the model, by part."""
    a, d = arch, arch.hidden_size
    norm = [Tensor("norms", (d,), 1 if a.norm == "rmsnorm" else 2, "vector")]
    out = [Tensor("embedding", (a.vocab_size, d), kind="lookup")]
    if a.learned_positions:
        out.append(Tensor("embedding", (a.learned_positions, d), kind="lookup"))
    q, k, v, o = a.attn_bias
    for layer in range(a.num_layers):
        dq, dkv = a.q_heads(layer) * a.head_dim, a.kv_heads(layer) * a.head_dim
        out += _linear("attention", dq, d, q) + _linear("attention", dkv, d, k)
        out += _linear("attention", dkv, d, v) + _linear("attention", d, dq, o)
        if a.moe is not None and layer in a.moe_layers:
            m = a.moe
            if m.router_params:
                out.append(Tensor("router", (m.num_experts, d)))
            out += _swiglu("experts", d, m.expert_size, False, m.num_experts, m.top_k / m.num_experts)
            if m.shared_size:
                out += _swiglu("shared_experts", d, m.shared_size, False)
        elif a.mlp == "swiglu":
            out += _swiglu("mlp", d, a.intermediate_size, a.mlp_bias)
        else:
            out += _linear("mlp", a.intermediate_size, d, True) + _linear("mlp", d, a.intermediate_size, True)
        out += norm * 2
    out += norm
    out.append(Tensor("embedding", (a.vocab_size, d), kind="tied" if a.tied else "linear"))
    return out


# ------------------------------------------------------------------------------------------ reading configs
ARCHITECTURES: Registry[Callable[[Any, "_Fields"], Architecture]] = Registry("architecture (config model_type)")
REQUIRED: dict[str, tuple[str, ...]] = {}  # model_type → the config fields the size model cannot do without
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class _Fields:
    """Which fields a config states: those of its config.json when we have it (transformers fills the rest with
    defaults, which would hide a missing one), else those of the config object."""

    def __init__(self, config: Any, raw: Mapping[str, Any] | None) -> None:
        self.config = config
        self.present = set(raw) if raw is not None else set(config.to_dict())

    def check(self, model_type: str) -> None:
        missing = [n for n in REQUIRED[model_type] if n not in self.present or getattr(self.config, n, None) is None]
        if missing:
            raise ValueError(
                f"the {model_type} config lacks {', '.join(missing)}; the size model needs "
                f"{', '.join(REQUIRED[model_type])}"
            )

    def get(self, name: str, default: Any = None) -> Any:
        value = getattr(self.config, name, None)
        return default if value is None else value


def _windows(f: _Fields, n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window: `layer_types` when the config has them (transformers 5), else `sliding_window`
    for every layer (Mistral, Mixtral), unless `use_sliding_window` is false (Qwen2)."""
    window = f.get("sliding_window")
    if window is None or f.get("use_sliding_window", True) is False:
        return (None,) * n_layers
    types = f.get("layer_types")
    if types is not None:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    return (int(window),) * n_layers


def _llama_like(f: _Fields, family: str, **extra: Any) -> Architecture:
    d, h, n = int(f.get("hidden_size")), int(f.get("num_attention_heads")), int(f.get("num_hidden_layers"))
    bias = bool(f.get("attention_bias", False))
    kernel = getattr(f.config, "_attn_implementation", None) or "sdpa"
    return Architecture(
        attn_kernel="eager" if kernel == "eager" else "sdpa",
        family=family, vocab_size=int(f.get("vocab_size")), hidden_size=d, num_layers=n, num_heads=h,
        num_kv_heads=int(f.get("num_key_value_heads", h)), head_dim=int(f.get("head_dim", d // h)),
        intermediate_size=int(f.get("intermediate_size")), tied=bool(f.get("tie_word_embeddings", False)),
        attn_bias=extra.pop("attn_bias", (bias,) * 4), mlp_bias=bool(f.get("mlp_bias", False)),
        windows=_windows(f, n), **extra,
    )  # fmt: skip


def _register(model_type: str, required: tuple[str, ...]):
    REQUIRED[model_type] = required
    return ARCHITECTURES.register(model_type)


@_register("llama", _LLAMA_FIELDS)
def _llama(config: Any, f: _Fields) -> Architecture:
    return _llama_like(f, "llama")


@_register("mistral", _LLAMA_FIELDS)
def _mistral(config: Any, f: _Fields) -> Architecture:
    return _llama_like(f, "mistral")


@_register("qwen2", _LLAMA_FIELDS)
def _qwen2(config: Any, f: _Fields) -> Architecture:
    return _llama_like(f, "qwen2", attn_bias=(True, True, True, False))  # q/k/v biases, none on o


@_register("mixtral", _LLAMA_FIELDS + ("num_local_experts", "num_experts_per_tok"))
def _mixtral(config: Any, f: _Fields) -> Architecture:
    e, k = int(f.get("num_local_experts")), int(f.get("num_experts_per_tok"))
    moe = MoESpec(e, k, int(f.get("intermediate_size")), 0, True)
    return _llama_like(f, "mixtral", moe=moe, moe_layers=tuple(range(int(f.get("num_hidden_layers")))))


@_register("pocketlm", _LLAMA_FIELDS)
def _pocketlm(config: Any, f: _Fields) -> Architecture:
    kept = f.get("kept_kv_heads")  # a head-pruned student: the KV groups each layer kept
    pruned = {"layer_kv_heads": tuple(len(k) for k in kept)} if kept else {}
    spec = f.get("moe")
    if spec is None:
        return _llama_like(f, "pocketlm", **pruned)
    size = spec["expert_size"] or int(f.get("intermediate_size"))
    moe = MoESpec(spec["num_experts"], spec["top_k"], size, spec["num_shared_experts"] * size,
                  spec["router"] != "hash")
    return _llama_like(f, "pocketlm", moe=moe, moe_layers=tuple(moe_layer_ids(config)), **pruned)


@_register("gpt2", ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"))
def _gpt2(config: Any, f: _Fields) -> Architecture:
    d, h, n = int(f.get("n_embd")), int(f.get("n_head")), int(f.get("n_layer"))
    return Architecture(
        family="gpt2", vocab_size=int(f.get("vocab_size")), hidden_size=d, num_layers=n, num_heads=h,
        num_kv_heads=h, head_dim=d // h, intermediate_size=int(f.get("n_inner", 4 * d)),
        tied=bool(f.get("tie_word_embeddings", True)), norm="layernorm", mlp="gelu", attn_bias=(True,) * 4,
        learned_positions=int(f.get("n_positions")), windows=(None,) * n,
    )  # fmt: skip


def architecture(config: Any, raw: Mapping[str, Any] | None = None) -> Architecture:
    """The `Architecture` of a transformers config object (or a dict with `model_type`, i.e. a config.json).

    `raw`: the config.json the object was read from, if any, so that a missing required field is reported rather
    than replaced by a transformers default. An architecture outside `ARCHITECTURES` is a ValueError naming it."""
    if isinstance(config, Architecture):
        return config
    if isinstance(config, Mapping):
        raw, config = config, config_from_dict(config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"the size model does not know the architecture {model_type!r}; it reads the configs of: "
            f"{', '.join(ARCHITECTURES.names())} (fields needed: "
            + "; ".join(f"{t}: {', '.join(REQUIRED[t])}" for t in ARCHITECTURES.names()) + ")"
        )
    fields = _Fields(config, raw)
    fields.check(model_type)
    return ARCHITECTURES.get(model_type)(config, fields)


def config_from_dict(raw: Mapping[str, Any]) -> Any:
    """A transformers config object from a config.json dict; its `model_type` must be a known architecture."""
    register_auto_classes()  # model_type "pocketlm"
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"config model_type {model_type!r} is not one the size model reads; known: {', '.join(ARCHITECTURES)}"
        )
    return AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})


# ------------------------------------------------------------------------------------------ the figures
@dataclass
class SizeEstimate:
    """Every figure for one architecture at one context length and batch. Bytes are bytes, FLOPs are FLOPs."""

    family: str
    context: int
    batch: int
    params: dict[str, int]  # per part, plus total, active, routed, non_embedding, active_non_embedding
    weight_bytes: dict[str, int]  # fp32, bf16, int8, int4, and the scales' share of int8/int4
    kv_cache: dict[str, int]  # bytes per token (fp32, bf16) and at context × batch
    training_bytes: dict[str, int]  # per AdamW setting: weights, grads, moments, master, activations, total
    flops: dict[str, float]  # per token at `context`: forward/train in both conventions, and their parts
    chinchilla_tokens: int
    arch: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parameter_breakdown(arch: Architecture) -> dict[str, int]:
    """Parameters per part (`PARTS`), total, routed (all routed experts), active per token, non-embedding."""
    ts = tensors(arch)
    out = {p: sum(t.numel for t in ts if t.part == p) for p in PARTS}
    total = sum(out.values())
    routed = out["experts"]
    per_layer = routed // max(len(arch.moe_layers), 1)
    active = total
    if arch.moe is not None:  # size_moe.parameter_counts's rounding: routed·k // E per layer
        active -= len(arch.moe_layers) * (per_layer - per_layer * arch.moe.top_k // arch.moe.num_experts)
    out.update(total=total, routed=routed, active=active, non_embedding=total - out["embedding"],
               active_non_embedding=active - out["embedding"])
    return out


def weight_bytes(arch: Architecture) -> dict[str, int]:
    """Bytes of the weights at fp32, bf16, and group-quantised int8 / int4 (matrices only; vectors at 16 bits)."""
    ts = [t for t in tensors(arch) if t.kind != "tied"]
    numel = sum(t.numel for t in ts)
    matrices = [t for t in ts if t.kind in ("linear", "lookup")]
    vectors = numel - sum(t.numel for t in matrices)
    groups = sum(t.count * t.shape[0] * math.ceil(t.shape[1] / QUANT_GROUP) for t in matrices)
    out = {name: numel * size for name, size in BYTES.items()}
    for name, bits in (("int8", 8), ("int4", 4)):
        values = sum(t.count * t.shape[0] * math.ceil(t.shape[1] / QUANT_GROUP) * QUANT_GROUP * bits // 8
                     for t in matrices)
        out[name] = values + groups * SCALE_BYTES + vectors * 2
        out[f"{name}_scales"] = groups * SCALE_BYTES
    return out


def kv_cache_bytes(arch: Architecture, context: int, batch: int = 1) -> dict[str, int]:
    """KV-cache bytes per token (every layer, before any window fills) and held at `context` tokens × `batch`."""
    per_token = [2 * arch.kv_heads(i) * arch.head_dim for i in range(arch.num_layers)]  # K and V values, layer i
    held = sum((min(context, w) if w else context) * kv for w, kv in zip(arch.windows, per_token))
    out: dict[str, int] = {}
    for name, size in BYTES.items():
        out[f"per_token_{name}"] = sum(per_token) * size
        out[f"total_{name}"] = batch * held * size
    return out


def activation_bytes(arch: Architecture, seq: int, batch: int, bytes_per_value: int = 2) -> int:
    """Bytes autograd keeps for backward in one forward pass of `batch` × `seq` tokens, without recomputation.

    For Llama-family layers (RMSNorm, rotary, GQA, SwiGLU or routed SwiGLU experts) it counts, per token, the
    tensors the layers save, at `bytes_per_value` (the weights' dtype) or in fp32 where the computation upcasts:
    each RMSNorm its fp32 input and 1/rms, the normalised value and its output; attention with a fused kernel
    (sdpa, flash) Q, K, V (GQA: n_kv heads), its output and an fp32 log-sum-exp per head, with the eager kernel Q,
    K and V repeated to n_h heads, the fp32 softmax(QKᵀ) (plus its cast copy below fp32) and the output; a SwiGLU
    MLP gate, up, silu(gate) and their product (4f); a routed layer the router's fp32 logits, int64 choices and fp32
    weights, each routed copy of the token (k·d), its expert's 4·f_e, the fp32 expert outputs before and after
    weighting (2·k·d), the dispatch indices, and the shared experts' 4·f_s; the rotary cos/sin once, the token ids,
    and the fp32 log-probabilities of the loss (s·V). Per-layer head counts after pruning are taken as they are.
    Tested against the tensors autograd saves for dense, head-pruned and MoE students (tests/inspect/test_size.py).
    GPT-2 layers (LayerNorm, 4d GeLU MLP, dropout) use Korthikanti et al. (2022): L·s·b·d·(34 + 5·a·s/d) +
    5·s·b·d bytes at 16 bits, scaled by bytes_per_value / 2, plus 4·s·b·V for the logits."""
    s, b, d, p, V = seq, batch, arch.hidden_size, bytes_per_value, arch.vocab_size
    if arch.mlp != "swiglu":
        sixteen_bit = arch.num_layers * s * b * d * (34 + 5 * arch.num_heads * s / d) + 5 * s * b * d
        return int(sixteen_bit * p / 2 + 4 * s * b * V)
    norm = 4 * d + 4 + 2 * p * d
    per_token = norm + 2 * arch.head_dim * p + 8 + 4 * V  # final norm, rotary cos/sin, ids, fp32 log-probs
    for layer in range(arch.num_layers):
        dq, dkv, h = arch.q_heads(layer) * arch.head_dim, arch.kv_heads(layer) * arch.head_dim, arch.q_heads(layer)
        per_token += 2 * norm
        if arch.attn_kernel == "eager":
            per_token += 4 * p * dq + 4 * h * s + (p * h * s if p != 4 else 0)
        else:
            per_token += p * (2 * dq + 2 * dkv) + 4 * h
        m = arch.moe
        if m is None or layer not in arch.moe_layers:
            per_token += 4 * p * arch.intermediate_size
            continue
        k = m.top_k
        per_token += 4 * m.num_experts + 12 * k + 4  # router: fp32 logits, int64 choices, fp32 weights
        per_token += p * k * d + 4 * p * k * m.expert_size + 4 * k + 4 * p * m.shared_size
        if arch.family == "mixtral":  # transformers' experts: three int64 index vectors, outputs in the dtype
            per_token += 24 * k + p * k * d
        else:  # pocketlm's dropless dispatch: two int64 index vectors, fp32 outputs before and after weighting
            per_token += 16 * k + 8 * k * d
    return int(b * s * per_token)


def training_bytes(arch: Architecture, seq: int, batch: int) -> dict[str, int]:
    """AdamW training memory: fp32 (16 bytes/param) and bf16 mixed precision with an fp32 master copy (16)."""
    n = parameter_breakdown(arch)["total"]
    fp32 = {"weights": 4 * n, "grads": 4 * n, "adam_moments": 8 * n, "master_weights": 0,
            "activations": activation_bytes(arch, seq, batch, 4)}
    mixed = {"weights": 2 * n, "grads": 2 * n, "adam_moments": 8 * n, "master_weights": 4 * n,
             "activations": activation_bytes(arch, seq, batch, 2)}
    out: dict[str, int] = {}
    for name, parts in (("fp32", fp32), ("mixed", mixed)):
        out.update({f"{name}_{k}": v for k, v in parts.items()})
        out[f"{name}_states"] = sum(v for k, v in parts.items() if k != "activations")
        out[f"{name}_total"] = sum(parts.values())
    return out


def flops_per_token(arch: Architecture, context: int) -> dict[str, float]:
    """FLOPs per token at `context` (see the module docstring for both conventions)."""
    ts = tensors(arch)
    matmul = sum(2 * t.count * t.active * math.prod(t.shape)
                 for t in ts if t.kind == "linear" and t.part != "embedding")
    lm_head = 2 * arch.hidden_size * arch.vocab_size
    d_attn = [arch.q_heads(i) * arch.head_dim for i in range(arch.num_layers)]  # per layer, after pruning
    attention_dense = 4 * context * sum(d_attn)
    attention_kaplan = 2 * sum((min(context, w) if w else context) * da for w, da in zip(arch.windows, d_attn))
    n = parameter_breakdown(arch)["active_non_embedding"]
    forward = matmul + lm_head + attention_dense
    kaplan = 2 * n + attention_kaplan
    return {"forward": forward, "train": 3 * forward, "forward_kaplan": kaplan, "train_kaplan": 3 * kaplan,
            "matmul": matmul, "lm_head": lm_head, "attention": attention_dense, "attention_kaplan": attention_kaplan}


def estimate(config: Any, context: int = 2048, batch: int = 1, raw: Mapping[str, Any] | None = None) -> SizeEstimate:
    """All figures for `config` (a config object, config.json dict or `Architecture`) at `context` × `batch`;
    `raw` as for `architecture`."""
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    arch = architecture(config, raw)
    params = parameter_breakdown(arch)
    return SizeEstimate(
        family=arch.family, context=context, batch=batch, params=params, weight_bytes=weight_bytes(arch),
        kv_cache=kv_cache_bytes(arch, context, batch), training_bytes=training_bytes(arch, context, batch),
        flops=flops_per_token(arch, context), chinchilla_tokens=CHINCHILLA_TOKENS_PER_PARAM * params["total"],
        arch=asdict(arch),
    )  # fmt: skip


def flatten(est: SizeEstimate) -> dict[str, float]:
    """`params_total`, `weight_bytes_int4`, `flops_forward`, ...: every figure under one flat name."""
    out: dict[str, float] = {}
    for group in ("params", "weight_bytes", "kv_cache", "training_bytes", "flops"):
        out.update({f"{group}_{k}": v for k, v in getattr(est, group).items()})
    out["chinchilla_tokens"] = est.chinchilla_tokens
    return out


def compare(model: SizeEstimate, baseline: SizeEstimate) -> dict[str, float | None]:
    """model / baseline for every figure (None where the baseline's is 0), e.g. a student against its teacher."""
    a, b = flatten(model), flatten(baseline)
    return {k: (a[k] / b[k] if b.get(k) else None) for k in a}


# ------------------------------------------------------------------------------------------ measured on a model
def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied or viewed tensor counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())
