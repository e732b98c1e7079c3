"""Counterfactual probes: the same sentence about different groups, compared with a permutation test.

A probe set is templates with one ``{group}`` slot and, per group, a list of terms (``female: [woman, mother]``).
Every template is filled with every term of every group. For each filling we measure

* **loglik** — log P(the template's words after the slot | the words up to and including the group term), the
  tokens the groups share, as CrowS-Pairs scores the unmodified tokens (Nangia et al., 2020); tokenised as
  lm-evaluation-harness splits a (context, continuation) pair; scored by `eval.loglik.score_continuations`;
* **toxicity** and **sentiment** — the mean P(toxic) and mean VADER compound of k sampled continuations of the
  whole filled template (RealToxicityPrompts' sampling settings).

A group's figure on a template is the mean over its terms, so each template gives one value per group and groups
are compared *paired by template*: for groups a and b, the mean over templates of value_a − value_b, tested with
``scipy.stats.permutation_test`` (``permutation_type="samples"``: the two values of a template are swapped, i.e.
sign flips; exact when 2^templates <= n_resamples), two-sided. Within one set and one figure the p-values of all
pairs are corrected by Holm's step-down method (family-wise error 0.05); the pairs below 0.05 after correction
are reported as significant. Every figure and difference also carries a 95 % bootstrap interval over templates.

Shape legend: t = templates, g = groups, n = fillings.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from scipy import stats as sps

from pocketlm.audit.prompt_suites import Prompt
from pocketlm.audit.prompted_run import check_models, each_model
from pocketlm.audit.prompted import (
    Scored, figure_metrics, generate_scored, rtp_settings, significant_deltas, write_generations,
)
from pocketlm.audit.toxicity import build_scorer
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.core.stats import DEFAULT_RESAMPLES, _mean, _mean_diff

SLOT = "{group}"
ALPHA = 0.05
FIGURES = {"loglik": None, "toxicity": False, "sentiment": None}  # name -> higher_is_better


class ProbeSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    templates: list[str] = Field(min_length=2)
    groups: dict[str, list[str]]

    @field_validator("templates")
    @classmethod
    def _one_slot_then_words(cls, templates: list[str]) -> list[str]:
        for t in templates:
            if t.count(SLOT) != 1:
                raise ValueError(f"template {t!r} must contain {SLOT} exactly once")
            if not t.split(SLOT, 1)[1].strip():
                raise ValueError(f"template {t!r} needs words after {SLOT} (they are what is scored)")
        return templates

    @field_validator("groups")
    @classmethod
    def _two_groups_distinct_terms(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        if len(groups) < 2:
            raise ValueError(f"a probe set needs at least two groups to compare, got {sorted(groups)}")
        seen: dict[str, str] = {}
        for g, terms in groups.items():
            if not terms or any(not t.strip() for t in terms):
                raise ValueError(f"group {g!r} needs at least one non-empty term")
            for t in terms:
                if t in seen:
                    raise ValueError(f"term {t!r} is in both group {seen[t]!r} and group {g!r}")
                seen[t] = g
        return groups


class ProbeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    sets: dict[str, ProbeSet] = Field(min_length=1)


def shipped_probes() -> Path:
    """The example probe sets that ship with pocketlm (gender, religion, nationality, age)."""
    return Path(str(files("pocketlm.audit").joinpath("probes", "examples.yaml")))


def load_probes(path: str | Path | None = None, sets: Sequence[str] | None = None) -> dict[str, ProbeSet]:
    """Probe sets from a YAML file (the shipped examples by default), optionally only the named ones."""
    path = Path(path) if path is not None else shipped_probes()
    if not path.is_file():
        raise FileNotFoundError(f"probe file {path} does not exist")
    from pocketlm.config import load_yaml_text
    from pocketlm.data.text import read_utf8

    text = read_utf8(path)  # not UTF-8: a DataError naming the line
    try:
        tree = load_yaml_text(text)
    except ValueError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if tree is None:
        raise ValueError(f"{path} is empty; a probe file holds `sets:` (see {shipped_probes()})")
    try:
        parsed = ProbeFile.model_validate(tree)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}"
                           for err in e.errors())
        raise ValueError(f"{path}: {errors}") from None
    if not sets:
        return dict(parsed.sets)
    unknown = [s for s in sets if s not in parsed.sets]
    if unknown:
        raise ValueError(f"{path} has no probe set {unknown}; its sets are: {sorted(parsed.sets)}")
    return {s: parsed.sets[s] for s in sets}


@dataclass(frozen=True)
class Filling:
    template: int
    group: str
    term: str
    context: str  # template up to the slot, with the term
    rest: str  # the template's words after the slot

    @property
    def text(self) -> str:
        return self.context + self.rest


def fill(probe_set: ProbeSet) -> list[Filling]:
    """Every template with every term of every group (template-major order)."""
    out = []
    for t, template in enumerate(probe_set.templates):
        before, after = template.split(SLOT, 1)
        for group, terms in probe_set.groups.items():
            out += [Filling(t, group, term, before + term, after) for term in terms]
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces move to the continuation; the continuation's tokens are the
    whole string's tokens after the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def filling_logliks(model, tokenizer, fillings: Sequence[Filling], *, batch_size: int = 32) -> np.ndarray:
    """Σ log P(rest | context) per filling [n], batched through `score_continuations`."""
    from pocketlm.eval.loglik import score_continuations

    requests = [encode_pair(tokenizer, f.context, f.rest) for f in fillings]
    return np.array([lp for lp, _ in score_continuations(model, requests, batch_size=batch_size)])


def by_template_and_group(values: np.ndarray, fillings: Sequence[Filling], groups: Sequence[str]) -> np.ndarray:
    """Mean of per-filling values over each group's terms, per template → [t, g]."""
    n_t = max(f.template for f in fillings) + 1
    sums, counts = np.zeros((n_t, len(groups))), np.zeros((n_t, len(groups)))
    for v, f in zip(values, fillings):
        sums[f.template, groups.index(f.group)] += v
        counts[f.template, groups.index(f.group)] += 1
    return sums / counts


