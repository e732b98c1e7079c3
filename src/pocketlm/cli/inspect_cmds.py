"""`pocketlm attention` and `pocketlm prune-heads`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pocketlm.cli._options import finite
from pocketlm.cli._common import _EXPECTED, OVERWRITE, _fail, held_folder, app


@app.command("attention")
def attention(
    model: str = typer.Option(..., "--model", help="Model folder, .gguf file, hub id or smollm2-135m-instruct."),
    text: str = typer.Option(..., "--text", help="The text whose attention to show."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs, attention.html and results.json."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="A second model (e.g. the teacher) shown "
                                                                    "beside the first."),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Only this layer (default: one grid per layer)."),
    head: Optional[int] = typer.Option(None, "--head", min=0, help="Only this head of --layer (one panel)."),
    max_tokens: int = typer.Option(64, min=1, help="Refuse longer texts (heat-maps stop being readable)."),
    dtype: str = typer.Option("float32", help="Weights' dtype when loading: float32 or bfloat16."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Attention heat-maps (PNG, tokens on both axes), an interactive HTML view and per-head entropy."""
    from pocketlm.inspect.heatmap import attention_results

    with held_folder(out, kind="attention", overwrite=overwrite):
        try:
            res = attention_results(model, text, out, baseline_spec=baseline, layer=layer, head=head,
                                    max_tokens=max_tokens, dtype=dtype)
            path = res.write(out / "results.json")
        except _EXPECTED as e:
            _fail(e)
        typer.echo(res.table())
        typer.echo(f"wrote {len(res.details['files'])} files to {out} and {path}")


@app.command("prune-heads")
def prune_heads(
    model: str = typer.Option(..., "--model", help="A pocketlm student folder."),
    data: str = typer.Option(..., "--data", help=".txt file, folder of .txt, .jsonl/.parquet, or a dataset: "
                                                 "importance on part of it, perplexity on the held-out rest."),
    heads: int = typer.Option(..., "--heads", min=1, help="Query heads to remove; whole KV groups go, so with GQA a "
                                                   "multiple of the group size."),
    out: Path = typer.Option(..., "--out", help="Folder for the pruned student (out/student) and results.json."),
    field: str = typer.Option("text", help="Text field of .jsonl/.parquet/dataset rows."),
    split: str = typer.Option("train", help="Dataset split (Hugging Face datasets only)."),
    txt_split: str = typer.Option("blank_lines", help="How one .txt file is cut into documents."),
    max_documents: Optional[int] = typer.Option(None, min=1, help="Use only the first N documents."),
    val_fraction: float = typer.Option(0.2, callback=finite(0, 1, high_open=True), help="Share of documents held out for perplexity."),
    block_size: int = typer.Option(128, min=2, help="Tokens per example when measuring importance."),
    max_blocks: int = typer.Option(64, min=1, help="Most examples for importance."),
    batch_size: int = typer.Option(8, min=1, help="Examples per forward/backward pass."),
    max_length: Optional[int] = typer.Option(None, min=1, help="Perplexity window (default: the model's context)."),
    no_normalize: bool = typer.Option(False, "--no-normalize", help="Rank raw importance instead of "
                                                                    "layer-normalised importance."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the document split and bootstrap intervals."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Remove a student's least important heads (Michel et al., 2019) and report perplexity before and after."""
    from pocketlm.inspect.prune import prune_heads_results

    with held_folder(out, kind="prune-heads", overwrite=overwrite):
        try:
            res = prune_heads_results(
                model, data, heads, out, field=field, split=split, txt_split=txt_split, max_documents=max_documents,
                val_fraction=val_fraction, block_size=block_size, max_blocks=max_blocks, batch_size=batch_size,
                max_length=max_length, normalize=not no_normalize, seed=seed, progress=not quiet,
            )
            path = res.write(out / "results.json")
        except _EXPECTED as e:
            _fail(e)
        typer.echo(res.table())
        removed = ", ".join(f"layer {k}: {v}" for k, v in res.details["removed_query_heads"].items())
        typer.echo(f"removed query heads {removed}")
        typer.echo(f"wrote {res.details['student']} and {path}")
