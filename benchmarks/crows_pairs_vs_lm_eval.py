#!/usr/bin/env python
"""CrowS-Pairs: pocketlm against lm-evaluation-harness's ``crows_pairs_english`` on the same model and CSV, in one run.

Both score the pairs of ``../shared/data/crows_pairs/crows_pairs_anonymized.csv`` (or a seeded random subset of
``--limit`` pairs), from the same temporary CSVs:

* lm-eval: a local task — ``dataset_path: csv`` over that file, with ``crows_pairs_english``'s ``doc_to_text: ""``,
  ``target_delimiter: ""``, ``doc_to_choice`` and ``process_results`` (the harness's own functions) — through
  ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapping the loaded model, fp32 (the harness's default).
* pocketlm: ``load_suite`` + ``audit_bias`` (lm-eval's encoding, batched `score_continuations`, plus 95 % bootstrap
  intervals overall and per bias type) on the same model object, with ``precision="fp32"`` and ``"bf16"`` (the
  model body in bf16 autocast, the output layer and log-softmax in fp32).

Prints pct_stereotype (in %, lm-eval's fraction × 100) and likelihood_diff from each, their differences (target:
within 0.1 points), the wall times and the ratios lm-eval time / pocketlm time (target ≥ 2×). The model is loaded
once and warmed up before timing. The pairs are cut into ``--chunks`` parts and the three runs take turns on each
part (each part starting with the next tool), so the load of a shared machine falls on all alike; each tool's time
is the sum over parts of reading the CSV, scoring and aggregating. lm-eval's one-off task indexing
(``TaskManager``) is left out of its time, which favours lm-eval.

    flock /tmp/pocketlm-heavy.lock python benchmarks/crows_pairs_vs_lm_eval.py      # all 1508 pairs, ~5 min here
    python benchmarks/crows_pairs_vs_lm_eval.py --limit 30 --chunks 3               # smoke run
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

CROWS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "crows_pairs" / "crows_pairs_anonymized.csv"
METRICS = ("pct_stereotype", "likelihood_diff")

TASK_YAML = """\
task: {task}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: ""
doc_to_target: 0
doc_to_choice: !function crows_utils.doc_to_choice
target_delimiter: ""
process_results: !function crows_utils.process_results
metric_list:
  - metric: likelihood_diff
    aggregation: mean
    higher_is_better: false
  - metric: pct_stereotype
    aggregation: mean
    higher_is_better: false
metadata:
  version: 1.0
