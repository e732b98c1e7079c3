"""The pocketlm student: a decoder-only transformer that is a Llama by construction.

RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP, with Llama's parameter names
(`model.layers.{i}.self_attn.q_proj`, ...), so exporting to `LlamaForCausalLM` and initialising from a Llama-family
teacher are key-for-key copies. It is a transformers `PreTrainedModel` + `GenerationMixin`: `save_pretrained`,
`AutoModelForCausalLM.from_pretrained` (after `import pocketlm`) and `generate()` (KV cache, left padding) work.

Composition: a `DecoderBlock` is given its attention and its MLP; `build_mlp(config, layer_idx)` is the one place
that decides which MLP a layer gets: dense SwiGLU, or a sparse Mixture-of-Experts MLP (models/moe.py) where
`config.moe` asks for one. An MLP returns either a tensor or `(tensor, aux)` where `aux` is a dict of auxiliary
losses/statistics; the model returns those per layer in `aux`. An MLP that declares `wants_token_ids` (hash routing)
is also given the input token ids.

Shape legend:
    b     batch size
    s     tokens in this forward call
    s_kv  cached tokens + s
    d     hidden size
    f     MLP intermediate size
    v     vocabulary size
    n_h   query heads, n_kv key/value heads, h_d head dimension
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pocketlm.models.attention import (
    POSITION_SCHEMES,
    RMSNorm,
    attention_from_config,
    build_attention_mask,
    build_position_scheme,
)
from pocketlm.models.config import MoEConfig
from pocketlm.models.mlp import SwiGLUMLP
from pocketlm.models.moe import Experts, build_moe, moe_layer_ids

IGNORE_INDEX = -100


class PocketLMConfig(PreTrainedConfig):
    """Student architecture. Field names are `LlamaConfig`'s; defaults are SmolLM2-135M's shape at 8 layers.

    `head_dim` defaults to hidden_size // num_attention_heads and `num_key_value_heads` to num_attention_heads.
    `position_scheme` names a `POSITION_SCHEMES` entry (rotary, alibi, none); `sliding_window` (tokens, None: the
    whole context) limits how far back a query attends; `kept_kv_heads` (None: all) lists, per layer, the original
    KV heads a head-pruned student keeps, each with its group of query heads (models/attention.py).
    Inconsistent values are a `ValueError` that names the field.
    """

    model_type = "pocketlm"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 9
    num_key_value_heads: int | None = 3
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    moe: dict | None = None  # a `pocketlm.models.config.MoEConfig` as a dict (all fields); None: every MLP is dense
    position_scheme: str = "rotary"
    sliding_window: int | None = None
    kept_kv_heads: list[list[int]] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.moe is not None:
            self.moe = _validated_moe(self.moe)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._check()
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PocketLMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:  # LlamaConfig requires it too; keeps the student exportable
            raise ValueError(
                f"PocketLMConfig.num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"PocketLMConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.position_scheme not in POSITION_SCHEMES:
            raise ValueError(
                f"PocketLMConfig.position_scheme {self.position_scheme!r} is unknown; valid: "
                f"{', '.join(POSITION_SCHEMES.names())}"
            )
        if self.position_scheme == "rotary" and self.head_dim % 2:
            raise ValueError(f"PocketLMConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"PocketLMConfig.sliding_window must be a positive integer or None, got {window!r}")
        self._check_kept_kv_heads()
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"PocketLMConfig.{name} must be a positive number, got {value!r}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"PocketLMConfig.{name} ({value}) is outside the vocabulary [0, {self.vocab_size})")
        moe_layers = (self.moe or {}).get("layers") or []
        if any(i >= self.num_hidden_layers for i in moe_layers):
            raise ValueError(f"PocketLMConfig.moe.layers {moe_layers}: the model has {self.num_hidden_layers} layers")


    def _check_kept_kv_heads(self) -> None:
        kept = self.kept_kv_heads
        if kept is None:
            return
        if not isinstance(kept, list) or len(kept) != self.num_hidden_layers:
            raise ValueError(
                f"PocketLMConfig.kept_kv_heads must list the kept KV heads of each of the {self.num_hidden_layers} "
                f"layers, got {kept!r}"
            )
        for i, heads in enumerate(kept):
            ok = isinstance(heads, list) and heads and all(isinstance(h, int) for h in heads)
            if not ok or heads != sorted(set(heads)) or not 0 <= heads[0] <= heads[-1] < self.num_key_value_heads:
                raise ValueError(
                    f"PocketLMConfig.kept_kv_heads[{i}] must be a non-empty increasing list of KV head indices in "
                    f"[0, {self.num_key_value_heads}), got {heads!r}"
                )


def _validated_moe(moe: Any) -> dict:
    """`moe` (a MoEConfig or a dict of one) checked and completed with defaults; errors name the field."""
    if isinstance(moe, MoEConfig):
        return moe.model_dump()
    try:
        return MoEConfig.model_validate(moe).model_dump()
    except ValidationError as e:
        problems = "; ".join(
            f"PocketLMConfig.moe.{'.'.join(map(str, err['loc']))}: {err['msg']}" if err["loc"]
            else f"PocketLMConfig.moe: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(problems) from None


def build_mlp(config: PocketLMConfig, layer_idx: int) -> nn.Module:
    """The MLP of layer `layer_idx`. The one switch point for dense vs Mixture-of-Experts layers."""
    if layer_idx in moe_layer_ids(config):
        return build_moe(config, layer_idx)
    return SwiGLUMLP(config.hidden_size, config.intermediate_size)


def build_attention(config: PocketLMConfig, layer_idx: int) -> nn.Module:
    """The self-attention of layer `layer_idx`."""
    return attention_from_config(config, layer_idx)


class BlockOutput(NamedTuple):
    hidden_states: torch.Tensor  # [b, s, d]
    attentions: torch.Tensor | None  # [b, n_h, s, s_kv] when captured
    aux: dict[str, torch.Tensor] | None  # the MLP's auxiliary outputs (MoE losses, router statistics)


class DecoderBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Attention and MLP are given, not chosen."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        explicit: bool = False,
        token_ids: torch.Tensor | None = None,
    ) -> BlockOutput:
        attn_out, probs = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask, cache, explicit)
        hidden_states = hidden_states + attn_out
        mlp_in = self.post_attention_layernorm(hidden_states)
        if getattr(self.mlp, "wants_token_ids", False):
            mlp_out = self.mlp(mlp_in, token_ids=token_ids)
        else:
            mlp_out = self.mlp(mlp_in)
        aux = None
        if isinstance(mlp_out, tuple):
            mlp_out, aux = mlp_out
        return BlockOutput(hidden_states + mlp_out, probs, aux)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy in fp32: logits[:, t] predicts labels[:, t + 1]; labels of -100 are excluded.

    The sum is divided by the number of counted targets (or by `num_items_in_batch`, for gradient accumulation
    across micro-batches); when no target is counted the loss is 0, not NaN.
    """
    targets = labels[:, 1:].to(logits.device)  # [b, s-1]
    total = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),  # [b·(s-1), v]
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.clamp(torch.as_tensor(count, device=total.device), min=1).to(total.dtype)