def filling_figures(fillings: Sequence[Filling], groups: Sequence[str], logliks: np.ndarray,
                    scored: Scored | None) -> dict[str, np.ndarray]:
    """Each figure as a [t, g] matrix: loglik, and (when continuations were generated) toxicity and sentiment."""
    out = {"loglik": by_template_and_group(logliks, fillings, groups)}
    if scored is not None:
        out["toxicity"] = by_template_and_group(scored.toxicity.mean(axis=1), fillings, groups)
        if scored.sentiment is not None:
            out["sentiment"] = by_template_and_group(scored.sentiment.mean(axis=1), fillings, groups)
    return out


def paired_permutation_p(x: np.ndarray, y: np.ndarray, *, seed: int = 0, n_resamples: int = 9999) -> float:
    """Two-sided p-value of mean(x − y) = 0 for paired items, by permuting within pairs (exact when it can be)."""
    res = sps.permutation_test((np.asarray(x, float), np.asarray(y, float)), _mean_diff, vectorized=True,
                               permutation_type="samples", alternative="two-sided", n_resamples=n_resamples,
                               random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values: sorted p_(i) times (m − i + 1), made monotone, capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def compare_groups(set_name: str, groups: Sequence[str], model: dict[str, np.ndarray],
                   baseline: dict[str, np.ndarray] | None = None, *, seed: int = 0,
                   n_resamples: int = DEFAULT_RESAMPLES, n_permutations: int = 9999) -> tuple[list[Metric], dict]:
    """Per-group figures and pairwise differences (with baseline deltas), the permutation tests and Holm."""
    metrics: list[Metric] = []
    details: dict = {}
    kw = {"seed": seed, "n_resamples": n_resamples}
    for fig, v in model.items():  # v: [t, g]
        b = None if baseline is None else baseline[fig]
        for j, g in enumerate(groups):
            metrics += figure_metrics(fig, f"{set_name}/{g}", _mean, (v[:, j],),
                                      None if b is None else (b[:, j],), higher_is_better=FIGURES[fig], **kw)
        pairs = list(itertools.combinations(range(len(groups)), 2))
        pvals = [paired_permutation_p(v[:, i], v[:, j], seed=seed, n_resamples=n_permutations) for i, j in pairs]
        adjusted = holm(pvals)
        rows = []
        for (i, j), p, p_adj in zip(pairs, pvals, adjusted):
            label = f"{set_name}/{groups[i]}-{groups[j]}"
            metrics += figure_metrics(f"{fig}_diff", label, _mean_diff, (v[:, i], v[:, j]),
                                      None if b is None else (b[:, i], b[:, j]), higher_is_better=None, **kw)
            rows.append({"a": groups[i], "b": groups[j], "diff": float(np.mean(v[:, i] - v[:, j])), "p": p,
                         "p_holm": float(p_adj), "significant": bool(p_adj < ALPHA)})
        details[fig] = {"pairs": rows, "significant": [f"{r['a']}-{r['b']}" for r in rows if r["significant"]]}
    return metrics, {"figures": details, "templates": int(next(iter(model.values())).shape[0]),
                     "significant_deltas": significant_deltas(metrics)}


# ------------------------------------------------------------------------------------------------ the audit


@dataclass
class ProbesAudit:
    """What `run_probes` measured: the Results and, with samples, one prompt per filling and each model's
    continuations of them (in the order of ``generations.jsonl``)."""

    results: Results
    prompts: list[Prompt]
    scored: list[Scored]  # model, then baseline; empty with samples=0


def stack_scored(parts: Sequence[Scored]) -> Scored:
    """Concatenate several sets' Scored runs into one, in order (for the generations file)."""
    return Scored([t for p in parts for t in p.texts], np.concatenate([p.toxicity for p in parts]),
                  np.concatenate([p.sentiment for p in parts]), sum(p.new_tokens for p in parts),
                  sum(p.seconds for p in parts))


def run_probes(
    model_spec: str,
    *,
    baseline_spec: str | None = None,
    probes: str | Path | None = None,
    sets: Sequence[str] = (),
    samples: int = 5,
    seed: int = 0,
    max_new_tokens: int = 20,
    top_p: float = 0.9,
    temperature: float = 1.0,
    batch_size: int = 32,
    scorer: str = "profanity",
    toxic_label: str | None = None,
    dtype: str = "float32",
    out: Path | None = None,
    progress: bool = False,
    trust_remote_code: bool | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
) -> ProbesAudit:
    """`pocketlm audit probes`: every probe set filled and scored by each model (log-likelihoods; with
    ``samples``, the toxicity and sentiment of sampled continuations, written to ``out/generations.jsonl``), groups
    compared by `compare_groups` (``n_resamples`` bootstrap resamples per interval) → ``Results(kind="probes")``.
    Inputs are checked before any model loads."""
    t0 = time.perf_counter()
    if samples < 0:
        raise ValueError(f"--samples must be >= 0, got {samples}")
    specs = check_models(model_spec, baseline_spec)
    chosen = load_probes(probes, sets)
    fillings = {name: fill(ps) for name, ps in chosen.items()}
    settings = rtp_settings(samples=max(samples, 1), seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            top_p=top_p, temperature=temperature)
    sc = build_scorer(scorer, label=toxic_label) if samples else None

    def work(m, tok, role):
        per_set = {}
        for name, fs in fillings.items():
            ll = filling_logliks(m, tok, fs, batch_size=batch_size)
            scored = generate_scored(m, tok, [f.text for f in fs], settings, sc, sentiment=True,
                                     progress=progress, desc=f"{role}: {name}") if sc else None
            per_set[name] = (ll, scored)
        return per_set

    runs = each_model(specs, dtype, work, trust_remote_code=trust_remote_code)
    metrics, details = [], {}
    for name, ps in chosen.items():
        groups = list(ps.groups)
        figs = [filling_figures(fillings[name], groups, *r[name]) for _, r in runs]
        mt, dt = compare_groups(name, groups, figs[0], figs[1] if baseline_spec else None, seed=seed,
                                n_resamples=n_resamples)
        metrics += mt
        details[name] = dt
    prompts, merged = [], []
    if samples:
        prompts = [Prompt(f"{n}:{i}", f.text, f.group, n) for n, fs in fillings.items() for i, f in enumerate(fs)]
        merged = [stack_scored([r[n][1] for n in fillings]) for _, r in runs]
        if out is not None:  # only into the folder the caller names (never the working directory by default)
            write_generations(Path(out) / "generations.jsonl", prompts, merged[0],
                              merged[1] if baseline_spec else None)
    res = Results(
        kind="probes", model=runs[0][0], baseline=runs[1][0] if baseline_spec else None,
        data={"source": str(probes or shipped_probes()), "sets": {n: len(fs) for n, fs in fillings.items()},
              "n": sum(len(fs) for fs in fillings.values())},
        settings={"generation": settings.to_dict() if samples else None, "samples": samples,
                  "scorer": sc.describe() if sc else None, "dtype": dtype, "seed": seed,
                  "test": "scipy.stats.permutation_test, paired by template (sign flips), two-sided; Holm over "
                          "the pairs of one set and figure; alpha 0.05",
                  "loglik": "sum log P(template words after the slot | words up to the group term)"},
        metrics=metrics, details={"sets": details, "generations_file": "generations.jsonl" if samples and out is not None
                                                   else None},
        provenance=provenance(), wall_time_s=time.perf_counter() - t0,
    )
    return ProbesAudit(res, prompts, merged)
