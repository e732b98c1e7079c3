"""Range checks for CLI options that click's own cannot make: a float option must be a finite number (click's
FloatRange lets NaN through, since every comparison with NaN is false)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import typer


def finite(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[Optional[float]], Optional[float]]:
    """A typer callback refusing NaN, ±inf and values outside [low, high] (an open end excludes its bound)."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    want = " and ".join(x for x in (lo, hi) if x)

    def check(value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        ok = math.isfinite(value)
        ok = ok and (low is None or value > low or (value == low and not low_open))
        ok = ok and (high is None or value < high or (value == high and not high_open))
        if not ok:
            raise typer.BadParameter(f"{value} is not a finite number {want}".rstrip())
        return value

    return check


# the document options of the commands that read a text source (prune, prune-heads)
FIELD = typer.Option("text", help="Text field of .jsonl/.parquet/dataset rows.")
SPLIT = typer.Option("train", help="Dataset split (Hugging Face datasets only).")
TXT_SPLIT = typer.Option("blank_lines", help="How one .txt file is cut into documents.")
MAX_DOCUMENTS = typer.Option(None, min=1, help="Use only the first N documents.")
VAL_FRACTION = typer.Option(0.2, callback=finite(0, 1, high_open=True), help="Share of documents held out for "
                                                                               "perplexity.")
MAX_LENGTH = typer.Option(None, min=1, help="Perplexity window (default: the model's context).")