# the KV-cache field of transformers' outputs: `cache` since 5.2x, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class PocketLMModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `aux`: per-layer auxiliary MLP outputs (None when no layer returns any)."""

    aux: tuple[dict[str, torch.Tensor] | None, ...] | None = None


@dataclass
class PocketLMCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `aux`: per-layer auxiliary MLP outputs (None when no layer returns any)."""

    aux: tuple[dict[str, torch.Tensor] | None, ...] | None = None


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """transformers 5 calls the KV cache `cache`; `past_key_values` is accepted as its older name."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class PocketLMPreTrainedModel(PreTrainedModel):
    config_class = PocketLMConfig
    config: PocketLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) for linear and embedding weights (padding row zeroed), ones for norms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)

    def check_causal_decoding(self) -> None:
        """Refuse to decode with a layer whose routing looks across the sequence (expert choice), unless the
        config's moe.allow_noncausal_generation says the user accepts it."""
        base = getattr(self, "model", self)
        layers = [i for i, layer in enumerate(base.layers) if not getattr(layer.mlp, "causal_safe", True)]
        if layers and not (self.config.moe or {}).get("allow_noncausal_generation", False):
            raise ValueError(
                f"layers {layers} route with {self.config.moe['router']!r}, which looks at the whole sequence (later "
                "tokens included), so decoding one token at a time computes something the model was not trained "
                "on; set moe.allow_noncausal_generation: true in the student's config to generate anyway"
            )


