"""`pocketlm vlm train CONFIG` / `pocketlm vlm eval` / `pocketlm vlm caption IMAGE`: vision-language students."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, _fail, app
from pocketlm.core.outdir import check_result_file

vlm_app = typer.Typer(help="Vision-language students: train (LLaVA's two stages), evaluate, caption.",
                      no_args_is_help=True)
app.add_typer(vlm_app, name="vlm")


def _show_conversions() -> None:
    """Image conversions (grayscale/RGBA → RGB) are logged as warnings: show them on stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


@vlm_app.command("train")
def vlm_train(
    config: Path = typer.Argument(..., help="YAML VLM config (see configs/vlm_shapes.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config field: --set stage2.steps=100."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Build a VLM and train it in LLaVA's two stages (projector; then projector + LM); writes output_dir/model."""
    from pocketlm.config import load_config
    from pocketlm.vlm.config import VLMConfig
    from pocketlm.vlm.train import run_train

    _show_conversions()
    try:
        cfg = load_config(VLMConfig, config, set_)
        res = run_train(cfg, progress=not quiet, overwrite=overwrite)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(res.table())
    typer.echo(f"wrote {res.details['output']} and {Path(cfg.output_dir) / 'results.json'}")


@vlm_app.command("eval")
def vlm_eval(
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
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Caption ROUGE and VQA exact match per question type, against the LM answering without the image."""
    from pocketlm.data.scenes import SceneSpec, load_caption_folder, scenes_data
    from pocketlm.vlm.config import EvalConfig
    from pocketlm.vlm.evaluate import run_eval

    _show_conversions()
    try:
        check_result_file(out, overwrite=overwrite)  # before any work
        if (images is None) != (captions is None):
            raise ValueError("give both --images and --captions (your data), or neither (built-in shape scenes)")
        settings = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, blind=not no_blind)
        data = (load_caption_folder(images, captions) if images is not None else
                scenes_data("test", n, seed=seed, spec=SceneSpec(image_size=image_size, max_shapes=max_shapes)))
        res = run_eval(str(model), data, settings=settings, blind_lm=blind_lm, seed=seed, progress=not quiet)
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(res.table())
    typer.echo(f"wrote {path}")


@vlm_app.command("caption")
def vlm_caption(
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
    from pocketlm.data.scenes import CAPTION_PROMPT
    from pocketlm.models.vision import VisionLanguageModel
    from pocketlm.core.provenance import provenance
    from pocketlm.core.results import Metric, Results
    from pocketlm.models.load import model_info
    from pocketlm.models.images import load_image
    from pocketlm.vlm.inspect import attention_over_patches, draw_patch_attention

    _show_conversions()
    start = time.perf_counter()
    try:
        check_result_file(out, overwrite=overwrite)  # before any work
        img = load_image(image)  # bad images and prompts are refused before the model is loaded
        text = prompt or CAPTION_PROMPT
        if text.count("<image>") != 1:
            raise ValueError(f"the prompt {text!r} needs exactly one <image> marker, where the image goes")
        vlm = VisionLanguageModel.load(model)
        metrics, details = [], {"image": str(image), "prompt": text}
        if attention is not None:
            pa = attention_over_patches(vlm, img, text, max_new_tokens=max_new_tokens)
            caption = pa.text
            details.update(attention_png=str(draw_patch_attention(img, pa, attention)), tokens=pa.tokens,
                           image_share=[float(x) for x in pa.image_share])
            if len(pa.tokens):
                metrics.append(Metric("image_attention_share", float(pa.image_share.mean()), len(pa.tokens)))
        else:
            caption = vlm.decode(vlm.generate([text], [img], max_new_tokens=max_new_tokens)[0])
        details["caption"] = caption
        res = Results(kind="vlm_caption", model=model_info(str(model), vlm.lm, vlm.tokenizer),
                      data={"source": str(image), "n": 1}, settings={"max_new_tokens": max_new_tokens, "greedy": True},
                      metrics=metrics, details=details, provenance=provenance(),
                      wall_time_s=time.perf_counter() - start)
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    typer.echo(caption)
    if attention is not None:
        typer.echo(f"wrote {details['attention_png']}")
    typer.echo(f"wrote {path}")
