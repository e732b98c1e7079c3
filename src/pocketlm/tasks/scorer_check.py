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
from pocketlm.tasks.base import Context, Entry, StageOutput, Task, View, register

ROLE = "scorer"  # the role its Results are filed under: the scorer is what is measured
ENTRY = "scorer_check"


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
    views = (View("scorer_check", group_headlines=("roc_auc", "accuracy@0.5"), group_label="definition",
                  summary_rows=0),)
    fixed_entries = (ENTRY,)

    @property
    def switch(self) -> str:
        return "audit.scorer_check.enabled"

    def enabled(self, cfg: Any) -> bool:
        return cfg.audit.scorer_check.enabled

    def measures(self, cfg: Any) -> list[str]:
        return [ENTRY]

    def check(self, ctx: Context) -> None:
        """The labelled set read (its columns named) and the scorer built, before any model work."""
        from pocketlm.audit.toxicity import build_scorer, read_labelled

        c = ctx.cfg.audit.scorer_check
        path = ctx.cfg.data_path(c.data)
        if not path.exists():
            ctx.missing(ENTRY, "audit.scorer_check.data", path)
            return
        _, _, sha = read_labelled(path, c.text_column, c.label_column)
        build_scorer(c.scorer, label=c.toxic_label)
        ctx.inputs[ENTRY] = {"path": path, "hash": sha}

    def inputs(self, ctx: Context) -> dict[str, Any]:
        c = ctx.cfg.audit.scorer_check
        return {"check": c.model_dump(mode="json"), "data": ctx.inputs[ENTRY]["hash"], "seed": ctx.seed}

    def run(self, ctx: Context) -> StageOutput:
        from pocketlm.audit.toxicity import scorer_check_results

        c = ctx.cfg.audit.scorer_check
        res = scorer_check_results(ctx.inputs[ENTRY]["path"], scorer=c.scorer, toxic_label=c.toxic_label,
                                   text_column=c.text_column, label_column=c.label_column,
                                   definitions=c.definitions, limit=c.limit, seed=ctx.seed)
        res.model["role"] = ROLE
        return StageOutput([Entry(ROLE, ENTRY, res)])


TASK = register(ScorerCheckTask())
