"""`pocketlm vlm train CONFIG` / `pocketlm vlm eval` / `pocketlm vlm caption IMAGE`: vision-language students."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, QUIET, _fail, remote_code
from pocketlm.core.outdir import check_result_file


def _show_conversions() -> None:
    """Image conversions (grayscale/RGBA → RGB) are logged as warnings: show them on stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


def vlm_train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML VLM config (see configs/vlm_shapes.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set stage2.steps=100."),
    quiet: bool = QUIET,
    overwrite: bool = OVERWRITE,
) -> None:
    """Build a VLM and train it in LLaVA's two stages (projector; then projector + LM); writes output_dir/model."""
    from pocketlm.config import load_config
    from pocketlm.vlm.config import VLMConfig
    from pocketlm.vlm.train import run_train

    _show_conversions()
    try:
        cfg = load_config(VLMConfig, config, set_)
        res = run_train(cfg, progress=not quiet, overwrite=overwrite, trust_remote_code=remote_code(ctx))
    except _EXPECTED as e:
        _fail(e)
    typer.echo(res.table())
    typer.echo(f"wrote {res.details['output']} and {Path(cfg.output_dir) / 'results.json'}")


def vlm_eval(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", help="A VLM folder (output_dir/model of `pocketlm vlm train`)."),
    images: Optional[Path] = typer.Option(None, help="Your data: a folder of images (with --captions)."),
    captions: Optional[Path] = typer.Option(None, help="Your data: COCO-style .json or .jsonl captions/questions."),
    n: int = typer.Option(300, min=1, help="Built-in shape scenes: how many test images."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Built-in shape scenes: the data seed (and the subset and bootstrap seed)."),
    image_size: int = typer.Option(48, min=16, help="Built-in shape scenes: rendered size."),
    max_shapes: int = typer.Option(3, min=1, max=4, help="Built-in shape scenes: at most this many shapes."),
    blind_lm: Optional[str] = typer.Option(None, help="Blind baseline LM (default: the VLM's own LM, no image)."),
    no_blind: bool = typer.Option(False, "--no-blind", help="Skip the blind baseline."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score a seeded subset of N items per task."),
    max_new_tokens: int = typer.Option(24),
    batch_size: int = typer.Option(64),
    out: Path = typer.Option(Path("outputs/vlm_eval/results.json"), "--out", help="Where to write results.json."),
    quiet: bool = QUIET,
    overwrite: bool = OVERWRITE,
) -> None:
    """Caption ROUGE and VQA exact match per question type, against the LM answering without the image."""
    from pocketlm.vlm.config import EvalConfig
    from pocketlm.vlm.evaluate import eval_data, run_eval

    _show_conversions()
    try:
        check_result_file(out, overwrite=overwrite)  # before any work
        settings = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, blind=not no_blind)
        data = eval_data(images, captions, n=n, seed=seed, image_size=image_size, max_shapes=max_shapes)
        res = run_eval(str(model), data, settings=settings, blind_lm=blind_lm, seed=seed, progress=not quiet,
                       trust_remote_code=remote_code(ctx))
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(res.table())
    typer.echo(f"wrote {path}")


def vlm_caption(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="An image file."),
    model: Path = typer.Option(..., "--model", help="A VLM folder."),
    prompt: Optional[str] = typer.Option(None, help="Prompt with one <image> marker (default: the caption "
                                                    "prompt the model was trained with)."),
    attention: Optional[Path] = typer.Option(None, help="Also draw attention over patches per token to this PNG."),
    max_new_tokens: int = typer.Option(32, min=1),
    out: Path = typer.Option(Path("outputs/vlm_caption/results.json"), "--out", help="Where to write results.json."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Caption one image (or answer --prompt about it); optionally draw which patches each word attended to."""
    from pocketlm.vlm.evaluate import caption_results

    _show_conversions()
    try:
        check_result_file(out, overwrite=overwrite)  # before any work
        res = caption_results(model, image, prompt=prompt, attention=attention, max_new_tokens=max_new_tokens,
                              trust_remote_code=remote_code(ctx))
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(res.details["caption"])
    if attention is not None:
        typer.echo(f"wrote {res.details['attention_png']}")
    typer.echo(f"wrote {path}")
