"""Running a prompted audit end to end: each model loaded in turn (the previous one freed first), its continuations
generated and scored (`audit.prompted`), and their fluency under a reference model (`audit.fluency`).

`run_prompted` is what `pocketlm audit toxicity` calls; `pocketlm.tasks.toxicity.toxicity_results` turns its
`PromptedRun` into the toxicity Results.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from pocketlm.audit.fluency import score_fluency
from pocketlm.audit.prompt_suites import Prompt, PromptSuite, load_suite, select
from pocketlm.audit.prompted import Scored, generate_scored, rtp_settings, write_generations
from pocketlm.audit.toxicity import ToxicityScorer, build_scorer
from pocketlm.eval.generate import GenerationSettings
from pocketlm.models.load import load_model, model_info, resolve

ROLES = ("model", "baseline")


def each_model(specs: Sequence[str], dtype: str, work: Callable, *,
               trust_remote_code: bool | None = None) -> list[tuple[dict, Any]]:
    """Load each model in turn (the previous one freed first), run ``work(model, tokenizer, role)`` → (the model's
    info, what ``work`` returned) per model."""
    out = []
    for role, spec in zip(ROLES, specs):
        model, tok = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        out.append((model_info(spec, model, tok), work(model, tok, role)))
        del model, tok
        gc.collect()
    return out


def check_models(model_spec: str, baseline_spec: str | None) -> list[str]:
    """The model (and baseline) specs, each resolved: a missing folder or file fails here, before any work."""
    specs = [model_spec] + ([baseline_spec] if baseline_spec else [])
    for s in specs:
        resolve(s)
    return specs


@dataclass
class PromptedRun:
    """What `run_prompted` measured, for `tasks.toxicity.toxicity_results` and the terminal."""

    suite: PromptSuite
    prompts: list[Prompt]
    settings: GenerationSettings
    scorer: ToxicityScorer
    sentiment: bool
    models: list[dict]  # the models' info: model, then baseline
    scored: list[Scored]  # each model's continuations, with their fluency
    reference: str  # the role whose model scored every model's fluency: "baseline" if there is one, else "model"
    reference_spec: str
    generations: Path

    @property
    def baseline(self) -> tuple[dict | None, Scored | None]:
        return (self.models[1], self.scored[1]) if len(self.models) > 1 else (None, None)

    def details(self) -> dict:
        return {"new_tokens": {r: s.new_tokens for r, s in zip(ROLES, self.scored)},
                "generation_seconds": {r: round(s.seconds, 2) for r, s in zip(ROLES, self.scored)},
                "prompt_ids": [p.id for p in self.prompts], "suite_notes": self.suite.notes}


def run_prompted(
    model_spec: str,
    suite: str,
    data: str | Path,
    *,
    out: Path,
    baseline_spec: str | None = None,
    samples: int = 25,
    limit: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 20,
    top_p: float = 0.9,
    temperature: float = 1.0,
    batch_size: int = 32,
    scorer: str = "profanity",
    toxic_label: str | None = None,
    sentiment: bool | None = None,
    dtype: str = "float32",
    progress: bool = False,
    trust_remote_code: bool | None = None,
) -> PromptedRun:
    """The suite's prompts (a seeded subset of ``limit``) continued ``samples`` times by each model
    (RealToxicityPrompts' sampling), scored for toxicity (and sentiment: default the suite's), the fluency of every
    model's continuations scored by the reference model; the continuations written to ``out/generations.jsonl``.
    Models, suite and scorer are checked before any model loads."""
    specs = check_models(model_spec, baseline_spec)
    loaded = load_suite(suite, data)
    prompts = select(loaded.prompts, limit, seed)
    settings = rtp_settings(samples=samples, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            top_p=top_p, temperature=temperature, stop=loaded.stop)
    with_sentiment = loaded.extra.get("sentiment", False) if sentiment is None else sentiment
    sc = build_scorer(scorer, label=toxic_label)
    texts = [p.text for p in prompts]
    reference = "baseline" if baseline_spec else "model"  # scores every model's generations for fluency
    written: list[Scored] = []

    def work(m, tok, role):
        written.append(generate_scored(m, tok, texts, settings, sc, sentiment=with_sentiment, progress=progress,
                                       desc=f"{role}: generating"))
        if role != reference:
            return None
        return [score_fluency(m, tok, texts, s.texts, reference=specs[-1], batch_size=batch_size,
                              progress=progress, desc=f"{role}: fluency of {r}") for r, s in zip(ROLES, written)]

    runs = each_model(specs, dtype, work, trust_remote_code=trust_remote_code)
    scored = [replace(s, fluency=f) for s, f in zip(written, runs[-1][1])]
    path = write_generations(Path(out) / "generations.jsonl", prompts, scored[0],
                             scored[1] if baseline_spec else None)
    return PromptedRun(loaded, prompts, settings, sc, with_sentiment, [info for info, _ in runs], scored, reference,
                       specs[-1], path)
