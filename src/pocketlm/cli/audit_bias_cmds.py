"""`pocketlm audit bias`: a social-bias suite scored by log-likelihood, optionally against a baseline model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, _fail, audit_app
from pocketlm.core.outdir import check_result_file


@audit_app.command("bias")
def audit_bias_cmd(
    suite: str = typer.Option(..., "--suite", help="crows_pairs, stereoset, bbq or winobias."),
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
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overwrite: bool = OVERWRITE,
) -> None:
    """CrowS-Pairs, StereoSet, BBQ or WinoBias as lm-evaluation-harness scores causal LMs, every figure with a
    95 % bootstrap interval; with --baseline, paired deltas flagged where the interval excludes zero."""
    from pocketlm.audit.bias import BIAS_SUITES, audit_bias, examples
    from pocketlm.data.suites import load_suite, sample_items
    from pocketlm.eval.loglik import PRECISIONS
    from pocketlm.models.load import load_model

    try:
        out = out or Path("results") / f"bias-{suite}.json"
        check_result_file(out, overwrite=overwrite)  # before any work
        BIAS_SUITES.get(suite)
        if precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        full = load_suite(suite, data)  # every row checked here, before any model work
        subset = sample_items(full, limit, seed)
        m, tok = load_model(model, dtype=dtype)
        base = load_model(baseline, dtype=dtype) if baseline else None
        res, run = audit_bias(
            suite, subset, m, tok, model_spec=model, baseline=base, baseline_spec=baseline, batch_size=batch_size,
            max_length=max_length, precision=precision, seed=seed, n_resamples=n_resamples, progress=not quiet,
            settings={"limit": limit, "n_items": len(subset.items), "n_total": full.n_total, "dtype": dtype,
                      "subset": f"{len(subset.items)} of {full.n_total} items, seeded random (seed {seed})"
                                if len(subset.items) < full.n_total else "all items"},
        )
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(f"{suite}: {len(subset.items)} of {full.n_total} items"
               + (f" (seeded subset, seed {seed})" if len(subset.items) < full.n_total else "") + f" — {model}"
               + (f" vs baseline {baseline}" if baseline else ""))
    typer.echo(res.table())
    scoring = res.settings["scoring_precision"]
    typer.echo("scoring: " + "; ".join(
        f"{role} {s['scoring']}" + (f" ({len(run.rescored[role])} items re-scored)" if s["bound"] else "")
        for role, s in scoring.items()))
    significant = res.details.get("significant", [])
    if baseline:
        typer.echo("significant deltas (95 % CI excludes 0): " + (", ".join(significant) if significant else "none"))
    if show_examples:
        typer.echo("\n".join(examples(run, subset.items, show_examples)))
    typer.echo(f"wrote {path}")
