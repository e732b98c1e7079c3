"""`pocketlm audit bias`, `pocketlm audit scorer-check`, `pocketlm audit toxicity`, `pocketlm audit probes`.

Each parses, calls the API in `pocketlm.audit` (which checks every input — files, columns, scorer folder and label,
suite layout, probe YAML — before any language model is loaded), writes ``results.json`` (plus the generations as
JSON lines beside it) and prints the metric table. Model-written and suite text is never printed unless
``--show-examples`` is given: counts and scores only.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from pocketlm.audit.prompt_suites import SUITES as PROMPT_SUITES
from pocketlm.cli._common import _EXPECTED, OVERWRITE, QUIET, _fail, held_folder, one_of, remote_code
from pocketlm.cli._options import finite
from pocketlm.core.outdir import check_result_file
from pocketlm.data.suites import SUITES as BIAS_SUITES

_MODEL_HELP = "Model folder, .gguf, hub id or smollm2-135m-instruct."
_BASELINE_HELP = "Baseline model (e.g. the teacher): deltas."
_SCORER_HELP = "Toxicity scorer: profanity (alt-profanity-check, embedded) or hf:FOLDER (a sequence classifier)."
_LABEL_HELP = "With hf:FOLDER, the classifier label that means toxic (e.g. toxic)."
_DTYPE_HELP = "float32 or bfloat16."


def _print_result(res, out: Path, extra_lines: list[str]) -> None:
    typer.echo(res.table())
    for line in extra_lines:
        typer.echo(line)
    typer.echo(f"wrote {out / 'results.json'}")


def _significant_lines(sig: list[dict]) -> list[str]:
    if not sig:
        return []
    lines = ["significant deltas (model - baseline, 95% CI excludes 0):"]
    lines += [f"  {d['name']} [{d['group'] or 'all'}] {d['value']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
              for d in sig]
    return lines


def audit_bias_cmd(
    ctx: typer.Context,
    suite: str = typer.Option(..., "--suite", help=f"{one_of(BIAS_SUITES)}."),
    model: str = typer.Option(..., "--model", help="Model folder, .gguf file, hub id or smollm2-135m-instruct."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Score this model on the same items too and "
                                                                     "report model − baseline deltas."),
    data: Optional[str] = typer.Option(None, "--data", help="The suite's file or folder (e.g. ../shared/data/bbq), "
                                                            "or a hub dataset name; default: its hub copy (online)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score a seeded random subset of N items."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the subset and of the bootstrap."),
    batch_size: int = typer.Option(16, min=1, help="Requests per forward pass."),
    max_length: Optional[int] = typer.Option(None, min=1, help="Cap on input tokens (default: the model's context)."),
    dtype: str = typer.Option("float32", help="Weights: float32 or bfloat16."),
    precision: str = typer.Option("auto", help="Scoring: auto (bf16 where the hardware runs it natively, then fp32 "
                                               "again for every item whose decision lies within the bf16 error "
                                               "bound: decisions equal fp32's; fp32 elsewhere), fp32, or bf16 (model "
                                               "body in bf16 autocast, output layer and log-softmax in fp32; no "
                                               "re-scoring)."),
    n_resamples: int = typer.Option(1000, min=1, help="Bootstrap resamples per interval."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write results.json "
                                                           "(default results/bias-<suite>.json)."),
    show_examples: int = typer.Option(0, "--show-examples", min=0, help="Print the first K items' text with their scores "
                                                                 "(suites hold offensive text; off by default)."),
    quiet: bool = QUIET,
    overwrite: bool = OVERWRITE,
) -> None:
    """CrowS-Pairs, StereoSet, BBQ or WinoBias as lm-evaluation-harness scores causal LMs, every figure with a
    95 % bootstrap interval; with --baseline, paired deltas flagged where the interval excludes zero."""
    from pocketlm.audit.bias import examples, run_bias_audit

    try:
        out = out or Path("results") / f"bias-{suite}.json"
        check_result_file(out, overwrite=overwrite)  # before any work
        audit = run_bias_audit(suite, model, baseline_spec=baseline, data=data, limit=limit, seed=seed,
                               batch_size=batch_size, max_length=max_length, dtype=dtype, precision=precision,
                               n_resamples=n_resamples, progress=not quiet, trust_remote_code=remote_code(ctx))
        path = audit.results.write(out)
    except _EXPECTED as e:
        _fail(e)
    res = audit.results
    typer.echo(f"{suite}: {len(audit.items)} of {audit.n_total} items"
               + (f" (seeded subset, seed {seed})" if audit.subset else "") + f" — {model}"
               + (f" vs baseline {baseline}" if baseline else ""))
    typer.echo(res.table())
    typer.echo("scoring: " + "; ".join(
        f"{role} {s['scoring']}" + (f" ({len(audit.run.rescored[role])} items re-scored)" if s["bound"] else "")
        for role, s in res.settings["scoring_precision"].items()))
    if baseline:
        significant = res.details.get("significant", [])
        typer.echo("significant deltas (95 % CI excludes 0): " + (", ".join(significant) if significant else "none"))
    if show_examples:
        typer.echo("\n".join(examples(audit.run, audit.items, show_examples)))
    typer.echo(f"wrote {path}")


def scorer_check_cmd(
    data: Path = typer.Option(..., "--data", help="Labelled .csv/.tsv/.jsonl (e.g. Davidson's labeled_data.csv)."),
    scorer: str = typer.Option("profanity", "--scorer", help=_SCORER_HELP),
    toxic_label: Optional[str] = typer.Option(None, "--toxic-label", help=_LABEL_HELP),
    text_column: str = typer.Option("tweet", help="Column holding the text."),
    label_column: str = typer.Option("class", help="Column holding the label."),
    definition: List[str] = typer.Option(
        [], "--definition", help="Positive class: NAME=POS,...:NEG,... (repeatable). Default: Davidson et al.'s "
        "class column, hate_or_offensive=0,1:2 and hate=0:2."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score a seeded random subset of N rows."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the subset and the bootstrap."),
    out: Path = typer.Option(Path("outputs/audit/scorer-check"), "--out", help="Folder for results.json."),
    overwrite: bool = OVERWRITE,
) -> None:
    """How far to trust a toxicity scorer: ROC AUC and accuracy at 0.5 on a labelled set, with 95 % CIs."""
    from pocketlm.audit.toxicity import scorer_check_results

    with held_folder(out, kind="scorer-check", overwrite=overwrite):
        try:
            res = scorer_check_results(data, scorer=scorer, toxic_label=toxic_label, text_column=text_column,
                                       label_column=label_column, definitions=definition, limit=limit, seed=seed)
        except _EXPECTED as e:
            _fail(e)
        res.write(out / "results.json")
        _print_result(res, out, [])


def toxicity_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help=_MODEL_HELP),
    suite: str = typer.Option(..., "--suite", help=f"Prompt suite: {one_of(PROMPT_SUITES)}."),
    data: Path = typer.Option(..., "--data", help="The suite's folder (or file): see pocketlm.audit.prompt_suites."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help=_BASELINE_HELP),
    samples: int = typer.Option(25, min=0, help="Continuations per prompt (RealToxicityPrompts: 25)."),
    limit: Optional[int] = typer.Option(None, min=1, help="A seeded subset of N prompts, stratified by (domain, group)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the subset, of sampling and of the bootstrap."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation (RealToxicityPrompts: 20)."),
    top_p: float = typer.Option(0.9, callback=finite(0, 1, low_open=True), help="Nucleus sampling mass (RealToxicityPrompts: 0.9)."),
    temperature: float = typer.Option(1.0, callback=finite(0, low_open=True), help="Sampling temperature (RealToxicityPrompts: 1)."),
    batch_size: int = typer.Option(32, min=1, help="Rows (prompt x sample) per generation batch."),
    scorer: str = typer.Option("profanity", "--scorer", help=_SCORER_HELP),
    toxic_label: Optional[str] = typer.Option(None, "--toxic-label", help=_LABEL_HELP),
    sentiment: Optional[bool] = typer.Option(None, "--sentiment/--no-sentiment",
                                             help="VADER sentiment of continuations (default: on for bold)."),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP),
    out: Path = typer.Option(Path("outputs/audit/toxicity"), "--out", help="Folder for results.json and "
                                                                           "generations.jsonl."),
    show_examples: bool = typer.Option(False, "--show-examples", help="Print the most toxic continuations "
                                                                      "(offensive text)."),
    quiet: bool = QUIET,
    overwrite: bool = OVERWRITE,
) -> None:
    """Prompted toxicity (RealToxicityPrompts' metrics) per group, optionally against a baseline model, beside the
    fluency (perplexity under the baseline, else the model itself) and diversity (distinct-1/2) of the generations."""
    from pocketlm.audit.prompted_run import run_prompted
    from pocketlm.tasks.toxicity import toxicity_results

    t0 = time.perf_counter()
    with held_folder(out, kind="toxicity", overwrite=overwrite):
        try:
            run = run_prompted(model, suite, data, out=out, baseline_spec=baseline, samples=samples, limit=limit,
                               seed=seed, max_new_tokens=max_new_tokens, top_p=top_p, temperature=temperature,
                               batch_size=batch_size, scorer=scorer, toxic_label=toxic_label, sentiment=sentiment,
                               dtype=dtype, progress=not quiet, trust_remote_code=remote_code(ctx))
            (base_info, base_scored) = run.baseline
            res = toxicity_results(
                run.prompts, run.suite, run.scored[0], base_scored, generation=run.settings, scorer=run.scorer,
                model=run.models[0], baseline=base_info, limit=limit, seed=seed, sentiment=run.sentiment,
                fluency={"reference": run.reference, "spec": run.reference_spec},
                generations_file=run.generations.name, details=run.details(), settings={"dtype": dtype},
                wall_time_s=time.perf_counter() - t0)
        except _EXPECTED as e:
            _fail(e)
        res.write(out / "results.json")
        _print_result(res, out, _toxicity_lines(run, res.details, samples, show_examples))


def _toxicity_lines(run, details: dict, samples: int, show_examples: bool) -> list[str]:
    from pocketlm.audit.prompted import most_toxic

    lines = _significant_lines(details.get("significant_deltas", []))
    lines.append(f"generation_perplexity scored by the {run.reference} ({run.reference_spec})")
    lines.append(f"{len(run.prompts)} prompts x {samples} continuations; texts in {run.generations} (offensive "
                 "text; not printed — use --show-examples)")
    if show_examples:
        for role, s in zip(("model", "baseline"), run.scored):
            lines.append(f"most toxic {role} continuations:")
            lines += [f"  {score:.3f} [{p.slice or 'all'}] {p.text!r} -> {text!r}" for score, p, text in
                      most_toxic(run.prompts, s)]
    return lines


def probes_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help=_MODEL_HELP),
    baseline: Optional[str] = typer.Option(None, "--baseline", help=_BASELINE_HELP),
    probes: Optional[Path] = typer.Option(None, "--probes", help="Probe YAML (default: the shipped gender, "
                                                                 "religion, nationality and age sets)."),
    set_: List[str] = typer.Option([], "--set", help="Only these probe sets (repeatable)."),
    samples: int = typer.Option(5, min=0, help="Continuations per filling for toxicity and sentiment (0: loglik only)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of sampling, the permutation tests and the bootstrap."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation."),
    top_p: float = typer.Option(0.9, callback=finite(0, 1, low_open=True), help="Nucleus sampling mass."),
    temperature: float = typer.Option(1.0, callback=finite(0, low_open=True), help="Sampling temperature."),
    batch_size: int = typer.Option(32, min=1, help="Rows per scoring / generation batch."),
    scorer: str = typer.Option("profanity", "--scorer", help=_SCORER_HELP),
    toxic_label: Optional[str] = typer.Option(None, "--toxic-label", help=_LABEL_HELP),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP),
    out: Path = typer.Option(Path("outputs/audit/probes"), "--out", help="Folder for results.json."),
    show_examples: bool = typer.Option(False, "--show-examples", help="Print the most toxic continuations."),
    quiet: bool = QUIET,
    overwrite: bool = OVERWRITE,
) -> None:
    """Counterfactual probes: templates filled with each group's terms; groups compared by permutation test."""
    from pocketlm.audit.probes import run_probes

    with held_folder(out, kind="probes", overwrite=overwrite):
        try:
            audit = run_probes(model, baseline_spec=baseline, probes=probes, sets=set_, samples=samples, seed=seed,
                               max_new_tokens=max_new_tokens, top_p=top_p, temperature=temperature,
                               batch_size=batch_size, scorer=scorer, toxic_label=toxic_label, dtype=dtype, out=out,
                               progress=not quiet, trust_remote_code=remote_code(ctx))
        except _EXPECTED as e:
            _fail(e)
        audit.results.write(out / "results.json")
        _print_result(audit.results, out, _probe_lines(audit, out, show_examples))


def _probe_lines(audit, out: Path, show_examples: bool) -> list[str]:
    from pocketlm.audit.prompted import most_toxic

    sets = audit.results.details["sets"]
    sig = [f"{n}: {fig} {pair}" for n, d in sets.items() for fig, f in d["figures"].items()
           for pair in f["significant"]]
    lines = ["pairs significant after Holm (alpha 0.05): " + (", ".join(sig) or "none")]
    lines += _significant_lines([s for d in sets.values() for s in d["significant_deltas"]])
    if audit.scored:
        lines.append(f"continuations in {out / 'generations.jsonl'} (not printed — use --show-examples)")
        if show_examples:
            lines.append("most toxic continuations (model):")
            lines += [f"  {s:.3f} [{p.slice}] {p.text!r} -> {t!r}" for s, p, t in most_toxic(audit.prompts,
                                                                                           audit.scored[0])]
    return lines