class PocketLMModel(PocketLMPreTrainedModel):
    """Embeddings → decoder blocks → final norm. Returns hidden states, the KV cache, and what was asked for."""

    def __init__(self, config: PocketLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DecoderBlock(build_attention(config, i), build_mlp(config, i), config.hidden_size, config.rms_norm_eps)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.position_scheme = build_position_scheme(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> PocketLMModelOutput:
        """`attention_mask` is 2D [b, s_kv] (1 = token, 0 = padding) and covers cached positions too.

        Positions default to Llama's convention (cached length + 0, 1, ...); `generate()` passes padding-aware
        `position_ids`, so a left-padded row sees the same positions as the prompt alone. `cache_position`
        (absolute index of each new token) is accepted in place of reading the cache's length.
        """
        cache = _one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is not None:  # decoding with a KV cache
            self.check_causal_decoding()
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache, cache = False, None  # recomputing a block would append to the cache twice

        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [b, s, d]
        b, s, _ = hidden.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache_position is not None:
            past_len = int(cache_position[0])
        else:
            past_len = int(cache.get_seq_length()) if cache is not None else 0
        if position_ids is None:
            if cache_position is not None:
                position_ids = cache_position.unsqueeze(0)
            else:
                position_ids = torch.arange(past_len, past_len + s, device=hidden.device).unsqueeze(0)  # [1, s]
        position_ids = position_ids.expand(b, -1)  # [b, s]

        bias = self.position_scheme.bias(s, past_len, hidden.dtype, hidden.device)  # [1, n_h, s, s_kv] or None
        mask = build_attention_mask(
            attention_mask, s, past_len, hidden.dtype, hidden.device, window=self.config.sliding_window, bias=bias
        )
        cos, sin = self.position_scheme.tables(position_ids, hidden.dtype)  # [b, s, h_d] each, or None
        explicit = bool(output_attentions) or self.config._attn_implementation == "eager"

        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        all_aux: list[dict[str, torch.Tensor] | None] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            out = layer(hidden, cos, sin, mask=mask, cache=cache, explicit=explicit, token_ids=input_ids)
            hidden = out.hidden_states
            if output_attentions:
                all_attn.append(out.attentions)
            all_aux.append(out.aux)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)  # the last entry is after the final norm, as in transformers' models

        return PocketLMModelOutput(
            last_hidden_state=hidden,
            **{_CACHE_FIELD: cache},
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            aux=tuple(all_aux) if any(a is not None for a in all_aux) else None,
        )


class PocketLMForCausalLM(PocketLMPreTrainedModel, GenerationMixin):
    """`PocketLMModel` + a linear head over the vocabulary (tied to the embeddings when tie_word_embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PocketLMConfig) -> None:
        super().__init__(config)
        self.model = PocketLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> PocketLMCausalLMOutput:
        """Logits [b, s, v] (only the last `logits_to_keep` positions when it is > 0, as `generate()` asks), and
        with `labels` the shifted next-token loss (`causal_lm_loss`)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        hidden = outputs.last_hidden_state  # [b, s, d]
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden = hidden[:, -logits_to_keep:]
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)  # [b, s, v]

        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position; do not combine them with logits_to_keep")
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return PocketLMCausalLMOutput(
            loss=loss,
            logits=logits,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux=outputs.aux,
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`GenerationMixin.generate`, refused for a student with non-causal routing (see `check_causal_decoding`)."""
        self.check_causal_decoding()
        return super().generate(*args, **kwargs)

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """With a pre-allocated cache (StaticCache) `generate()` asks the model for its 4D masks; this model builds
        them itself in `forward` from the 2D padding mask, so the 2D mask is passed through unchanged."""
        return attention_mask


def register_auto_classes() -> None:
    """Make `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` load model_type "pocketlm". Safe to call again."""
    AutoConfig.register(PocketLMConfig.model_type, PocketLMConfig, exist_ok=True)
    AutoModel.register(PocketLMConfig, PocketLMModel, exist_ok=True)
    AutoModelForCausalLM.register(PocketLMConfig, PocketLMForCausalLM, exist_ok=True)
