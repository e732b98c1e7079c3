"""`pocketlm eval perplexity`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pocketlm.cli._common import _EXPECTED, OVERWRITE, _fail, eval_app
from pocketlm.core.outdir import check_result_file


@eval_app.command("perplexity")
def eval_perplexity(
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
    from pocketlm.data.text import read_documents
    from pocketlm.eval.perplexity import DETOKENIZERS, check_max_length, perplexity_results
    from pocketlm.models.load import load_model

    from pocketlm.core.units import parse_bytes

    try:
        check_result_file(out, overwrite=overwrite)  # before any work
        budget = None if max_memory is None else parse_bytes(max_memory)
        if detokenize is not None and detokenize not in DETOKENIZERS:
            raise ValueError(f"unknown --detokenize {detokenize!r}; valid: {', '.join(DETOKENIZERS)}")
        docs = read_documents(data, field=field, split=split, max_documents=max_documents, txt_split=txt_split)
        m, tok = load_model(model, dtype=dtype, max_memory=budget)
        if max_length is not None:
            check_max_length(m, tok, max_length)
        res = perplexity_results(
            m, tok, docs, model_spec=model, data_source=data, max_length=max_length, stride=stride,
            detokenize=detokenize, batch_size=batch_size, max_batch_tokens=max_batch_tokens, precision=precision,
            progress=not quiet, max_memory=budget,
        )
        res.settings["txt_split"] = txt_split
        path = res.write(out)
    except _EXPECTED as e:
        _fail(e)
    sums = res.details["sums"]
    typer.echo(f"{sums['documents']} documents, {sums['tokens']} tokens, {sums['words']} words, "
               f"{sums['bytes']} bytes; max_length {res.settings['max_length']}")
    typer.echo(res.table())
    typer.echo(f"wrote {path}")
