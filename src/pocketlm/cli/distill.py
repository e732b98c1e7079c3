"""`pocketlm distill CONFIG`: a distillation run as the YAML says."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, QUIET, _fail, remote_code_overrides


def distill(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML distillation config (see configs/)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set train.steps=100 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its latest checkpoint."),
    quiet: bool = QUIET,
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for the teacher cache "
                                             "build (weights + one batch), e.g. 2GiB (the config's max_memory)."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Distill a teacher into a student as the config says; writes checkpoints and the final student folder."""
    from pocketlm.config import DistillConfig, load_config
    from pocketlm.distill.run import run_distill

    overrides = [*set_, *([f"max_memory={max_memory}"] if max_memory else []), *remote_code_overrides(ctx)]
    try:
        cfg = load_config(DistillConfig, config, overrides)
        result = run_distill(cfg, resume=resume, progress=not quiet, overwrite=overwrite)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(json.dumps(result.to_dict(), indent=2))
