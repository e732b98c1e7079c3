"""`pocketlm eval perplexity`."""
from __future__ import annotations

import json
from typing import Optional

import typer

from pocketlm.cli._common import _EXPECTED, _fail, eval_app


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


