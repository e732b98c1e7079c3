"""The `pocketlm` command line: thin — it parses, builds a config and calls the same API a Python user calls."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from pocketlm import __version__

app = typer.Typer(
    name="pocketlm",
    help="Distill a large language model into a small one, and prove what was kept and what was lost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# errors a user can cause and fix: printed as one clear message, no traceback
_EXPECTED = (ValueError, FileNotFoundError, FileExistsError, RuntimeError, KeyError)


def _fail(e: BaseException) -> None:
    typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pocketlm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """pocketlm: distill → evaluate → audit → inspect → report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def distill(
    config: Path = typer.Argument(..., help="YAML distillation config (see configs/)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set train.steps=100 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its latest checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Distill a teacher into a student as the config says; writes checkpoints and the final student folder."""
    from pocketlm.config import DistillConfig, load_config
    from pocketlm.distill.run import run_distill

    try:
        cfg = load_config(DistillConfig, config, set_)
        result = run_distill(cfg, resume=resume, progress=not quiet)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(json.dumps(result.to_dict(), indent=2))


@app.command()
def demo(
    out: Path = typer.Option(Path("outputs/demo"), help="Where results.json and the students go."),
    set_: List[str] = typer.Option([], "--set", help="Override a demo config field, e.g. --set train.steps=30."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Distill the embedded SmolLM2-135M teacher into a student a quarter its size, against a CE-only twin."""
    from pocketlm.demo import run_demo

    try:
        run_demo(out, progress=not quiet, overrides=set_)
    except _EXPECTED as e:
        _fail(e)


@app.command()
def export(
    model: Path = typer.Argument(..., help="A pocketlm student folder (e.g. runs/x/student)."),
    out: Path = typer.Option(..., "--out", help="Folder to write."),
    format: str = typer.Option("llama", "--format", help="Export format: llama."),
    dtype: Optional[str] = typer.Option(None, help="Cast weights: float32, bfloat16, float16."),
) -> None:
    """Export a student to a plain transformers architecture that loads without pocketlm installed."""
    from pocketlm.models.hf_export import export_llama
    from pocketlm.models.load import load_model, parse_dtype

    if format != "llama":
        _fail(ValueError(f"unknown export format {format!r}; valid: llama"))
    try:
        m, tok = load_model(model)
        path = export_llama(m, out, tokenizer=tok, dtype=parse_dtype(dtype) if dtype else None)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(f"wrote {path}")


eval_app = typer.Typer(help="Evaluate any causal LM (teacher, student, exported folder, GGUF) the same way.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("perplexity")
def eval_perplexity(
    model: str = typer.Option(..., "--model", help="Model folder, .gguf file, hub id or smollm2-135m-instruct."),
    data: str = typer.Option(..., "--data", help=".txt (blank-line separated), folder of .txt, .jsonl/.parquet, "
                                                 "or a Hugging Face dataset."),
    field: str = typer.Option("text", help="Text field of .jsonl/.parquet/dataset rows."),
    split: str = typer.Option("test", help="Dataset split (Hugging Face datasets only)."),
    max_length: Optional[int] = typer.Option(None, help="Window length (default: the model's, at most 2048)."),
    stride: Optional[int] = typer.Option(None, help="Overlapping windows moving by this many tokens."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    max_documents: Optional[int] = typer.Option(None, help="Score only the first N documents."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Perplexity as lm-evaluation-harness defines it: rolling windows per document; token, word and byte level."""
    from pocketlm.data.text import read_documents
    from pocketlm.eval.perplexity import perplexity
    from pocketlm.models.load import load_model

    try:
        docs = read_documents(data, field=field, split=split, max_documents=max_documents)
        m, tok = load_model(model, dtype=dtype)
        res = perplexity(m, tok, docs, max_length=max_length, stride=stride, batch_size=batch_size)
    except _EXPECTED as e:
        _fail(e)
    d = res.to_dict()
    if json_out:
        typer.echo(json.dumps(d, indent=2))
        return
    for key in ("documents", "tokens", "words", "bytes", "token_perplexity", "word_perplexity", "byte_perplexity",
                "bits_per_byte"):
        val = d.get(key)
        typer.echo(f"{key:>17}: {val:.4f}" if isinstance(val, float) else f"{key:>17}: {val}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