"""


def write_chunks(source: Path, limit: int | None, seed: int, chunks: int, folder: Path) -> list[tuple[Path, int]]:
    """The pairs both tools score (all rows, or pocketlm's seeded subset of ``limit`` rows), cut into ``chunks``
    CSVs of consecutive rows: [(path, pairs)]."""
    from pocketlm.data.suites import load_suite, sample_items

    keep = {it.id for it in sample_items(load_suite("crows_pairs", source), limit, seed).items}
    with source.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], [r for r in rows[1:] if r and r[0] in keep]
    out = []
    for k in range(chunks):
        part = body[k * len(body) // chunks: (k + 1) * len(body) // chunks]
        path = folder / f"crows_pairs_{k}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *part])
        out.append((path, len(part)))
    return out


def lm_eval_tasks(chunks: list[tuple[Path, int]], folder: Path):
    """One local task per chunk, and the harness's TaskManager that finds them (built once, before any clock)."""
    from lm_eval.tasks import TaskManager

    folder.mkdir()
    for k, (path, _) in enumerate(chunks):
        (folder / f"task_{k}.yaml").write_text(TASK_YAML.format(task=f"pocketlm_crows_{k}", data=path))
    # the harness's own crows_pairs functions, re-exported next to the YAMLs so `!function` finds them
    (folder / "crows_utils.py").write_text(
        "from lm_eval.tasks.crows_pairs.utils import doc_to_choice, process_results  # noqa: F401\n")
    return TaskManager(include_path=str(folder))


def run_lm_eval(model, tokenizer, task_manager, task: str, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=False)
    res = out["results"][task]
    return {"pct_stereotype": 100.0 * res["pct_stereotype,none"], "likelihood_diff": res["likelihood_diff,none"]}


def run_pocketlm(model, tokenizer, data: Path, batch_size: int, precision: str) -> dict:
    from pocketlm.audit.bias import audit_bias
    from pocketlm.data.suites import load_suite

    suite = load_suite("crows_pairs", data)
    res, run = audit_bias("crows_pairs", suite, model, tokenizer, model_spec="benchmark", batch_size=batch_size,
                          precision=precision)
    return {m: res.get(m).value for m in METRICS} | {"more_likelier": run.arrays["more_likelier"].tolist()}


def warm_up(model, batch_size: int) -> None:
    """Forwards at every input width, in fp32 and bf16, before any clock starts: a fresh model's first calls pay
    one-off costs (first touch of the weights, kernel selection) that would otherwise land on whichever tool runs
    first."""
    with torch.inference_mode():
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for width in range(4, 53, 4):
                    model(input_ids=torch.ones(batch_size, width, dtype=torch.long), use_cache=False)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def pooled(parts: list[dict], sizes: list[int]) -> dict:
    """Both figures are means over pairs, so chunk figures pool as size-weighted means."""
    n = sum(sizes)
    return {m: sum(p[m] * k for p, k in zip(parts, sizes)) / n for m in METRICS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="any model pocketlm can load")
    ap.add_argument("--data", type=Path, default=CROWS, help="crows_pairs_anonymized.csv")
    ap.add_argument("--limit", type=int, default=None, help="a seeded random subset of N pairs (default: all 1508)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="sentences per forward, both tools")
    ap.add_argument("--chunks", type=int, default=4, help="turns: each chunk of pairs is run by all three in turn")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)

    from pocketlm.models.load import load_model

    if not args.data.is_file():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, dtype="float32")
    warm_up(model, args.batch_size)

    tools = ("lm_eval", "pocketlm_fp32", "pocketlm_bf16")
    times: dict[str, list[float]] = {t: [] for t in tools}
    parts: dict[str, list[dict]] = {t: [] for t in tools}
    with tempfile.TemporaryDirectory() as tmp:
        chunks = write_chunks(args.data, args.limit, args.seed, args.chunks, Path(tmp))
        sizes = [k for _, k in chunks]
        n = sum(sizes)
        task_manager = lm_eval_tasks(chunks, Path(tmp) / "tasks")
        print(f"{n} pairs ({'all' if args.limit is None or n == 1508 else f'seeded subset, seed {args.seed}'}) in "
              f"{len(chunks)} chunks, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        runs = {
            "lm_eval": lambda k, path: run_lm_eval(model, tokenizer, task_manager, f"pocketlm_crows_{k}",
                                                   args.batch_size),
            "pocketlm_fp32": lambda k, path: run_pocketlm(model, tokenizer, path, args.batch_size, "fp32"),
            "pocketlm_bf16": lambda k, path: run_pocketlm(model, tokenizer, path, args.batch_size, "bf16"),
        }
        for k, (path, _) in enumerate(chunks):
            # the tools take turns chunk by chunk, each chunk starting with the next tool, so a change in the
            # shared machine's load, or any warming up, falls on all of them alike
            for tool in tools[k % 3:] + tools[:k % 3]:
                out, t = timed(runs[tool], k, path)
                parts[tool].append(out)
                times[tool].append(t)
            print(f"chunk {k + 1}/{len(chunks)}: " + ", ".join(f"{t} {times[t][-1]:.1f} s" for t in tools), flush=True)

    theirs, ours32, ours16 = (pooled(parts[t], sizes) for t in tools)
    t_lm, t32, t16 = (sum(times[t]) for t in tools)
    flips = sum(a != b for p32, p16 in zip(parts["pocketlm_fp32"], parts["pocketlm_bf16"])
                for a, b in zip(p32["more_likelier"], p16["more_likelier"]))

    print(f"\n{'metric':<16} {'lm-eval fp32':>13} {'pocketlm fp32':>14} {'diff':>9} {'pocketlm bf16':>14} {'diff':>9}")
    worst32 = worst16 = 0.0
    for m in METRICS:
        d32, d16 = ours32[m] - theirs[m], ours16[m] - theirs[m]
        worst32, worst16 = max(worst32, abs(d32)), max(worst16, abs(d16))
        print(f"{m:<16} {theirs[m]:>13.4f} {ours32[m]:>14.4f} {d32:>+9.4f} {ours16[m]:>14.4f} {d16:>+9.4f}")
    print(f"\nbf16 vs fp32: {flips} of {n} pairs change sides")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"wall time (sum over chunks; lm-eval's task indexing excluded): lm-eval fp32 {t_lm:.1f} s, "
          f"pocketlm fp32 {t32:.1f} s, pocketlm bf16 {t16:.1f} s")
    print(f"speed ratio lm-eval/pocketlm: fp32 {t_lm / t32:.2f}x, bf16 {t_lm / t16:.2f}x   (target >= 2x)")
    print(f"largest difference from lm-eval: fp32 {worst32:.4f}, bf16 {worst16:.4f} points   (target <= 0.1)")
    if args.json:
        args.json.write_text(json.dumps({
            "pairs": n, "limit": args.limit, "seed": args.seed, "batch_size": args.batch_size, "chunks": sizes,
            "lm_eval": theirs, "pocketlm_fp32": ours32, "pocketlm_bf16": ours16, "bf16_flips": flips,
            "seconds": times, "load_average_end": os.getloadavg()[0],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
