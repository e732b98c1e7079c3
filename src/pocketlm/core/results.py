"""Results are data: every evaluation, audit and inspection returns a typed result that serialises to JSON.

The schema (version 1) is what the report, the model card and the release gates read, and nothing else:

```
{"schema": "pocketlm.results/1", "kind": "perplexity" | "rouge" | ..., "model": {"spec", "fingerprint"},
 "baseline": {...} | null, "data": {"source", "hash", "n"}, "settings": {...},
 "metrics": [{"name", "value", "ci": [lo, hi] | null, "n", "higher_is_better", "group", "unit"}],
 "details": {...}, "provenance": {"packages", "git_commit", "hardware"}, "wall_time_s": float}
```

A metric is identified by ``(name, group)``: ``group`` is None for the overall figure and names the slice
("race", "gender/female", ...) otherwise. ``ci`` is a 95 % confidence interval where one was computed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pocketlm.core.io import write_text_atomic

SCHEMA = "pocketlm.results/1"


@dataclass(frozen=True)
class Metric:
    """One figure: its value, 95 % interval, how many items stand behind it, and which direction is good."""

    name: str
    value: float | None
    n: int
    ci: tuple[float, float] | None = None
    higher_is_better: bool | None = None
    group: str | None = None
    unit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = _finite_or_none(self.value)
        d["ci"] = None if self.ci is None else [_finite_or_none(self.ci[0]), _finite_or_none(self.ci[1])]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metric:
        ci = d.get("ci")
        return cls(
            name=d["name"], value=d.get("value"), n=int(d.get("n", 0)),
            ci=None if ci is None else (ci[0], ci[1]), higher_is_better=d.get("higher_is_better"),
            group=d.get("group"), unit=d.get("unit"),
        )


def _first_non_finite(doc: Any, where: str = "") -> str | None:
    """The dotted path and value of the first NaN or infinite float in a JSON-like document, or None."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return f"{where or '(top)'} = {doc}"
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, (list, tuple)) else ()
    for k, v in items:
        found = _first_non_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Results:
    """One stage's results for one model (optionally against a baseline model)."""

    kind: str
    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    metrics: list[Metric]
    details: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float | None = None

    def get(self, name: str, group: str | None = None) -> Metric:
        for m in self.metrics:
            if m.name == name and m.group == group:
                return m
        have = sorted({f"{m.name}" + (f"[{m.group}]" if m.group else "") for m in self.metrics})
        raise KeyError(f"no metric {name!r}" + (f" for group {group!r}" if group else "") + f"; have: {have}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "kind": self.kind, "model": self.model, "baseline": self.baseline, "data": self.data,
            "settings": self.settings, "metrics": [m.to_dict() for m in self.metrics], "details": self.details,
            "provenance": self.provenance, "wall_time_s": self.wall_time_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Results:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a pocketlm results document (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        return cls(
            kind=d["kind"], model=d["model"], data=d["data"], settings=d["settings"],
            metrics=[Metric.from_dict(m) for m in d["metrics"]], details=d.get("details", {}),
            baseline=d.get("baseline"), provenance=d.get("provenance", {}), wall_time_s=d.get("wall_time_s"),
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file, then rename), so a crash never leaves half a results.json."""
        path = Path(path)
        doc = self.to_dict()
        try:
            text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
        except ValueError:  # NaN or inf outside the metrics' values (which read as null): say where, write nothing
            raise ValueError(f"{path}: not written, the {self.kind} results of {self.model.get('spec', 'the model')} "
                             f"are not finite ({_first_non_finite(doc)}); the model's outputs are NaN or infinite "
                             "(check its weights)") from None
        return write_text_atomic(path, text)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Results:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None

    def table(self) -> str:
        """A plain-text table of the metrics, for the terminal."""
        return format_table(self.metrics)


def format_table(metrics: Iterable[Metric]) -> str:
    rows = [("metric", "group", "value", "95% CI", "n")]
    for m in metrics:
        ci = "" if m.ci is None else f"[{_fmt(m.ci[0])}, {_fmt(m.ci[1])}]"
        rows.append((m.name, m.group or "", _fmt(m.value), ci, str(m.n)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.4g}"
