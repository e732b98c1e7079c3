"""The pipeline config: teacher + data → distill → evaluate → audit → inspect → export → report, one YAML.

The distillation part reuses `DistillConfig`'s sub-models unchanged (`data`, `student` (dense or MoE),
`distill`, `train`), so a pipeline distils exactly as `pocketlm distill` does. Every other section names its
data by path; a relative path is taken under `data_root`. Unknown keys are errors that name the key; gate rules
are parsed here, so a typo in a rule fails before any model work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from pocketlm.config import DistillConfig, _Strict, load_config

ROLES = ("teacher", "student", "ce_baseline")  # the models a pipeline measures
_RESERVED = set(ROLES) | {"distill", "parameters", "size", "attention", "deployment", "delta", "gates"}
_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # result names are gate identifiers


class PerplexitySet(_Strict):
    """Perplexity (lm-eval's rolling windows) of every model on one set of documents."""

    name: str = Field("heldout", pattern=_NAME)
    data: Optional[str] = None  # null: the documents held out of the distillation data
    field: str = "text"
    split: str = "test"
    txt_split: Literal["blank_lines", "wikitext_headings", "lines"] = "blank_lines"
    max_documents: Optional[int] = Field(None, ge=1)
    max_length: Optional[int] = Field(None, ge=1)  # null: the model's context
    stride: Optional[int] = Field(None, ge=1)
    detokenize: Optional[Literal["wikitext"]] = None


class RougeSet(_Strict):
    """ROUGE of generated summaries (task summarization) or of the student's continuations against the
    teacher's (task fidelity)."""

    name: str = Field(..., pattern=_NAME)
    data: str
    task: Literal["summarization", "fidelity"] = "summarization"
    document_field: str = "document"
    reference_field: str = "summary"
    prompt_field: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    chat: bool = False
    stem: bool = False
    template: Optional[str] = None


class EvalConfig(_Strict):
    perplexity: list[PerplexitySet] = [PerplexitySet()]
    rouge: list[RougeSet] = []
    batch_size: int = Field(8, ge=1)
    precision: Literal["fp32", "bf16", "auto"] = "fp32"


class BiasSuiteConfig(_Strict):
    """One log-likelihood bias suite (pocketlm.audit.bias), scored for teacher and student on the same items."""

    suite: Literal["crows_pairs", "stereoset", "bbq", "winobias"]
    data: str  # the suite's file or folder (a relative path is under data_root)
    name: Optional[str] = Field(None, pattern=_NAME)  # default: the suite's name
    limit: Optional[int] = Field(None, ge=1)  # a seeded random subset of this many items
    batch_size: int = Field(16, ge=1)
    # auto: bf16, then fp32 again for the items whose decision lies within the bf16 error bound (where bf16 is
    # native; else fp32): every decision fp32's (pocketlm.audit.bias)
    precision: Literal["fp32", "bf16", "auto"] = "auto"

    @property
    def entry(self) -> str:
        return self.name or self.suite


class ToxicitySuiteConfig(_Strict):
    """Prompted toxicity (RealToxicityPrompts' figures) per group, teacher and student continuing the same
    prompts with the same per-item seeds."""

    suite: Literal["toxigen", "rtp", "bold", "file"]
    data: str
    name: Optional[str] = Field(None, pattern=_NAME)
    limit: Optional[int] = Field(None, ge=1)  # a seeded subset stratified by (domain, group)
    samples: int = Field(25, ge=1)  # continuations per prompt (RTP: 25)
    max_new_tokens: int = Field(20, ge=1)
    top_p: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1)
    scorer: str = "profanity"  # profanity | hf:FOLDER
    toxic_label: Optional[str] = None
    sentiment: Optional[bool] = None  # VADER sentiment; null: on for bold

    @property
    def entry(self) -> str:
        return self.name or self.suite


class AuditConfig(_Strict):
    bias: list[BiasSuiteConfig] = []
    toxicity: list[ToxicitySuiteConfig] = []
    n_resamples: int = Field(1000, ge=100)


class SizeProbe(_Strict):
    enabled: bool = False
    context_length: int = Field(2048, ge=1)  # KV-cache and FLOP figures are reported at this context
    batch_size: int = Field(1, ge=1)
    measure_context: Optional[int] = Field(None, ge=1)  # also measure the loaded models at this context


class AttentionProbe(_Strict):
    enabled: bool = False
    text: str = "The teacher writes and the student reads, then the student writes too."
    layers: Optional[list[int]] = None  # null: first and last; negative indices count from the end
    max_heads: int = Field(4, ge=1)  # heat-maps per layer


class InspectConfig(_Strict):
    size: SizeProbe = SizeProbe()
    attention: AttentionProbe = AttentionProbe()


