"""`pocketlm run PIPELINE.yaml`: the whole pipeline, with an exit code CI can gate a release on.

0: every gate passed (or none is configured) · 1: a gate failed or could not be verified · 2: a config or input
error (including a gate that names a result that does not exist).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, _fail, app


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="Pipeline YAML (see configs/pipeline_*.yaml)."),
    force: List[str] = typer.Option([], "--force", help="Redo this stage even if its stored results match "
                                                        "(repeatable): distill, ce_baseline, perplexity, rouge, "
                                                        "bias, toxicity, size, attention, export."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set train.steps=100 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget per model for its weights "
                                             "and one batch, e.g. 2GiB (the config's max_memory)."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Distill → evaluate → audit → inspect (→ export), then results.json, an HTML report, a model card and the
    gates."""
    from pocketlm.config_pipeline import load_pipeline_config
    from pocketlm.pipeline import run_pipeline

    try:
        cfg = load_pipeline_config(config, [*set_, *([f"max_memory={max_memory}"] if max_memory else [])])
        outcome = run_pipeline(cfg, force=force, progress=not quiet, overwrite=overwrite)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(summary(outcome.doc))
    for g in outcome.gates:
        figures = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = n/a" for k, v in g["values"].items())
        typer.echo(f"gate {g['status'].upper():10s} {g['name']}" + (f"  ({figures})" if figures else "")
                   + (f"  — {g['message']}" if g.get("message") else ""))
    verdict = outcome.doc["verdict"]
    typer.echo(f"stages run: {', '.join(outcome.ran) or 'none'}; reused: {', '.join(outcome.reused) or 'none'}")
    typer.echo(f"results: {outcome.results_path}")
    if outcome.card_path:
        typer.echo(f"model card: {outcome.card_path}")
    typer.echo(f"verdict: {verdict.upper()}")
    typer.echo(f"report: {outcome.report_path.resolve()}")
    raise typer.Exit(outcome.exit_code)


def summary(doc: dict) -> str:
    """Each measured set's headline figures, one column per model, and the student − teacher delta."""
    from pocketlm.report.html import comparison_rows, fmt_number, results_by_entry

    by_entry = results_by_entry(doc)
    roles = list(doc["models"])
    lines = [("set", "figure", *roles, "delta (student - teacher) [95% CI]")]
    for entry, by_role in by_entry.items():
        if entry in ("distill", "parameters", "size", "attention"):
            continue
        rows = comparison_rows(by_role)
        kind = next(iter(by_role.values()))["kind"]
        keep = 2 if kind == "toxicity" else 1
        for r in rows[:keep]:
            d = r["delta"]
            delta = "" if not d else fmt_number(d["value"]) + (
                f" [{fmt_number(d['ci'][0])}, {fmt_number(d['ci'][1])}]" if d.get("ci") else "")
            lines.append((entry, r["name"], *(fmt_number(r["cells"][x]["value"]) if r["cells"].get(x) else ""
                                              for x in roles), delta))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
