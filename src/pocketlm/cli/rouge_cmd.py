"""`pocketlm eval rouge`: summarisation ROUGE, or a student's fidelity to its teacher's continuations."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, _fail, eval_app
from pocketlm.core.outdir import check_result_file


def _unescape(text: str) -> str:
    """'\\n' and '\\t' typed on a shell command line mean a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@eval_app.command("rouge")
def eval_rouge(
    model: str = typer.Option(..., "--model", help="Model folder, .gguf file, hub id or smollm2-135m-instruct."),
    data: str = typer.Option(..., "--data", help="Summarisation: .jsonl/.json/.parquet/.csv or a Hugging Face "
                                                 "dataset. Fidelity: also a .txt of prompts, one a line."),
    reference_model: Optional[str] = typer.Option(
        None, "--reference-model", help="Fidelity mode: score --model's continuations against this model's."),
    document_field: str = typer.Option("document", help="Field holding the document to summarise."),
    reference_field: str = typer.Option("summary", help="Field holding the reference summary (or a list of them)."),
    prompt_field: Optional[str] = typer.Option(
        None, help="Fidelity: field holding prompts (default: each document's first sentence; .txt: each line)."),
    split: str = typer.Option("test", help="Dataset split (Hugging Face datasets only)."),
    template: Optional[str] = typer.Option(
        None, help="Prompt template with {document} (summarisation) or {prompt} (fidelity; default '{prompt}')."),
    chat: bool = typer.Option(False, "--chat", help="Wrap prompts in the tokenizer's chat template."),
    max_prompt_tokens: Optional[int] = typer.Option(
        None, min=1, help="Cut documents so the prompt fits in this many tokens (default: context - max_new_tokens)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate per item."),
    stop: List[str] = typer.Option(["\n\n"], "--stop", help="Cut generations at this text (repeatable; default a "
                                                            "blank line)."),
    no_stop: bool = typer.Option(False, "--no-stop", help="Do not cut generations at any stop text."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per generation batch."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score a seeded random subset of N items."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed of the subset, the bootstrap and generation."),
    stem: bool = typer.Option(False, "--stem", help="Porter-stem words before matching (rouge-score's use_stemmer)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    out: Path = typer.Option(Path("outputs/rouge/results.json"), "--out", help="Where to write results.json."),
    show_examples: int = typer.Option(0, min=0, help="Print the first K (prediction, reference) pairs."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overwrite: bool = OVERWRITE,
) -> None:
    """ROUGE (rouge1/2/L/Lsum, 95 % bootstrap CIs) of greedy summaries against references, or of a student's
    continuations against a teacher's (--reference-model)."""
    from pocketlm.eval.generate import GenerationSettings
    from pocketlm.eval.rouge import RougeSettings, format_examples, run_rouge

    try:
        check_result_file(out, overwrite=overwrite)  # before any work
        settings = RougeSettings(
            template=template, chat=chat, max_prompt_tokens=max_prompt_tokens, stem=stem, limit=limit, seed=seed,
            generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                          stop=() if no_stop else tuple(_unescape(s) for s in stop)),
        )
        res = run_rouge(model, data, reference_model=reference_model, document_field=document_field,
                        reference_field=reference_field, prompt_field=prompt_field, split=split, settings=settings,
                        dtype=dtype, progress=not quiet)
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    if show_examples > 0:
        typer.echo(format_examples(res, show_examples))
        typer.echo("")
    d = res.details
    typer.echo(f"{res.settings['task']}: n={res.data['n']} of {res.data['n_source']}, "
               f"truncated prompts={d['truncated_prompts']}, wall time {res.wall_time_s:.1f} s")
    typer.echo(res.table())
    typer.echo(f"wrote {path}")
