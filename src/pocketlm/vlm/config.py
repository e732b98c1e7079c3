"""The VLM config: one pydantic model per component, YAML mirrors it exactly (`configs/vlm_shapes.yaml`).

Unknown keys are errors naming the key; values are checked where declared; load it with
``pocketlm.config.load_config(VLMConfig, path, overrides)`` so ``--set a.b=c`` is validated the same way.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from pocketlm.core.config import StrictModel, registered
from pocketlm.data.scenes import COLOURS, KINDS

Part = Literal["projector", "lm", "encoder"]
Task = Literal["caption", "vqa"]


class EncoderConfig(StrictModel):
    """``vit``: our own ViT, trained from scratch; ``hf``: any HF vision model folder (CLIP/SigLIP towers)."""

    kind: Literal["vit", "hf"] = "vit"
    path: Optional[str] = None  # hf: the model folder
    feature_layer: int = -1  # hf: hidden state to read (LLaVA: -2)
    image_size: int = Field(48, ge=16)  # vit
    patch_size: int = Field(8, ge=1)
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    pretrain_steps: int = Field(0, ge=0)  # vit on shapes: label patches first (vlm/pretrain_vit.py), then frozen
    pretrain_lr: float = Field(2e-3, gt=0)
    pretrain_batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "EncoderConfig":
        if self.kind == "hf" and not self.path:
            raise ValueError("encoder.path is required when encoder.kind is 'hf' (a vision model folder)")
        if self.kind == "vit" and self.path:
            raise ValueError("encoder.path is only for kind 'hf'; a 'vit' encoder is built from the fields here")
        if self.kind == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"encoder.patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.kind == "vit" and self.hidden_size % self.num_heads:
            raise ValueError(f"encoder.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


class ProjectorConfig(StrictModel):
    kind: str = "mlp"
    num_tokens: int = Field(16, ge=1)  # resampler
    depth: int = Field(2, ge=1)  # resampler
    num_heads: int = Field(4, ge=1)  # resampler
    hidden_mult: int = Field(1, ge=1)  # mlp
    pos_embed: Literal["none", "learned", "2d"] = "none"  # position embeddings of the patch grid (any kind)

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        from pocketlm.models.projectors import PROJECTORS

        return registered(PROJECTORS, v)


class LMConfig(StrictModel):
    """``path``: any causal LM (folder, .gguf, hub id, smollm2-135m-instruct) with its tokenizer. Without it, a new
    pocketlm student of the given shape over a word-level tokenizer built on the training text, first trained on
    that text alone for ``pretrain_steps`` (an LM has to know the language before LLaVA's stages)."""

    path: Optional[str] = None
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(384, ge=8)
    num_hidden_layers: int = Field(3, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    pretrain_steps: int = Field(0, ge=0)
    pretrain_lr: float = Field(3e-3, gt=0)
    pretrain_batch_size: int = Field(64, ge=1)
    pretrain_with_captions: bool = False  # stage 0 also sees each question after its image's caption (text lookup)

    @model_validator(mode="after")
    def _check(self) -> "LMConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"lm.num_attention_heads ({self.num_attention_heads}) must divide "
                             f"hidden_size ({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"lm.num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        return self


class ShapesConfig(StrictModel):
    n_train: int = Field(3000, ge=1)  # images; each has a caption and several questions
    n_val: int = Field(100, ge=1)
    n_test: int = Field(300, ge=1)
    seed: int = 0
    image_size: int = Field(48, ge=16)
    min_shapes: int = Field(1, ge=1, le=4)
    max_shapes: int = Field(3, ge=1, le=4)
    held_out: list[str] = []  # "colour kind" pairs no train/val/test scene shows (e.g. "red circle")
    n_compositional: int = Field(0, ge=0)  # images of the compositional split: scenes with a held-out pair

    @model_validator(mode="after")
    def _check(self) -> "ShapesConfig":
        if self.min_shapes > self.max_shapes:
            raise ValueError(f"data.shapes.min_shapes ({self.min_shapes}) exceeds max_shapes ({self.max_shapes})")
        for pair in self.held_out:
            words = pair.split()
            if len(words) != 2 or words[0] not in COLOURS or words[1] not in KINDS:
                raise ValueError(f"data.shapes.held_out: {pair!r} is not 'colour kind' (colours: "
                                 f"{', '.join(COLOURS)}; kinds: {', '.join(KINDS)})")
        if self.n_compositional and not self.held_out:
            raise ValueError("data.shapes.n_compositional needs data.shapes.held_out (the pairs it holds out)")
        return self

    def held_out_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(tuple(p.split()) for p in self.held_out)  # type: ignore[misc]


class FolderSource(StrictModel):
    images: str
    captions: str  # COCO-style .json or .jsonl


class DataConfig(StrictModel):
    kind: Literal["shapes", "folder"] = "shapes"
    shapes: ShapesConfig = ShapesConfig()
    train: Optional[FolderSource] = None  # folder
    val: Optional[FolderSource] = None
    test: Optional[FolderSource] = None

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.kind == "folder" and self.train is None:
            raise ValueError("data.train (images + captions) is required when data.kind is 'folder'")
        if self.kind == "shapes" and (self.train or self.val or self.test):
            raise ValueError("data.train/val/test are for kind 'folder'; shapes data is set under data.shapes")
        return self


class StageConfig(StrictModel):
    """One training stage; the defaults are LLaVA's stage 1: the projector alone, on captions."""

    steps: int = Field(200, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    warmup: float = Field(0.05, ge=0, lt=1)  # share of steps with a linear warm-up, then cosine to lr / 10
    weight_decay: float = Field(0.0, ge=0)
    loss_average: Literal["token", "example"] = "token"  # example: a one-word answer weighs as much as a caption
    sampling: Literal["natural", "balanced"] = "natural"  # balanced: captions and each question type equally often
    tasks: list[Task] = ["caption"]
    train: list[Part] = ["projector"]

    @field_validator("tasks", "train")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("must name at least one")
        return list(dict.fromkeys(v))


class Stage2Config(StageConfig):
    """LLaVA's stage 2 defaults: projector and LM, on captions and questions."""

    steps: int = Field(400, ge=0)
    tasks: list[Task] = ["caption", "vqa"]
    train: list[Part] = ["projector", "lm"]


class EvalConfig(StrictModel):
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(64, ge=1)
    limit: Optional[int] = Field(None, ge=1)  # items per task
    blind: bool = True  # also answer without the image (the LM alone)


class VLMConfig(StrictModel):
    output_dir: str = "runs/vlm"
    seed: int = 0
    threads: Optional[int] = Field(None, ge=1)
    device: str = "cpu"  # a torch device: cpu, cuda, cuda:1, ...
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: training forwards under autocast (weights stay fp32)
    encoder: EncoderConfig = EncoderConfig()
    projector: ProjectorConfig = ProjectorConfig()
    lm: LMConfig = LMConfig()
    data: DataConfig = DataConfig()
    stage1: StageConfig = StageConfig()
    stage2: Stage2Config = Stage2Config()
    eval: EvalConfig = EvalConfig()
    log_every: int = Field(25, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import torch

        try:
            torch.device(v)
        except RuntimeError as e:
            raise ValueError(f"not a torch device ({e})") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "VLMConfig":
        if self.encoder.pretrain_steps and (self.encoder.kind != "vit" or self.data.kind != "shapes"):
            raise ValueError("encoder.pretrain_steps needs encoder.kind 'vit' and data.kind 'shapes' (it learns "
                             "the scenes' per-patch labels)")
        if self.encoder.kind == "vit" and self.data.kind == "shapes" and \
                self.encoder.image_size != self.data.shapes.image_size:
            raise ValueError(f"encoder.image_size ({self.encoder.image_size}) differs from data.shapes.image_size "
                             f"({self.data.shapes.image_size}); render the scenes at the encoder's size")
        return self
