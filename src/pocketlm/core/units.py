"""Byte sizes, read and written the way people write them. Imports nothing of pocketlm."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class MemoryBudgetError(ValueError):
    """Even the smallest batch does not fit the memory budget."""


def parse_bytes(value: str | int | float) -> int:
    """'2GiB', '512MB', '1.5 G', 1073741824 → bytes (k/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"a memory size must be a number of bytes or a string like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{value!r} is not a memory size; write e.g. 2GiB, 512MiB, 8GB or a number of bytes")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n < 1:
        raise ValueError(f"a memory budget must be positive, got {value!r}")
    return int(n)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
