"""`pocketlm eval perplexity` and `pocketlm eval rouge`: any causal LM evaluated the same way."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, QUIET, _fail, remote_code
from pocketlm.core.outdir import check_result_file


def eval_perplexity(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help="Model folder, .gguf file, hub id or smollm2-135m-instruct."),
    data: str = typer.Option(..., "--data", help=".txt file, folder of .txt (one document each), .jsonl/.parquet, "
                                                 "or a Hugging Face dataset."),
    field: str = typer.Option("text", help="Text field of .jsonl/.parquet/dataset rows."),
    split: str = typer.Option("test", help="Dataset split (Hugging Face datasets only)."),
    txt_split: str = typer.Option("blank_lines", help="How one .txt file is cut into documents: blank_lines, "
                                                      "wikitext_headings (at each ' = Title = ' line) or lines."),
    max_length: Optional[int] = typer.Option(None, min=1, help="Window length (default: the model's context, as lm-eval)."),
    stride: Optional[int] = typer.Option(None, min=1, help="Overlapping windows moving by this many tokens."),
    detokenize: Optional[str] = typer.Option(None, help="Detokenise before scoring: wikitext (lm-eval's task)."),
    batch_size: int = typer.Option(8, min=1, help="Most windows per forward pass."),
    max_batch_tokens: int = typer.Option(16384, min=1, help="Most padded tokens per forward pass (bounds memory)."),
    max_documents: Optional[int] = typer.Option(None, min=1, help="Score only the first N documents."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for the weights and one "
                                             "batch, e.g. 2GiB: batches shrink to fit; refused if one window "
                                             "does not."),
    dtype: str = typer.Option("float32", help="Weights' dtype when loading: float32 or bfloat16."),
    precision: str = typer.Option("auto", help="fp32; bf16 (the model body in bf16 autocast, output layer and "
                                               "log-softmax in fp32: ~2x faster, figures within 0.02 % of fp32 "
                                               "as measured); auto = bf16 where the hardware runs it natively."),
    out: Path = typer.Option(Path("results/perplexity.json"), "--out", help="Where to write results.json."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Perplexity as lm-evaluation-harness defines it: rolling windows per document; token, word and byte level."""
    from pocketlm.core.units import parse_bytes
    from pocketlm.eval.perplexity import evaluate_perplexity

    try:
        check_result_file(out, overwrite=overwrite)  # before any work
        res = evaluate_perplexity(
            model, data, field=field, split=split, txt_split=txt_split, max_documents=max_documents,
            max_length=max_length, stride=stride, detokenize=detokenize, batch_size=batch_size,
            max_batch_tokens=max_batch_tokens, max_memory=None if max_memory is None else parse_bytes(max_memory),
            dtype=dtype, precision=precision, progress=not quiet, trust_remote_code=remote_code(ctx),
        )
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    sums = res.details["sums"]
    typer.echo(f"{sums['documents']} documents, {sums['tokens']} tokens, {sums['words']} words, "
               f"{sums['bytes']} bytes; max_length {res.settings['max_length']}")
    typer.echo(res.table())
    typer.echo(f"wrote {path}")


def _unescape(text: str) -> str:
    """'\\n' and '\\t' typed on a shell command line mean a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def eval_rouge(
    ctx: typer.Context,
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
    quiet: bool = QUIET,
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
                        dtype=dtype, progress=not quiet, trust_remote_code=remote_code(ctx))
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    if show_examples > 0:
        typer.echo(format_examples(res, show_examples) + "\n")
    typer.echo(f"{res.settings['task']}: n={res.data['n']} of {res.data['n_source']}, "
               f"truncated prompts={res.details['truncated_prompts']}, wall time {res.wall_time_s:.1f} s")
    typer.echo(res.table())
    typer.echo(f"wrote {path}")
