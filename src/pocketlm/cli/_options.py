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
