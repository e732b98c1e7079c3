"""The student (and with ``export.teacher`` the teacher) as GGUF files in ``deploy/``, one per quant type, each
timed in llama.cpp (off by default)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field, field_validator

from pocketlm.core.config import StrictModel
from pocketlm.tasks.base import Context, Entry, StageOutput, Task, View, register


class ExportConfig(StrictModel):
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


class ExportTask(Task):
    name, phase = "export", "deploy"
    requires = "llama_cpp"
    # the report's and the card's deployment section; not an evaluation set of the model-index
    views = (View("deployment", section=False, evaluation_data=False, analysis=False),)
    fixed_entries = ("deployment",)

    @property
    def switch(self) -> str:
        return "export.enabled"

    def enabled(self, cfg: Any) -> bool:
        return cfg.export.enabled

    def scopes(self, cfg: Any) -> list[str]:
        return list(self.fixed_entries) if cfg.export.enabled else []

    def inputs(self, ctx: Context) -> dict[str, Any]:
        from importlib.metadata import version

        from pocketlm.eval.speed import PROMPTS

        e = ctx.cfg.export
        return {"export": e.model_dump(mode="json"), "models": ctx.fingerprints(["teacher", "student"] if e.teacher
                                                                               else ["student"]),
                "prompts": hashlib.sha256(json.dumps(PROMPTS).encode()).hexdigest()[:16],
                "llama_cpp_python": version("llama-cpp-python")}

    def run(self, ctx: Context) -> StageOutput:
        """Each model at each quant type, timed in llama.cpp by `eval.deploy.gguf_row` (the clock of
        benchmarks/deploy_speed.py); the student's Results carry its speed-up and size ratio to the teacher at each
        quant type both were written at."""
        from pocketlm.core.outdir import subfolder
        from pocketlm.eval.deploy import deployment_results, gguf_row
        from pocketlm.eval.speed import SpeedSettings, prompt_ids

        e = ctx.cfg.export
        settings = SpeedSettings(threads=e.threads, new_tokens=e.new_tokens, repeats=e.repeats, warmup=e.warmup,
                                 max_prompt_tokens=e.max_prompt_tokens)
        folder = subfolder(ctx.out / "deploy", kind="deploy")
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        for role in (["teacher"] if e.teacher else []) + ["student"]:
            model, tok = ctx.model(role)
            prompts = prompt_ids(tok, settings, getattr(model.config, "max_position_embeddings", None))
            rows[role] = {q: gguf_row(model, tok, folder / f"{role}-{q}", q, prompts, settings) for q in e.quants}
        entries = []
        for role, by_quant in rows.items():
            base = (ctx.info("teacher"), rows["teacher"]) if role == "student" and "teacher" in rows else None
            res = deployment_results(by_quant, ctx.info(role), settings, baseline=base,
                                     files={q: ctx.rel(r["file"]) for q, r in by_quant.items()})
            entries.append(Entry(role, "deployment", res))
        return StageOutput(entries, {"deploy_dir": ctx.rel(folder)})


TASK = register(ExportTask())
