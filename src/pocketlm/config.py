"""Configs: one pydantic model per component; YAML mirrors them exactly.

Unknown keys are errors that name the key; values are checked where they are declared; `--set a.b=c` overrides
are applied to the YAML tree before validation, so they are checked the same way.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, StrictInt, field_validator, model_validator

from pocketlm.core.config import (  # noqa: F401 - re-exported: the component configs' API
    ConfigError,
    StrictModel,
    apply_overrides,
    format_validation_error,
    load_config,
    load_yaml_text,
    parse_override,
    registered,
)
from pocketlm.core.units import parse_bytes

_Strict = StrictModel
_registered = registered


SEED_MAX = 2**32 - 1  # numpy's seeds stop here (train.seed=1e23 failed after the data and the cache were written)


class SyntheticDataConfig(_Strict):
    """The teacher writes the corpus (used when `data.source` is null)."""

    num_documents: int = Field(256, ge=2)
    max_new_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(32, ge=1)
    # the teacher samples through a bf16 copy of itself (≈1.5× faster on CPUs with bf16 units); the cache and
    # every score use the teacher in `teacher_dtype`
    dtype: Literal["float32", "bfloat16"] = "bfloat16"


class DataConfig(_Strict):
    """Training text (data/text.py; books: data/books.py) and what of it is held out, budgeted and decontaminated."""

    source: Optional[str] = None  # .txt/.jsonl/.parquet file, folder of .txt, or HF dataset; null: teacher-written
    # auto: by the source's kind (a folder of .txt: one UTF-8 document per file); books: a folder of plain-text books,
    # one document per book named by its file (UTF-8 or Latin-1, CRLF, DOS EOF, Project Gutenberg matter cut)
    format: Literal["auto", "books"] = "auto"
    field: str = "text"
    split: str = "train"
    max_documents: Optional[int] = Field(None, ge=1)
    block_size: int = Field(256, ge=8)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    # documents (book file names) held out whole for evaluation instead of a random val_fraction; the training
    # documents are also decontaminated against them (as against `decontaminate`)
    heldout: Optional[list[str]] = None
    # keep the first ceil(max_train_tokens / block_size) training blocks of a seeded shuffle (seed: train.seed); a run
    # reads train.steps · grad_accum · batch_size blocks, so more is never read and fewer repeats blocks
    max_train_tokens: Optional[int] = Field(None, ge=1)
    # evaluation texts (paths): every training paragraph sharing a 10-word shingle with one is dropped
    decontaminate: Optional[list[str]] = None
    synthetic: SyntheticDataConfig = SyntheticDataConfig()

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.format == "books" and self.source is None:
            raise ValueError("format: books reads a folder of books; set source to that folder")
        if self.heldout is not None:
            if not self.heldout or len(set(self.heldout)) != len(self.heldout):
                raise ValueError("heldout: must be a non-empty list of distinct document (book file) names")
            if self.format != "books":
                raise ValueError("heldout: names documents by their file; it needs format: books")
            if "val_fraction" in self.model_fields_set and self.val_fraction > 0:
                raise ValueError("heldout and val_fraction both choose the held-out documents; give one of them")
        if self.decontaminate is not None and not self.decontaminate:
            raise ValueError("decontaminate: must list at least one evaluation text (or be null)")
        return self


class MoEConfig(_Strict):
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
        from pocketlm.models.routers import ROUTERS

        return _registered(ROUTERS, v)

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


class PruningConfig(_Strict):
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


class StudentConfig(_Strict):
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
            from pocketlm.models.pruning import parse_fraction

            parse_fraction(self.target_params)  # a ValueError naming target_params
        from pocketlm.models.attention import POSITION_SCHEMES

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


class LossConfig(_Strict):
    # ce: cross-entropy only (the baseline; no teacher); on_policy: GKD (distill/on_policy.py), the teacher online
    mode: Literal["cache", "online", "ce", "on_policy"] = "cache"
    loss: str = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0, le=1)
    top_k: int = Field(64, ge=1)  # teacher cache: top-k log-probs kept per position
    beta: float = Field(0.5, ge=0, le=1)  # jsd
    alpha: float = Field(0.1, ge=0, le=1)  # skew_kl / skew_reverse_kl
    # positions per loss chunk (recomputed in backward): caps the loss's [positions, vocab] fp32 working set
    chunk_size: Optional[int] = Field(None, ge=1)
    # on_policy (GKD): a block's first prompt_tokens tokens are its prompt, the next max_new_tokens its continuation;
    # with probability lmbda a micro-batch's continuations are sampled by the student, else the data's are used
    lmbda: float = Field(0.5, ge=0, le=1)
    prompt_tokens: Optional[int] = Field(None, ge=1)  # null: block_size // 2
    max_new_tokens: Optional[int] = Field(None, ge=1)  # null: the rest of the block
    gen_temperature: float = Field(1.0, gt=0)  # the student samples from softmax(logits / gen_temperature)
    gen_top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling mass (1: none, as TRL's GKDTrainer)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from pocketlm.distill.losses import DIVERGENCES

        return _registered(DIVERGENCES, v)

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        if self.mode == "on_policy" and self.ce_weight > 0:
            raise ValueError("ce_weight: on_policy has no CE term (GKD has none, and the targets of an on-policy batch "
                             "are the student's own samples); set ce_weight: 0")
        return self

    def on_policy_lengths(self, block_size: int) -> tuple[int, int]:
        """(prompt tokens, continuation tokens) of a `block_size`-token block in mode on_policy: prompt_tokens or
        block_size // 2, then max_new_tokens or the rest of the block; a ValueError naming both when they do not fit."""
        p = self.prompt_tokens if self.prompt_tokens is not None else block_size // 2
        n = self.max_new_tokens if self.max_new_tokens is not None else block_size - p
        if n < 1 or p + n > block_size:
            raise ValueError(f"distill.prompt_tokens ({p}) + distill.max_new_tokens ({n}) must fit in one block of "
                             f"data.block_size = {block_size} tokens, with at least one new token")
        return p, n

    def loss_params(self) -> dict[str, float]:
        return {"jsd": {"beta": self.beta}, "skew_kl": {"alpha": self.alpha},
                "skew_reverse_kl": {"alpha": self.alpha}}.get(self.loss, {})


