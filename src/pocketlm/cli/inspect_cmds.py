"""`pocketlm attention`, `pocketlm prune` and `pocketlm prune-heads`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pocketlm.cli._options import FIELD, MAX_DOCUMENTS, MAX_LENGTH, SPLIT, TXT_SPLIT, VAL_FRACTION
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
    model: str = typer.Option(..., "--model", help="A student folder: pocketlm's layout or a Llama one (what a "
                                                   "distillation run writes)."),
    data: str = typer.Option(..., "--data", help=".txt file, folder of .txt, .jsonl/.parquet, or a dataset: "
                                                 "importance on part of it, perplexity on the held-out rest."),
    heads: int = typer.Option(..., "--heads", min=1, help="Query heads to remove; whole KV groups go, so with GQA a "
                                                   "multiple of the group size."),
    out: Path = typer.Option(..., "--out", help="Folder for the pruned student (out/student) and results.json."),
    field: str = FIELD,
    split: str = SPLIT,
    txt_split: str = TXT_SPLIT,
    max_documents: Optional[int] = MAX_DOCUMENTS,
    val_fraction: float = VAL_FRACTION,
    block_size: int = typer.Option(128, min=2, help="Tokens per example when measuring importance."),
    max_blocks: int = typer.Option(64, min=1, help="Most examples for importance."),
    batch_size: int = typer.Option(8, min=1, help="Examples per forward/backward pass."),
    max_length: Optional[int] = MAX_LENGTH,
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


@app.command("prune")
def prune(
    model: str = typer.Option(..., "--model", help="A Llama-family model (folder, .gguf, hub id, "
                                                   "smollm2-135m-instruct) or a dense pocketlm student."),
    data: str = typer.Option(..., "--data", help=".txt file, folder of .txt, .jsonl/.parquet, or a dataset: "
                                                 "calibration on part of it, perplexity on the held-out rest."),
    out: Path = typer.Option(..., "--out", help="Folder for the pruned student (out/student), importance.json "
                                                "and results.json."),
    target_params: Optional[str] = typer.Option(None, "--target-params", help="Keep this share of the "
                                                "non-embedding parameters, e.g. 50% (see --axis)."),
    axis: str = typer.Option("width", help="How --target-params is met: width (hidden and MLP shrunk together) "
                                           "or depth (the layers of highest importance)."),
    num_layers: Optional[int] = typer.Option(None, min=1, help="Keep this many layers (by importance)."),
    hidden_size: Optional[int] = typer.Option(None, min=1, help="Keep this many residual channels."),
    intermediate_size: Optional[int] = typer.Option(None, min=1, help="Keep this many MLP channels per layer."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", min=1, help="Keep this many KV groups per layer "
                                           "(with their query heads)."),
    depth_metric: str = typer.Option("block_influence", help="Rank layers by block_influence or perplexity "
                                                             "(the increase when the layer alone is removed)."),
    data_format: str = typer.Option("auto", "--format", help="auto, or books: a folder of plain-text books, one "
                                                              "document each (Latin-1 and Gutenberg matter handled)."),
    field: str = FIELD,
    split: str = SPLIT,
    txt_split: str = TXT_SPLIT,
    max_documents: Optional[int] = MAX_DOCUMENTS,
    val_fraction: float = VAL_FRACTION,
    block_size: int = typer.Option(256, min=2, help="Tokens per calibration block."),
    calibration_blocks: int = typer.Option(256, min=1, help="Calibration blocks for the importance pass."),
    removal_blocks: int = typer.Option(16, min=0, help="Blocks for each layer's removal perplexity (0: skip)."),
    batch_size: int = typer.Option(8, min=1, help="Blocks per forward pass."),
    max_length: Optional[int] = MAX_LENGTH,
    bf16: bool = typer.Option(False, "--bf16", help="Measure importance under bf16 autocast (faster on CPUs "
                                                    "with bf16 units)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the document split and the calibration sample."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Prune a model to a target size by calibration importance (Minitron / ShortGPT) and report perplexity
    before and after; the result trains with `student.init: pruned` or loads as it is."""
    from pocketlm.inspect.prune_model import prune_results, pruned_table
    from pocketlm.models.pruning import PruneTarget

    target = PruneTarget(num_layers=num_layers, intermediate_size=intermediate_size, num_key_value_heads=kv_heads,
                         hidden_size=hidden_size, target_params=target_params, axis=axis, depth_metric=depth_metric)
    if data_format not in ("auto", "books"):
        _fail(ValueError(f"--format: unknown {data_format!r}; valid: auto, books"))
    with held_folder(out, kind="prune", overwrite=overwrite):
        try:
            res = prune_results(
                model, data, target, out, data_format=data_format, field=field, split=split, txt_split=txt_split,
                max_documents=max_documents, val_fraction=val_fraction, block_size=block_size,
                calibration_blocks=calibration_blocks, removal_blocks=removal_blocks, batch_size=batch_size,
                max_length=max_length, bf16=bf16, seed=seed, progress=not quiet,
            )
            path = res.write(out / "results.json")
        except _EXPECTED as e:
            _fail(e)
        typer.echo(res.table())
        typer.echo(pruned_table(res))
        typer.echo(f"wrote {res.details['student']}, {res.details['importance_file']} and {path}")
