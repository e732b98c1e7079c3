"""The distillation run's configs: its data (`DataConfig`, `SyntheticDataConfig`), its loss (`LossConfig`), its
optimisation (`TrainConfig`) and the whole run (`DistillConfig`: teacher, data, student, loss, training, memory).

`pocketlm.config` re-exports these for users; the student's own configs live beside the models (models/config.py).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, StrictInt, field_validator, model_validator

from pocketlm.core.config import ConfigError, StrictModel, registered
from pocketlm.core.units import parse_bytes
from pocketlm.distill.losses import DIVERGENCES
from pocketlm.models.config import StudentConfig
from pocketlm.models.routers import ROUTERS

SEED_MAX = 2**32 - 1  # numpy's seeds stop here (train.seed=1e23 failed after the data and the cache were written)


class SyntheticDataConfig(StrictModel):
    """The teacher writes the corpus (used when `data.source` is null)."""

    num_documents: int = Field(256, ge=2)
    max_new_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(32, ge=1)
    # the teacher samples through a bf16 copy of itself (≈1.5× faster on CPUs with bf16 units); the cache and
    # every score use the teacher in `teacher_dtype`
    dtype: Literal["float32", "bfloat16"] = "bfloat16"


class DataConfig(StrictModel):
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


class LossConfig(StrictModel):
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
        return registered(DIVERGENCES, v)

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


class TrainConfig(StrictModel):
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


class DistillConfig(StrictModel):
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
            # allow_noncausal_generation or not: token-by-token decoding is not the policy being trained, so its
            # samples would not be on-policy
            if moe is not None and not ROUTERS.get(moe.router).causal_safe:
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
