"""The pipeline config: teacher + data → distill → evaluate → audit → inspect → export → report, one YAML.

The distillation part reuses `DistillConfig`'s sub-models unchanged (`data`, `student` (dense or MoE),
`distill`, `train`), so a pipeline distils exactly as `pocketlm distill` does. Every other section names its
data by path; a relative path is taken under `data_root`; each task's section model lives with the task
(`pocketlm.tasks.<task>`) and is grouped here as the YAML groups it. Unknown keys are errors that name the key; gate rules
are parsed here, so a typo in a rule fails before any model work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from pocketlm.config import DistillConfig, load_config
from pocketlm.core.config import StrictModel
from pocketlm.tasks import TASKS
from pocketlm.tasks.attention import AttentionProbe
from pocketlm.tasks.bias import BiasSuiteConfig
from pocketlm.tasks.export import ExportConfig
from pocketlm.tasks.perplexity import PerplexitySet
from pocketlm.tasks.probes import ProbesConfig
from pocketlm.tasks.prune_heads import PruneHeadsProbe
from pocketlm.tasks.rouge import RougeSet
from pocketlm.tasks.scorer_check import ScorerCheckConfig
from pocketlm.tasks.size import SizeProbe
from pocketlm.tasks.toxicity import ToxicitySuiteConfig

__all__ = ["AttentionProbe", "AuditConfig", "BiasSuiteConfig", "CardConfig", "EvalConfig", "ExportConfig", "Gate",
           "InspectConfig", "PerplexitySet", "PipelineConfig", "ProbesConfig", "PruneHeadsProbe", "ROLES", "RougeSet",
           "ScorerCheckConfig", "SizeProbe", "ToxicitySuiteConfig", "load_pipeline_config"]

ROLES = ("teacher", "student", "ce_baseline")  # the models a pipeline measures


def _reserved(cfg: "PipelineConfig") -> set[str]:
    """Names a set or suite may not take: the roles, every task's fixed entries and the other names its gates start
    with (the scorer check's role ``scorer``), and the gate words."""
    tasks = [TASKS.get(name) for name in TASKS]
    return set(ROLES) | {e for t in tasks for e in (*t.fixed_entries, *t.scopes(cfg))} | {"delta", "gates"}


# each section's own model lives with its task (pocketlm.tasks.<task>); these group them as the YAML does
class EvalConfig(StrictModel):
    perplexity: list[PerplexitySet] = [PerplexitySet()]
    rouge: list[RougeSet] = []
    batch_size: int = Field(8, ge=1)
    precision: Literal["fp32", "bf16", "auto"] = "fp32"


class AuditConfig(StrictModel):
    bias: list[BiasSuiteConfig] = []
    toxicity: list[ToxicitySuiteConfig] = []
    probes: list[ProbesConfig] = []
    scorer_check: ScorerCheckConfig = ScorerCheckConfig()
    n_resamples: int = Field(1000, ge=100)


class InspectConfig(StrictModel):
    size: SizeProbe = SizeProbe()
    attention: AttentionProbe = AttentionProbe()
    prune_heads: PruneHeadsProbe = PruneHeadsProbe()


class Gate(StrictModel):
    rule: str
    name: Optional[str] = None  # default: the rule itself

    @field_validator("rule")
    @classmethod
    def _parses(cls, v: str) -> str:
        from pocketlm.report.gates import parse

        parse(v)  # GateSyntaxError (a ValueError): pydantic reports it under gates.<i>.rule
        return v


class CardConfig(StrictModel):
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
        reserved = _reserved(self)
        for entry in entries:
            if entry in reserved:
                raise ValueError(f"the result name {entry!r} is reserved; give that set or suite another name")
            if entry in seen:
                raise ValueError(f"two sets or suites are named {entry!r}; give one a `name`")
            seen.add(entry)
        if self.distill.mode == "ce" and self.ce_baseline:
            raise ValueError("ce_baseline: the student itself is trained with cross-entropy only (distill.mode ce)")
        scopes = set(entries) | set(self.roles()) | {e for name in TASKS for e in TASKS.get(name).scopes(self)}
        if self.export.enabled:
            self._check_exportable()
        heads = self.inspect.prune_heads
        if heads.enabled and "ce_baseline" in heads.roles and not self.ce_baseline:
            raise ValueError("inspect.prune_heads.roles: ce_baseline is named, but ce_baseline is false (no such "
                             "model is trained)")
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
                + [b.entry for b in self.audit.bias] + [t.entry for t in self.audit.toxicity]
                + [p.name for p in self.audit.probes])

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
