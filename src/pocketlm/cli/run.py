"""`pocketlm run PIPELINE.yaml` (the whole pipeline, with an exit code CI can gate a release on) and
`pocketlm demo` (the embedded teacher distilled end to end).

Exit codes of `run`: 0: every gate passed (or none is configured) · 1: a gate failed or could not be verified ·
2: a config or input error (including a gate that names a result that does not exist).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, QUIET, _fail, remote_code_overrides
from pocketlm.pipeline import PIPELINE, run_pipeline
from pocketlm.report.html import run_summary


def run_cmd(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Pipeline YAML (see configs/pipeline_*.yaml)."),
    force: List[str] = typer.Option([], "--force", help="Redo this stage even if its stored results match "
                                                        f"(repeatable): {', '.join(t.name for t in PIPELINE)}."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set train.steps=100 (repeatable)."),
    quiet: bool = QUIET,
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget per model for its weights "
                                             "and one batch, e.g. 2GiB (the config's max_memory)."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Distill → evaluate → audit → inspect (→ export), then results.json, an HTML report, a model card and the
    gates."""
    from pocketlm.config_pipeline import load_pipeline_config

    overrides = [*set_, *([f"max_memory={max_memory}"] if max_memory else []), *remote_code_overrides(ctx)]
    try:
        cfg = load_pipeline_config(config, overrides)
        outcome = run_pipeline(cfg, force=force, progress=not quiet, overwrite=overwrite)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(run_summary(outcome.doc))
    for g in outcome.gates:
        typer.echo(gate_line(g))
    typer.echo(f"stages run: {', '.join(outcome.ran) or 'none'}; reused: {', '.join(outcome.reused) or 'none'}")
    typer.echo(f"results: {outcome.results_path}")
    if outcome.card_path:
        typer.echo(f"model card: {outcome.card_path}")
    typer.echo(f"verdict: {outcome.doc['verdict'].upper()}")
    typer.echo(f"report: {outcome.report_path.resolve()}")
    raise typer.Exit(outcome.exit_code)


def demo(
    out: Path = typer.Option(Path("outputs/demo"), help="Where results.json and the students go."),
    set_: List[str] = typer.Option([], "--set", help="Override a demo config field, e.g. --set train.steps=30."),
    quiet: bool = QUIET,
    overwrite: bool = OVERWRITE,
) -> None:
    """Distill the embedded SmolLM2-135M teacher into a student a quarter its size, against a CE-only twin."""
    from pocketlm.demo import run_demo

    try:
        run_demo(out, progress=not quiet, overrides=set_, overwrite=overwrite)
    except _EXPECTED as e:
        _fail(e)


def gate_line(g: dict) -> str:
    """One gate: its status, name, the figures it read and its message."""
    figures = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = n/a" for k, v in g["values"].items())
    return (f"gate {g['status'].upper():10s} {g['name']}" + (f"  ({figures})" if figures else "")
            + (f"  — {g['message']}" if g.get("message") else ""))

