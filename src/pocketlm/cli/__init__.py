"""The `pocketlm` command line: thin — it parses, builds a config and calls the same API a Python user calls.

One module per command group, each registering its commands on the apps of `_common`: `eval_cmds` (perplexity,
rouge), `audit_cmds` (toxicity, bias). Importing this package assembles the whole app.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from pocketlm import __version__
from pocketlm.cli._common import _EXPECTED, OVERWRITE, _fail, app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pocketlm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow models and tokenizers whose "
                                           "repository ships its own Python code to run it (off by default)."),
) -> None:
    """pocketlm: distill → evaluate → audit → inspect → report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if trust_remote_code:
        from pocketlm.models.load import REMOTE_CODE_ENV

        os.environ[REMOTE_CODE_ENV] = "1"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun / accelerate launch: join the group
        from pocketlm.core import distributed

        distributed.init()


@app.command()
def distill(
    config: Path = typer.Argument(..., help="YAML distillation config (see configs/)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set train.steps=100 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its latest checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for the teacher cache "
                                             "build (weights + one batch), e.g. 2GiB (the config's max_memory)."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Distill a teacher into a student as the config says; writes checkpoints and the final student folder."""
    from pocketlm.config import DistillConfig, load_config
    from pocketlm.distill.run import run_distill

    try:
        cfg = load_config(DistillConfig, config, [*set_, *([f"max_memory={max_memory}"] if max_memory else [])])
        result = run_distill(cfg, resume=resume, progress=not quiet, overwrite=overwrite)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(json.dumps(result.to_dict(), indent=2))


@app.command()
def demo(
    out: Path = typer.Option(Path("outputs/demo"), help="Where results.json and the students go."),
    set_: List[str] = typer.Option([], "--set", help="Override a demo config field, e.g. --set train.steps=30."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Distill the embedded SmolLM2-135M teacher into a student a quarter its size, against a CE-only twin."""
    from pocketlm.demo import run_demo

    try:
        run_demo(out, progress=not quiet, overrides=set_, overwrite=overwrite)
    except _EXPECTED as e:
        _fail(e)


@app.command()
def export(
    model: Path = typer.Argument(..., help="A folder in pocketlm's layout (e.g. runs/x/checkpoints/step-000200; "
                                           "runs/x/student is already Llama or Mixtral where those hold it); with "
                                           "--format gguf, any Llama-layout model pocketlm loads (folder, .gguf, "
                                           "embedded teacher)."),
    out: Path = typer.Option(..., "--out", help="Folder to write."),
    format: str = typer.Option("llama", "--format", help="Export format: llama (a transformers folder) or gguf "
                                                         "(one GGUF file for llama.cpp and transformers)."),
    dtype: Optional[str] = typer.Option(None, help="--format llama: cast weights to float32, bfloat16, float16."),
    quant: Optional[str] = typer.Option(None, "--quant", help="--format gguf: f32, f16 (default), bf16, q8_0, q5_1, "
                                                              "q5_0, q4_1, q4_0."),
    tokenizer_from: Optional[Path] = typer.Option(
        None, "--tokenizer-from", help="--format gguf: a .gguf of the same vocabulary whose tokenizer (pre-tokenizer, "
        "merges, chat template) is copied; default: the embedded teacher's when the vocabulary is its own, otherwise "
        "built from the model's tokenizer."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Export a student to a plain transformers architecture that loads without pocketlm installed, or a
    Llama-layout model to one GGUF file (quantised with --quant) that llama.cpp runs."""
    from pocketlm.models.load import load_model, parse_dtype
    from pocketlm.core.outdir import check_folder

    if format not in ("llama", "gguf"):
        _fail(ValueError(f"unknown export format {format!r}; valid: llama, gguf"))
    gguf_only = [name for name, v in (("--quant", quant), ("--tokenizer-from", tokenizer_from)) if v is not None]
    if format == "llama" and gguf_only:
        _fail(ValueError(f"{', '.join(gguf_only)} apply to --format gguf"))
    if format == "gguf" and dtype is not None:
        _fail(ValueError("--dtype applies to --format llama; a GGUF file's number format is --quant"))
    try:
        if format == "gguf":
            from pocketlm.models.gguf_export import export_gguf, quant_type, tokenizer_source

            quant_type(quant or "f16")  # an unknown or K-quant name, before the model loads
        check_folder(out, kind="export", overwrite=overwrite)  # before the model loads
        m, tok = load_model(model)
        if format == "gguf":
            path = export_gguf(m, out, tok, quant or "f16", tokenizer_gguf=tokenizer_source(tok, tokenizer_from),
                               overwrite=overwrite)
        else:
            from pocketlm.models.hf_export import export_llama

            path = export_llama(m, out, tokenizer=tok, dtype=parse_dtype(dtype) if dtype else None,
                                overwrite=overwrite)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(f"wrote {path}")


from pocketlm.cli import eval_cmds  # noqa: E402,F401  (registers `pocketlm eval ...`)
from pocketlm.cli import rouge_cmd  # noqa: E402,F401  (registers `pocketlm eval rouge`)
from pocketlm.cli import audit_bias_cmds  # noqa: E402,F401  (registers `pocketlm audit bias`)
from pocketlm.cli import audit_tox_cmds  # noqa: E402,F401  (registers `pocketlm audit scorer-check/toxicity/probes`)
from pocketlm.cli import size_cmd  # noqa: E402,F401  (registers `pocketlm size`)
from pocketlm.cli import run_cmd  # noqa: E402,F401  (registers `pocketlm run`)
from pocketlm.cli import inspect_cmds  # noqa: E402,F401  (registers `pocketlm attention`, `pocketlm prune-heads`)
from pocketlm.cli import vlm_cmds  # noqa: E402,F401  (registers `pocketlm vlm train/eval/caption`)
