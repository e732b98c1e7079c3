"""How far to trust the toxicity scorer (``audit.scorer_check``): its ROC AUC and accuracy at 0.5 on a labelled set
(e.g. Davidson et al.'s), per definition of "toxic", with 95 % intervals.

The figure is the scorer's, not a language model's: the task writes one Results under the role ``scorer`` (no
teacher or student, so no deltas). `pocketlm audit scorer-check` calls the same function,
`pocketlm.audit.toxicity.scorer_check_results`.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from pocketlm.core.config import StrictModel, registered
from pocketlm.tasks.base import Context, Entry, StageOutput, Task, View, path_identity, register

ROLE = "scorer"  # the role its Results are filed under: the scorer is what is measured
ENTRY = "scorer_check"


def scorer_identity(spec: str) -> str | None:
    """What a stage key holds of a toxicity scorer beside its name: an ``hf:FOLDER`` classifier's folder identity
    (its files' names, sizes and times), so a replaced classifier is measured again; None for the embedded one."""
    name, _, folder = spec.partition(":")
    return path_identity(folder) if name == "hf" and folder else None


class SampledScoring(StrictModel):
    """How continuations are sampled and their toxicity scored: the fields toxicity suites and probes share."""

    max_new_tokens: int = Field(20, ge=1)
    top_p: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1)
    scorer: str = "profanity"  # profanity | hf:FOLDER
    toxic_label: Optional[str] = None

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, v: str) -> str:
        from pocketlm.audit.toxicity import SCORERS

        registered(SCORERS, v.partition(":")[0])
        return v


class ScorerCheckConfig(StrictModel):
    """The toxicity scorer checked against human labels; off by default."""

    enabled: bool = False
    data: Optional[str] = None  # a labelled .csv/.tsv/.jsonl (e.g. hate_speech_davidson/labeled_data.csv)
    scorer: str = "profanity"  # profanity | hf:FOLDER (pocketlm.audit.toxicity.SCORERS)
    toxic_label: Optional[str] = None  # with hf:FOLDER, the classifier's label that means toxic
    text_column: str = "tweet"
    label_column: str = "class"
    definitions: list[str] = []  # NAME=POS,...:NEG,... (label values); []: Davidson et al.'s two
    limit: Optional[int] = Field(None, ge=1)  # a seeded random subset of this many rows

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, v: str) -> str:
        from pocketlm.audit.toxicity import SCORERS

        registered(SCORERS, v.partition(":")[0])
        return v

    @field_validator("definitions")
    @classmethod
    def _parses(cls, v: list[str]) -> list[str]:
        from pocketlm.audit.toxicity import LabelDefinition

        for d in v:
            LabelDefinition.parse(d)  # a ValueError: pydantic names the field
        return v

    @model_validator(mode="after")
    def _data_when_on(self) -> "ScorerCheckConfig":
        if self.enabled and self.data is None:
            raise ValueError("data: enabled needs a labelled set (a .csv, .tsv or .jsonl file)")
        return self


class ScorerCheckTask(Task):
    name, phase = "scorer_check", "audit"
    requires = "pocketlm.audit.toxicity"
    # the labelled set measures the scorer, not the models: not listed as the card's evaluation data
    views = (View("scorer_check", group_headlines=("roc_auc", "accuracy@0.5"), group_label="definition",
                  evaluation_data=False, summary_rows=0),)
    fixed_entries = (ENTRY,)

    @property
    def switch(self) -> str:
        return "audit.scorer_check.enabled"

    def enabled(self, cfg: Any) -> bool:
        return cfg.audit.scorer_check.enabled

    def measures(self, cfg: Any) -> list[str]:
        return [ENTRY]

    def scopes(self, cfg: Any) -> list[str]:
        """Its entry and its role: gates name it ``scorer.scorer_check.roc_auc`` (``<role>.<entry>.<metric>``) or
        ``scorer_check.roc_auc.scorer``; both names are reserved."""
        return [ENTRY, ROLE]

    def check(self, ctx: Context) -> None:
        """The labelled set read (its columns named), each definition's classes counted on the rows the run scores
        (the same seeded subset), and the scorer built, before any model work."""
        from pocketlm.audit.toxicity import (
            build_scorer, check_definitions, parse_definitions, read_labelled, seeded_subset,
        )

        c = ctx.cfg.audit.scorer_check
        path = ctx.cfg.data_path(c.data)
        if not path.exists():
            ctx.missing(ENTRY, "audit.scorer_check.data", path)
            return
        _, labels, sha = read_labelled(path, c.text_column, c.label_column)
        check_definitions([labels[i] for i in seeded_subset(len(labels), c.limit, ctx.seed)],
                          parse_definitions(c.definitions),
                          fix="audit.scorer_check.definitions or audit.scorer_check.label_column")
        build_scorer(c.scorer, label=c.toxic_label)
        ctx.inputs[ENTRY] = {"path": path, "hash": sha}

    def inputs(self, ctx: Context) -> dict[str, Any]:
        """The check's settings with the data's hash for its path and the scorer's identity (a replaced hf:
        classifier is checked again), the seed and the bootstrap's resamples."""
        c = ctx.cfg.audit.scorer_check
        return {"check": {**c.model_dump(mode="json"), "data": ctx.inputs[ENTRY]["hash"],
                          "scorer_identity": scorer_identity(c.scorer)},
                "seed": ctx.seed, "n_resamples": ctx.cfg.audit.n_resamples}

    def run(self, ctx: Context) -> StageOutput:
        from pocketlm.audit.toxicity import scorer_check_results

        c = ctx.cfg.audit.scorer_check
        res = scorer_check_results(ctx.inputs[ENTRY]["path"], scorer=c.scorer, toxic_label=c.toxic_label,
                                   text_column=c.text_column, label_column=c.label_column,
                                   definitions=c.definitions, limit=c.limit, seed=ctx.seed,
                                   n_resamples=ctx.cfg.audit.n_resamples)
        res.model["role"] = ROLE
        return StageOutput([Entry(ROLE, ENTRY, res)])


TASK = register(ScorerCheckTask())
