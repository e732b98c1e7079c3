"""A model as it is deployed: written as a GGUF file at a quant type (`models.gguf_export`) and timed in llama.cpp
(`eval.speed`). `gguf_row` is one such measurement, shared by `benchmarks/deploy_speed.py` and the pipeline's
`export` stage; `deployment_results` turns a model's rows into the stage's Results (kind "deployment", one group
per quant type), with the student's ratios to the teacher where the teacher was measured too.
"""
from __future__ import annotations

import os
import time
from typing import Any

from pocketlm.eval.speed import SpeedSettings, measure
from pocketlm.models.gguf_export import export_gguf, gguf_file_bytes, tokenizer_source
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results

# (name, unit, higher is better) of each figure a row carries, per quant type
FIGURES = (("file_bytes", "bytes", False), ("prompt_tokens_per_s", "tokens/s", True),
           ("decode_tokens_per_s", "tokens/s", True), ("ttft_s", "s", False), ("peak_rss_bytes", "bytes", False))
# the student against the teacher at the same quant type: (name, figure, teacher ÷ student?)
RATIOS = (("decode_speedup", "decode_tokens_per_s", False), ("prompt_speedup", "prompt_tokens_per_s", False),
          ("times_smaller", "file_bytes", True), ("memory_ratio", "peak_rss_bytes", False))


def gguf_row(model: Any, tokenizer: Any, folder: str | os.PathLike, quant: str, prompts: list[list[int]],
             settings: SpeedSettings) -> dict[str, Any]:
    """Write `model` as `folder/model-<quant>.gguf` (the output-folder rules of `export_gguf`; the tokenizer keys
    copied from the embedded teacher's GGUF when the vocabulary is its) and time that file in llama.cpp. The row:
    `measure`'s figures plus the file's path, its size on disk and its bytes by tensor type."""
    t0 = time.perf_counter()
    path = export_gguf(model, folder, tokenizer, quant, tokenizer_gguf=tokenizer_source(tokenizer))
    export_s = time.perf_counter() - t0
    row = measure("llama.cpp", path, quant, prompts, settings)
    return {**row, "file": str(path), "file_bytes": os.path.getsize(path), "export_s": export_s,
            "wall_s": time.perf_counter() - t0, "gguf": gguf_file_bytes(path)}


def _metrics(rows: dict[str, dict[str, Any]], repeats: int) -> list[Metric]:
    return [Metric(name, float(row[name]), n=1 if name == "file_bytes" else repeats, higher_is_better=hib,
                   group=quant, unit=unit) for quant, row in rows.items() for name, unit, hib in FIGURES]


def ratio_metrics(student: dict[str, dict[str, Any]], teacher: dict[str, dict[str, Any]]) -> list[Metric]:
    """The student's figures over the teacher's at each quant type both were measured at: decode and prompt
    speed-up (student ÷ teacher tokens/s), times smaller (teacher ÷ student file bytes), memory ratio (student ÷
    teacher peak resident set)."""
    out = []
    for quant in [q for q in student if q in teacher]:
        s, t = student[quant], teacher[quant]
        for name, figure, inverted in RATIOS:
            value = t[figure] / s[figure] if inverted else s[figure] / t[figure]
            out.append(Metric(name, float(value), n=1, higher_is_better=name != "memory_ratio", group=quant,
                              unit="×"))
    return out


def deployment_results(rows: dict[str, dict[str, Any]], info: dict[str, Any], settings: SpeedSettings, *,
                       files: dict[str, str], baseline: tuple[dict[str, Any], dict[str, dict[str, Any]]] | None = None
                       ) -> Results:
    """A model's deployment Results from its `gguf_row`s by quant type; `files`: each quant's file as the report
    names it (a path relative to the run's folder); `baseline`: (the teacher's info, its rows) for the ratios."""
    first = next(iter(rows.values()))
    metrics = _metrics(rows, settings.repeats)
    if baseline is not None:
        metrics += ratio_metrics(rows, baseline[1])
    details = {"files": files, "rows": {q: {k: v for k, v in r.items() if k not in ("file", "path")}
                                        for q, r in rows.items()}}
    return Results(
        kind="deployment", model=info, baseline=None if baseline is None else baseline[0],
        data={"source": "pocketlm.eval.speed.PROMPTS", "n": len(first["prompt_tokens"]),
              "prompt_tokens": first["prompt_tokens"]},
        settings={"engine": "llama.cpp", "batch_size": 1, "decoding": "greedy", "quants": list(rows),
                  **{k: v for k, v in first["settings"].items() if k != "timeout_s"},
                  "versions": first["versions"],
                  "figures": "median over repeats of Σ tokens / Σ seconds; peak memory: the worker's VmHWM"},
        metrics=metrics, details=details, provenance=provenance(),
        wall_time_s=sum(r["wall_s"] for r in rows.values()))