class ExportConfig(_Strict):
    """The `export` stage (off by default): the student, and the teacher with `teacher: true`, written as GGUF files
    in `<output_dir>/deploy` at each quant type and timed in llama.cpp, batch 1 (`pocketlm.eval.speed`: prompt and
    decode tokens/s, time to first token, peak memory; the median of `repeats` passes after `warmup`)."""

    enabled: bool = False
    quants: list[str] = ["f16", "q8_0", "q4_0"]  # `pocketlm export --format gguf --quant` names
    teacher: bool = False  # also export and time the teacher: the student's speed-up and size ratio to it
    threads: int = Field(2, ge=1)
    new_tokens: int = Field(32, ge=2)  # greedy tokens decoded per prompt
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    max_prompt_tokens: int = Field(128, ge=1)

    @field_validator("quants")
    @classmethod
    def _writable(cls, v: list[str]) -> list[str]:
        from pocketlm.models.gguf_export import K_QUANTS, QUANT_NAMES

        names = [q.lower() for q in v]
        if not names:
            raise ValueError("name at least one quant type, or set export.enabled: false")
        for q in names:
            if q in K_QUANTS:
                raise ValueError(f"{q!r}: the gguf package cannot write K-quants; export f16 and quantise that "
                                 "file with llama.cpp's llama-quantize")
            if q not in QUANT_NAMES:
                raise ValueError(f"unknown quant type {q!r}; valid: {', '.join(QUANT_NAMES)}")
        twice = sorted({q for q in names if names.count(q) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named more than once")
        return names


class Gate(_Strict):
    rule: str
    name: Optional[str] = None  # default: the rule itself

    @field_validator("rule")
    @classmethod
    def _parses(cls, v: str) -> str:
        from pocketlm.report.gates import parse

        parse(v)  # GateSyntaxError (a ValueError): pydantic reports it under gates.<i>.rule
        return v


class CardConfig(_Strict):
    """What only the user can say; the card states plainly what is missing."""

    model_name: Optional[str] = None
    license: Optional[str] = None  # an SPDX id or a Hugging Face license name, e.g. apache-2.0
    language: list[str] = []
    tags: list[str] = []
    datasets: list[str] = []  # hub ids of the training data, if any
    intended_use: Optional[str] = None
    out_of_scope_use: Optional[str] = None
    ethical_considerations: Optional[str] = None
    caveats: Optional[str] = None
    authors: Optional[str] = None


class PipelineConfig(DistillConfig):
    """`DistillConfig`'s fields (teacher, data, student, distill, train) and the rest of the pipeline."""

    ce_baseline: bool = False  # also train a cross-entropy-only twin on the same blocks: did distilling help?
    data_root: str = "."  # relative eval/audit data paths are under this folder
    missing_data: Literal["error", "skip"] = "error"  # skip: a suite whose data is absent is left out, with why
    eval: EvalConfig = EvalConfig()
    audit: AuditConfig = AuditConfig()
    inspect: InspectConfig = InspectConfig()
    export: ExportConfig = ExportConfig()
    gates: list[Gate] = []
    card: CardConfig = CardConfig()
    output_dir: str = "outputs/pipeline"

    @field_validator("gates", mode="before")
    @classmethod
    def _bare_rules(cls, v):
        return [{"rule": g} if isinstance(g, str) else g for g in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        entries = self.entries()
        seen: set[str] = set()
        for entry in entries:
            if entry in _RESERVED:
                raise ValueError(f"the result name {entry!r} is reserved; give that set or suite another name")
            if entry in seen:
                raise ValueError(f"two sets or suites are named {entry!r}; give one a `name`")
            seen.add(entry)
        if self.distill.mode == "ce" and self.ce_baseline:
            raise ValueError("ce_baseline: the student itself is trained with cross-entropy only (distill.mode ce)")
        scopes = set(entries) | set(self.roles()) | {"distill", "parameters", "size", "attention"}
        if self.export.enabled:
            scopes.add("deployment")
            self._check_exportable()
        from pocketlm.report.gates import parse, refs

        for i, gate in enumerate(self.gates):
            for ref in refs(parse(gate.rule)):
                head = ref.name.split(".")[0]
                if head not in scopes:
                    raise ValueError(
                        f"gates.{i}: {ref} names {head!r}, which this pipeline does not measure; "
                        f"names start with one of: {', '.join(sorted(scopes))}")
        return self

    def _check_exportable(self) -> None:
        """export.enabled writes the student as llama.cpp's Llama (dense) or Mixtral (MoE): a student neither holds
        is refused here, before any training (the same rules as `pocketlm.models.hf_export`)."""
        s, why = self.student, []
        if s.position_scheme != "rotary":
            why.append(f"student.position_scheme is {s.position_scheme!r} (llama.cpp's Llama rotates q/k)")
        if s.sliding_window is not None:
            why.append("student.sliding_window is set (llama.cpp's Llama attends the whole context)")
        if s.moe is not None:
            if s.moe.router != "topk_softmax":
                why.append(f"student.moe.router is {s.moe.router!r} (Mixtral routes with topk_softmax)")
            if s.moe.num_shared_experts:
                why.append("student.moe.num_shared_experts is not 0 (Mixtral has no shared experts)")
            if s.moe.layers is not None:
                why.append("student.moe.layers is set (Mixtral has an MoE MLP in every layer)")
        if why:
            raise ValueError("export.enabled: this student cannot be written as GGUF: " + "; ".join(why)
                             + "; set export.enabled: false")

    def roles(self) -> list[str]:
        return ["teacher", "student"] + (["ce_baseline"] if self.ce_baseline else [])

    def entries(self) -> list[str]:
        """Names of the measured sets and suites (the middle part of result names)."""
        return ([p.name for p in self.eval.perplexity] + [r.name for r in self.eval.rouge]
                + [b.entry for b in self.audit.bias] + [t.entry for t in self.audit.toxicity])

    def data_path(self, path: Optional[str]) -> Optional[Path]:
        """A config data path: as given when absolute (or ~), else under `data_root`."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.data_root).expanduser() / p

    def distill_config(self, output_dir: str | Path, *, ce_only: bool = False) -> DistillConfig:
        """The `DistillConfig` this pipeline distils with (the CE twin: the same with distill.mode ce)."""
        fields = {k: getattr(self, k) for k in DistillConfig.model_fields if k != "output_dir"}
        if ce_only:
            fields["distill"] = self.distill.model_copy(update={"mode": "ce"})
        return DistillConfig(**fields, output_dir=str(output_dir))


def load_pipeline_config(path: Union[str, Path, None] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)
