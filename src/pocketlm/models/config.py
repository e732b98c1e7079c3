"""The student's component configs: its shape and initialisation (`StudentConfig`), its sparse MLPs (`MoEConfig`,
models/moe.py) and how `init: pruned` cuts it (`PruningConfig`, models/pruning.py).

Names chosen from a registry (routers, position schemes) are checked against it here, so an unknown one is an error
that lists the valid names before any model is built. `pocketlm.config` re-exports these for users.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from pocketlm.core.config import StrictModel, registered
from pocketlm.models.attention import POSITION_SCHEMES
from pocketlm.models.routers import ROUTERS


class PruneTargetError(ValueError):
    """A pruning target the source model cannot be cut to; the message names the field."""


def parse_fraction(value: Any, what: str = "target_params") -> float:
    """0.5, "0.5" or "50%" → 0.5; anything outside (0, 1] is a PruneTargetError naming `what`."""
    text = str(value).strip()
    try:
        f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise PruneTargetError(f"{what}: expected a fraction such as 0.5 or 50%, got {value!r}") from None
    if isinstance(value, bool) or not (0 < f <= 1) or not math.isfinite(f):
        raise PruneTargetError(f"{what}: must be in (0, 100%], got {value!r}")
    return f


class MoEConfig(StrictModel):
    """A sparse Mixture-of-Experts MLP (models/moe.py), for every student layer or those listed in `layers`.

    `top_k` is the number of experts per token (on average, for expert_choice, whose capacity is top_k·s/E);
    switch and hash route each token to one expert. The coefficients weigh the auxiliary losses the router returns.
    """

    router: str = "topk_softmax"  # topk_softmax | switch | expert_choice | hash | aux_free (models/routers.py)
    num_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    expert_size: Optional[int] = Field(None, ge=1)  # each expert's intermediate size; null: the dense one
    num_shared_experts: int = Field(0, ge=0)  # always-on experts of expert_size each (DeepSeekMoE)
    layers: Optional[list[int]] = None  # student layer indices that get an MoE MLP; null: all
    capacity_factor: float = Field(1.25, gt=0)  # switch: an expert takes at most ceil(cf·tokens/E) in training
    balance_coef: float = Field(0.01, ge=0)  # α of the Switch load-balancing loss α·E·Σ f_i·P_i
    z_loss_coef: float = Field(0.0, ge=0)  # ST-MoE router z-loss weight (the paper uses 1e-3)
    bias_update_rate: float = Field(1e-3, ge=0)  # aux_free: γ of the per-step bias nudge
    allow_noncausal_generation: bool = False  # expert_choice looks across the sequence: generate() refuses it
    upcycle_noise: float = Field(0.0, ge=0)  # upcycling: noise std relative to each weight's std

    @field_validator("router")
    @classmethod
    def _known_router(cls, v: str) -> str:
        return registered(ROUTERS, v)

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        if self.router in ("switch", "hash") and self.top_k != 1:
            raise ValueError(f"top_k: the {self.router} router sends each token to one expert; set top_k: 1")
        if self.layers is not None and (
            not self.layers or any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers)
        ):
            raise ValueError("layers: must be a non-empty list of distinct non-negative student layer indices")
        return self


class PruningConfig(StrictModel):
    """How `init: pruned` measures importance and meets `target_params` (models/importance.py, models/pruning.py)."""

    axis: Literal["width", "depth"] = "width"  # the rule that meets target_params (models/pruning.py)
    depth_metric: Literal["block_influence", "perplexity"] = "block_influence"  # how layers are ranked
    calibration_blocks: int = Field(256, ge=1)  # training blocks (a seeded sample) the importance pass reads
    removal_blocks: int = Field(16, ge=0)  # blocks for the per-layer removal perplexity (0: not measured)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "PruningConfig":
        if self.depth_metric == "perplexity" and self.removal_blocks == 0:
            raise ValueError("depth_metric: perplexity ranks layers by their removal perplexity, which "
                             "removal_blocks: 0 does not measure")
        return self


class StudentConfig(StrictModel):
    """`teacher_layers`: the teacher's layers (evenly spaced, or `layers`); `random`: a fresh model of the given
    widths; `pruned`: the teacher cut by calibration importance to `target_params` (a fraction of its
    non-embedding parameters) or to the given `num_layers`, `intermediate_size`, `num_key_value_heads`,
    `hidden_size` (models/pruning.py)."""

    init: Literal["teacher_layers", "random", "pruned"] = "teacher_layers"
    num_layers: Optional[int] = Field(None, ge=1)  # evenly spaced teacher layers (or depth of a random student)
    layers: Optional[list[int]] = None  # explicit teacher layer indices, in order
    hidden_size: Optional[int] = Field(None, ge=8)  # width overrides: random init (or pruned targets)
    intermediate_size: Optional[int] = Field(None, ge=8)
    num_attention_heads: Optional[int] = Field(None, ge=1)
    num_key_value_heads: Optional[int] = Field(None, ge=1)
    tie_word_embeddings: Optional[bool] = None
    target_params: Optional[Union[float, str]] = None  # pruned: e.g. 50% or 0.5 of the teacher's non-embedding params
    pruning: PruningConfig = PruningConfig()
    position_scheme: str = "rotary"  # models.attention.POSITION_SCHEMES: rotary, alibi, none
    sliding_window: Optional[int] = Field(None, ge=1)  # attend to at most this many most recent tokens
    # sparse MoE MLPs; with init teacher_layers or pruned they are upcycled from the dense student's
    # (Komatsuzaki et al., 2022)
    moe: Optional[MoEConfig] = None

    @model_validator(mode="after")
    def _check(self) -> "StudentConfig":
        if self.layers is not None:
            if self.init == "pruned":
                raise ValueError("layers: a pruned student's layers are chosen by importance; give num_layers, or "
                                 "use init: teacher_layers to choose them yourself")
            if not self.layers:
                raise ValueError("layers: must not be empty")
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ValueError("layers: must be distinct non-negative teacher layer indices")
            if self.num_layers is not None and self.num_layers != len(self.layers):
                raise ValueError("num_layers and layers disagree; give one of them")
        widths = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "tie_word_embeddings")
        if self.init == "teacher_layers" and any(getattr(self, w) is not None for w in widths):
            bad = [w for w in widths if getattr(self, w) is not None]
            raise ValueError(f"{', '.join(bad)}: width overrides need init: random or pruned (teacher layers keep "
                             "their shapes)")
        if self.init == "pruned":
            fixed = [w for w in ("num_attention_heads", "tie_word_embeddings") if getattr(self, w) is not None]
            if fixed:
                raise ValueError(f"{', '.join(fixed)}: a pruned student keeps the teacher's (its query heads follow "
                                 "num_key_value_heads)")
            targets = [w for w in ("num_layers", "hidden_size", "intermediate_size", "num_key_value_heads")
                       if getattr(self, w) is not None]
            if self.target_params is not None and targets:
                raise ValueError(f"target_params and {', '.join(targets)}: give a fraction or widths, not both")
            if self.target_params is None and not targets:
                raise ValueError("init: pruned needs a target: target_params (e.g. 50%) or num_layers, hidden_size, "
                                 "intermediate_size, num_key_value_heads")
            if self.sliding_window is not None:
                raise ValueError("sliding_window: a pruned student attends as its teacher does")
        if self.target_params is not None:
            if self.init != "pruned":
                raise ValueError("target_params: needs init: pruned")
            parse_fraction(self.target_params)  # a ValueError naming target_params
        if self.position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"position_scheme: unknown {self.position_scheme!r}; valid: {', '.join(POSITION_SCHEMES)}")
        if self.init in ("teacher_layers", "pruned") and self.position_scheme != "rotary":
            raise ValueError("position_scheme: teacher layers were trained with rotary positions; "
                             "another scheme needs init: random")
        if self.moe is not None and self.moe.layers is not None:
            depth = len(self.layers) if self.layers is not None else self.num_layers
            if depth is not None and max(self.moe.layers) >= depth:
                raise ValueError(f"moe.layers {self.moe.layers}: the student has {depth} layers")
        return self
