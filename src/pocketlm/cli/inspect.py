"""`pocketlm size`, `pocketlm attention`, `pocketlm prune` and `pocketlm prune-heads`: what is inside a model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, QUIET, _fail, held_folder, remote_code
from pocketlm.cli._options import FIELD, MAX_DOCUMENTS, MAX_LENGTH, SPLIT, TXT_SPLIT, VAL_FRACTION
from pocketlm.core.outdir import check_result_file

# (label, metric name) rows of the table; rows whose value is 0 for both models are left out
ROWS: list[tuple[str, str]] = [
    ("params: embedding", "params_embedding"), ("params: attention", "params_attention"),
    ("params: MLP", "params_mlp"), ("params: routed experts", "params_experts"), ("params: router", "params_router"),
    ("params: shared experts", "params_shared_experts"), ("params: norms", "params_norms"),
    ("params: total", "params_total"), ("params: non-embedding", "params_non_embedding"),
    ("params: active per token", "params_active"),
    ("weights fp32", "weight_bytes_fp32"), ("weights bf16", "weight_bytes_bf16"),
    ("weights int8 (Q8_0)", "weight_bytes_int8"), ("weights int4 (Q4_0)", "weight_bytes_int4"),
    ("  of which int4 scales", "weight_bytes_int4_scales"),
    ("KV cache / token bf16", "kv_cache_per_token_bf16"), ("KV cache @ctx×batch bf16", "kv_cache_total_bf16"),
    ("KV cache @ctx×batch fp32", "kv_cache_total_fp32"),
    ("train fp32: weights+grads+Adam", "training_bytes_fp32_states"),
    ("train fp32: activations", "training_bytes_fp32_activations"), ("train fp32: total", "training_bytes_fp32_total"),
    ("train mixed: states+master", "training_bytes_mixed_states"),
    ("train mixed: activations", "training_bytes_mixed_activations"),
    ("train mixed: total", "training_bytes_mixed_total"),
    ("FLOPs/token fwd (executed)", "flops_forward"), ("FLOPs/token fwd (Kaplan)", "flops_forward_kaplan"),
    ("FLOPs/token train (executed)", "flops_train"), ("FLOPs/token train (Kaplan)", "flops_train_kaplan"),
    ("Chinchilla-optimal tokens", "chinchilla_tokens"),
]  # fmt: skip
NOTES = (
    "executed FLOPs: every matmul incl. lm_head, attention over the full T×T scores (4·L·T·d_attn), as "
    "FlopCounterMode counts; Kaplan: 2N non-embedding + 2·L·T·d_attn, lm_head not counted; training = 3× forward. "
    "int8/int4: groups of 32 with an fp16 scale (GGUF Q8_0/Q4_0), vectors at 16 bits. Training: AdamW, mixed = bf16 "
    "weights/grads + fp32 master + fp32 moments; activations by Korthikanti et al. 2022 without recomputation "
    "(attention scores stored; fp32 = 2× the 16-bit terms, logits fp32 in both). Chinchilla: 20 tokens per parameter. Bytes in binary "
    "units (MiB = 2^20)."
)


def human(value: float | None, unit: str | None) -> str:
    """134.5 M params, 513.0 MiB, 270.1 MFLOP, 2.69 B tokens, 0.267×."""
    if value is None:
        return "n/a"
    if unit == "ratio":
        return f"{value:.3g}×"
    if unit == "bytes":
        for size, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.2f} {name}"
        return f"{value:.0f} B"
    suffix = {"FLOPs": "FLOP", "params": "", "tokens": " tokens"}.get(unit or "", "")
    for size, name in ((1e12, "T"), (1e9, "G" if unit == "FLOPs" else "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.2f} {name}{suffix}".rstrip()
    return f"{value:.0f}{suffix}"


def tables(results: Any) -> list[Any]:
    """rich Tables of a size Results: the figures (with the baseline and ratios), and measured vs estimated."""
    from rich.table import Table

    from pocketlm.inspect.size import unit_of

    values = {m.name: m for m in results.metrics}
    base = results.baseline is not None
    s = results.settings
    main = Table(title=f"pocketlm size — context {s['context']}, batch {s['batch']}")
    main.add_column("figure")
    main.add_column(str(results.model["spec"]), justify="right")
    if base:
        main.add_column(str(results.baseline["spec"]), justify="right")
        main.add_column("ratio", justify="right")
    for label, name in ROWS:
        cells = [values[name]] + ([values[f"baseline_{name}"], values[f"ratio_{name}"]] if base else [])
        if all(not c.value for c in cells[:2]):
            continue
        main.add_row(label, *(human(c.value, c.unit) for c in cells))
    out = [main]
    for role, who in (("model", results.model), ("baseline", results.baseline)):
        file = (results.details.get(role) or {}).get("file")
        if file:
            out.append(file_table(who["spec"], file))
        measured = (results.details.get(role) or {}).get("measured")
        if not measured:
            continue
        t = Table(title=f"{who['spec']}: estimate vs measurement at context {measured['context']}, batch 1 "
                        f"({measured['source']})")
        for col in ("figure", "estimate", "measured", "error"):
            t.add_column(col, justify="left" if col == "figure" else "right")
        for name, f in measured["figures"].items():
            unit = unit_of(name)
            err = "n/a" if f["rel_error"] is None else f"{100 * f['rel_error']:+.3f} %"
            t.add_row(name, f"{f['estimate']:,.0f} ({human(f['estimate'], unit)})", f"{f['measured']:,.0f}", err)
        out.append(t)
    return out


def file_table(spec: str, file: dict) -> Any:
    """A GGUF file's real bytes by tensor type, beside the estimate at its file type's width."""
    from rich.table import Table

    t = Table(title=f"{spec}: GGUF file ({file['file_type']}) vs estimate")
    for col in ("tensors", "count", "params", "bytes"):
        t.add_column(col, justify="left" if col == "tensors" else "right")
    for kind, row in sorted(file["by_type"].items()):
        t.add_row(kind, str(row["tensors"]), human(row["params"], "params"), human(row["bytes"], "bytes"))
    t.add_row("all tensors", "", "", human(file["tensor_bytes"], "bytes"))
    t.add_row("file (with metadata)", "", "", human(file["file_bytes"], "bytes"))
    if file["estimate"] is not None:
        t.add_row(f"estimate ({file['estimate_of']})", "", "", human(file["estimate"], "bytes"))
        t.add_row("estimate error vs tensors", "", "", f"{100 * file['rel_error']:+.2f} %")
    else:
        t.add_row("estimate", "", "", f"n/a (no estimate for {file['file_type']})")
    return t


def size(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="A model folder, .gguf, hub id or smollm2-135m-instruct; or a config "
                                          "alone: a config.json or a pocketlm distillation YAML (its student)."),
    model2: Optional[str] = typer.Argument(None, help="A model to compare with, e.g. the teacher: its figures and "
                                                      "the ratios MODEL / MODEL2."),
    context: int = typer.Option(2048, "--context", min=1, help="Context length T for KV cache, attention FLOPs and "
                                                        "activations."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size for KV cache and activations."),
    measure: bool = typer.Option(False, "--measure", help="Also measure the real model (its weights, or a random "
                                                          "instance of a config): parameters, storage, KV cache, "
                                                          "FlopCounterMode FLOPs, at --measure-context."),
    measure_context: int = typer.Option(128, "--measure-context", min=1, help="Context length of the measurement."),
    json_: bool = typer.Option(False, "--json", help="Print results.json to stdout instead of tables."),
    out: Path = typer.Option(Path("outputs/size/results.json"), "--out", help="Where to write results.json."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Parameters, bytes at fp32/bf16/int8/int4, KV cache, AdamW training memory, FLOPs per token and
    Chinchilla-optimal tokens of MODEL, from its config alone; ratios against MODEL2 when given. For a .gguf file,
    also the bytes its tensors really take, by type, beside the estimate at its type's width."""
    from pocketlm.inspect.size import size_results

    try:
        check_result_file(out, overwrite=overwrite)  # before any work
        res = size_results(model, model2, context=context, batch=batch,
                           measure_context=measure_context if measure else None,
                           trust_remote_code=remote_code(ctx))
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    if json_:
        typer.echo(json.dumps(res.to_dict(), indent=2))
        return
    from rich.console import Console

    console = Console(width=max(Console().width, 110))
    for table in tables(res):
        console.print(table)
    console.print(NOTES, highlight=False)
    console.print(f"wrote {path}", highlight=False)


def attention(
    ctx: typer.Context,
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
                                    max_tokens=max_tokens, dtype=dtype, trust_remote_code=remote_code(ctx))
            path = res.write(out / "results.json")
        except _EXPECTED as e:
            _fail(e)
        typer.echo(res.table())
        typer.echo(f"wrote {len(res.details['files'])} files to {out} and {path}")


def prune_heads(
    ctx: typer.Context,
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
    quiet: bool = QUIET,
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
                trust_remote_code=remote_code(ctx),
            )
            path = res.write(out / "results.json")
        except _EXPECTED as e:
            _fail(e)
        typer.echo(res.table())
        removed = ", ".join(f"layer {k}: {v}" for k, v in res.details["removed_query_heads"].items())
        typer.echo(f"removed query heads {removed}")
        typer.echo(f"wrote {res.details['student']} and {path}")


def prune(
    ctx: typer.Context,
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
    quiet: bool = QUIET,
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
                trust_remote_code=remote_code(ctx),
            )
            path = res.write(out / "results.json")
        except _EXPECTED as e:
            _fail(e)
        typer.echo(res.table())
        typer.echo(pruned_table(res))
        typer.echo(f"wrote {res.details['student']}, {res.details['importance_file']} and {path}")
