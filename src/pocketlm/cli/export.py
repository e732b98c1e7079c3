"""`pocketlm export MODEL --out DIR`: a student as a plain transformers folder, or any Llama-layout model as GGUF."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, _fail, remote_code

FORMATS = ("llama", "gguf")


def check_options(format: str, dtype: str | None, quant: str | None, tokenizer_from: Path | None) -> None:
    """Refuse options that do not belong to the chosen --format (before anything loads)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    gguf_only = [name for name, v in (("--quant", quant), ("--tokenizer-from", tokenizer_from)) if v is not None]
    if format == "llama" and gguf_only:
        raise ValueError(f"{', '.join(gguf_only)} apply to --format gguf")
    if format == "gguf" and dtype is not None:
        raise ValueError("--dtype applies to --format llama; a GGUF file's number format is --quant")


def export_model(model: Path, out: Path, format: str, *, dtype: str | None, quant: str | None,
                 tokenizer_from: Path | None, overwrite: bool, trust_remote_code: bool | None) -> Path:
    """The quant name and the out folder checked before the model loads; then `export_gguf` or `export_llama`."""
    from pocketlm.core.outdir import check_folder
    from pocketlm.models.gguf_export import export_gguf, quant_type, tokenizer_source
    from pocketlm.models.hf_export import export_llama
    from pocketlm.models.load import load_model, parse_dtype

    if format == "gguf":
        quant_type(quant or "f16")  # an unknown or K-quant name, before the model loads
    check_folder(out, kind="export", overwrite=overwrite)  # before the model loads
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    if format == "gguf":
        return export_gguf(m, out, tok, quant or "f16", tokenizer_gguf=tokenizer_source(tok, tokenizer_from),
                           overwrite=overwrite)
    return export_llama(m, out, tokenizer=tok, dtype=parse_dtype(dtype) if dtype else None, overwrite=overwrite)


def export(
    ctx: typer.Context,
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
    try:
        check_options(format, dtype, quant, tokenizer_from)
        path = export_model(model, out, format, dtype=dtype, quant=quant, tokenizer_from=tokenizer_from,
                            overwrite=overwrite, trust_remote_code=remote_code(ctx))
    except _EXPECTED as e:
        _fail(e)
    typer.echo(f"wrote {path}")