class TrainConfig(_Strict):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0, le=1)  # AdamW steps above 1 only diverge (lr=1e300 trained to NaN)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decays, each in [0, 1)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast mixed precision, fp32 master weights
    eval_batch_size: int = Field(8, ge=1)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each of AdamW's betas must be in [0, 1), got {list(v)}")
        return v


class DistillConfig(_Strict):
    teacher: str = "smollm2-135m-instruct"
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    data: DataConfig = DataConfig()
    student: StudentConfig = StudentConfig()
    distill: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    output_dir: str = "runs/distill"
    # e.g. 2GiB: the teacher cache (and, in a pipeline, every scoring and generation) picks batch sizes whose
    # estimated peak (weights + one batch) fits, or stops before any work when one row does not (pocketlm.memory)
    max_memory: Optional[Union[StrictInt, str]] = None  # bytes, or a size such as 2GiB / 512MB

    @field_validator("max_memory")
    @classmethod
    def _memory_size(cls, v: Optional[Union[int, str]]) -> Optional[Union[int, str]]:
        if v is not None:
            parse_bytes(v)  # a ValueError naming the value; pydantic reports it under max_memory
        return v

    @model_validator(mode="after")
    def _on_policy_fits(self) -> "DistillConfig":
        """on_policy: the prompt and the continuation fit in a block, and the student can decode token by token."""
        if self.distill.mode == "on_policy":
            self.distill.on_policy_lengths(self.data.block_size)
            moe = self.student.moe
            if moe is not None:
                from pocketlm.models.routers import ROUTERS

                if not ROUTERS.get(moe.router).causal_safe:  # allow_noncausal_generation or not: token-by-token
                    # decoding is not the policy being trained, so its samples would not be on-policy
                    raise ValueError(f"distill.mode: on_policy samples from the student token by token, and "
                                     f"student.moe.router {moe.router!r} routes over the whole sequence, later tokens "
                                     f"included (decoding is not the model trained); choose a causal router or "
                                     f"another mode")
        return self

    def check_teacher(self, teacher_layers: int, vocab_size: int) -> None:
        """The fields bounded by the teacher, checked as soon as its config is known, before any data block,
        corpus or cache is written: the layers a student keeps, and the cache's top-k (at most the vocabulary)."""
        s, bad = self.student, []
        if s.layers is not None and max(s.layers) >= teacher_layers:
            bad.append(f"student.layers: the teacher has {teacher_layers} layers (0-{teacher_layers - 1}); "
                       f"{max(s.layers)} is not one of them")
        if s.init in ("teacher_layers", "pruned") and s.num_layers is not None and s.num_layers > teacher_layers:
            bad.append(f"student.num_layers: {s.num_layers} teacher layers asked for, the teacher has {teacher_layers}")
        if self.distill.mode != "ce" and self.distill.top_k > vocab_size:
            bad.append(f"distill.top_k: {self.distill.top_k} is more than the teacher's vocabulary ({vocab_size})")
        if bad:
            raise ConfigError(f"invalid config for the teacher {self.teacher}:\n  " + "\n  ".join(bad))

    def max_memory_bytes(self) -> Optional[int]:
        return None if self.max_memory is None else parse_bytes(self.max_memory)
