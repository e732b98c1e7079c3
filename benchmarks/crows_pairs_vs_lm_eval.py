#!/usr/bin/env python
"""CrowS-Pairs: pocketlm against lm-evaluation-harness's ``crows_pairs_english`` on the same model and CSV, in one run.

Both score the pairs of ``../shared/data/crows_pairs/crows_pairs_anonymized.csv`` (or a seeded random subset of
``--limit`` pairs), from the same temporary CSVs, at each ``--max-length`` (both tools' cap on input tokens):

* lm-eval: a local task — ``dataset_path: csv`` over that file, with ``crows_pairs_english``'s ``doc_to_text: ""``,
  ``target_delimiter: ""``, ``doc_to_choice`` and ``process_results`` (the harness's own functions) — through
  ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapping the loaded model, fp32 (the harness's default), with
  ``log_samples`` on so that each pair's decision can be compared.
* pocketlm: ``load_suite`` + ``audit_bias`` (lm-eval's encoding, batched `score_continuations`, plus 95 % bootstrap
  intervals overall and per bias type) on the same model object, at each ``--precision`` — by default only
  ``auto``, pocketlm's default for bias suites: bf16 (the model body in bf16 autocast, the output layer and
  log-softmax in fp32), then fp32 again for every pair whose |ll_more − ll_less| lies within the bf16 error bound
  (`pocketlm.eval.bf16_bound`). ``fp32`` and ``bf16`` can be added for comparison.

Prints, per max_length, pct_stereotype (in %, lm-eval's fraction × 100) and likelihood_diff from each tool, their
differences (target: equal to 4 decimals), the pairs decided on a different side from lm-eval (must be 0 for fp32
and auto), the pairs re-scored in fp32, the wall times and the ratios lm-eval time / pocketlm time (target ≥ 1.8×).
The model is loaded once and warmed up before timing. The pairs are cut into ``--chunks`` parts and the runs take
turns on each part (each part starting with the next tool), so the load of a shared machine falls on all alike;
each tool's time is the sum over parts of reading the CSV, scoring and aggregating. lm-eval's one-off task indexing
(``TaskManager``) is left out of its time, which favours lm-eval.

    flock /tmp/pocketlm-heavy.lock python benchmarks/crows_pairs_vs_lm_eval.py      # all 1508 pairs, L=1024 and 2048
    python benchmarks/crows_pairs_vs_lm_eval.py --precision auto,fp32,bf16           # the three precisions
    python benchmarks/crows_pairs_vs_lm_eval.py --limit 30 --chunks 2 --max-length 1024   # smoke run
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


def run_lm_eval(model, tokenizer, task_manager, task: str, batch_size: int, max_length: int) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=True)
    res = out["results"][task]
    samples = sorted(out["samples"][task], key=lambda x: x["doc_id"])
    return {"pct_stereotype": 100.0 * res["pct_stereotype,none"], "likelihood_diff": res["likelihood_diff,none"],
            "more_likelier": [float(x["pct_stereotype"]) for x in samples], "rescored": 0}


def run_pocketlm(model, tokenizer, data: Path, batch_size: int, max_length: int, precision: str) -> dict:
    from pocketlm.audit.bias import audit_bias
    from pocketlm.data.suites import load_suite

    suite = load_suite("crows_pairs", data)
    res, run = audit_bias("crows_pairs", suite, model, tokenizer, model_spec="benchmark", batch_size=batch_size,
                          max_length=max_length, precision=precision)
    return {m: res.get(m).value for m in METRICS} | {"more_likelier": run.arrays["more_likelier"].tolist(),
                                                     "rescored": len(run.rescored["model"])}


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


def compare(max_length: int, args, model, tokenizer, chunks, task_manager, tools: list[str]) -> dict:
    """All tools over every chunk at one max_length, taking turns; pooled figures, times, flips against lm-eval."""
    times: dict[str, list[float]] = {t: [] for t in tools}
    parts: dict[str, list[dict]] = {t: [] for t in tools}
    runs = {"lm_eval": lambda k, path: run_lm_eval(model, tokenizer, task_manager, f"pocketlm_crows_{k}",
                                                   args.batch_size, max_length)}
    for t in tools[1:]:
        runs[t] = lambda k, path, p=t.split("_", 1)[1]: run_pocketlm(model, tokenizer, path, args.batch_size,
                                                                     max_length, p)
    for k, (path, _) in enumerate(chunks):
        # the tools take turns chunk by chunk, each chunk starting with the next tool, so a change in the shared
        # machine's load, or any warming up, falls on all of them alike
        for tool in tools[k % len(tools):] + tools[:k % len(tools)]:
            out, t = timed(runs[tool], k, path)
            parts[tool].append(out)
            times[tool].append(t)
        print(f"L={max_length} chunk {k + 1}/{len(chunks)}: " + ", ".join(f"{t} {times[t][-1]:.1f} s" for t in tools),
              flush=True)
    sizes = [n for _, n in chunks]
    theirs = [x for p in parts["lm_eval"] for x in p["more_likelier"]]
    out = {}
    for t in tools:
        ours = [x for p in parts[t] for x in p["more_likelier"]]
        out[t] = pooled(parts[t], sizes) | {"seconds": sum(times[t]), "chunk_seconds": times[t],
                                           "flips_vs_lm_eval": sum(a != b for a, b in zip(ours, theirs)),
                                           "rescored": sum(p["rescored"] for p in parts[t])}
    return out


def report(max_length: int, n: int, res: dict) -> tuple[float, int]:
    """Print one max_length's table; returns (worst difference from lm-eval, pairs on a different side)."""
    tools = [t for t in res if t != "lm_eval"]
    theirs = res["lm_eval"]
    print(f"\nmax_length {max_length}, {n} pairs")
    print(f"{'tool':<16} {'pct_stereotype':>15} {'diff':>9} {'likelihood_diff':>16} {'diff':>9} {'other side':>11} "
          f"{'re-scored':>10} {'time':>8} {'vs lm-eval':>11}")
    print(f"{'lm-eval fp32':<16} {theirs['pct_stereotype']:>15.4f} {'':>9} {theirs['likelihood_diff']:>16.4f} "
          f"{'':>9} {'':>11} {'':>10} {theirs['seconds']:>7.1f}s {'1.00x':>11}")
    worst, flips = 0.0, 0
    for t in tools:
        r = res[t]
        d = {m: r[m] - theirs[m] for m in METRICS}
        worst = max(worst, *(abs(v) for v in d.values()))
        if not t.endswith("bf16"):  # plain bf16 is not expected to keep every decision
            flips = max(flips, r["flips_vs_lm_eval"])
        print(f"{t.replace('_', ' '):<16} {r['pct_stereotype']:>15.4f} {d['pct_stereotype']:>+9.4f} "
              f"{r['likelihood_diff']:>16.4f} {d['likelihood_diff']:>+9.4f} {r['flips_vs_lm_eval']:>11} "
              f"{r['rescored']:>10} {r['seconds']:>7.1f}s {theirs['seconds'] / r['seconds']:>10.2f}x")
    return worst, flips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="any model pocketlm can load")
    ap.add_argument("--data", type=Path, default=CROWS, help="crows_pairs_anonymized.csv")
    ap.add_argument("--limit", type=int, default=None, help="a seeded random subset of N pairs (default: all 1508)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="sentences per forward, both tools")
    ap.add_argument("--max-length", default="1024,2048", help="comma-separated caps on input tokens, both tools")
    ap.add_argument("--precision", default="auto", help="comma-separated pocketlm precisions (auto, fp32, bf16)")
    ap.add_argument("--chunks", type=int, default=4, help="turns: each chunk of pairs is run by every tool in turn")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.max_length.split(",")]
    precisions = [x.strip() for x in args.precision.split(",")]
    if any(p not in ("auto", "fp32", "bf16") for p in precisions):
        ap.error(f"--precision: each of auto, fp32, bf16; got {args.precision!r}")

    from pocketlm.models.load import load_model

    if not args.data.is_file():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, dtype="float32")
    warm_up(model, args.batch_size)

    tools = ["lm_eval"] + [f"pocketlm_{p}" for p in precisions]
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        chunks = write_chunks(args.data, args.limit, args.seed, args.chunks, Path(tmp))
        n = sum(k for _, k in chunks)
        task_manager = lm_eval_tasks(chunks, Path(tmp) / "tasks")
        print(f"{n} pairs ({'all' if args.limit is None or n == 1508 else f'seeded subset, seed {args.seed}'}) in "
              f"{len(chunks)} chunks, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        for length in lengths:
            results[length] = compare(length, args, model, tokenizer, chunks, task_manager, tools)

    worst, flips = 0.0, 0
    for length in lengths:
        w, f = report(length, n, results[length])
        worst, flips = max(worst, w), max(flips, f)
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; times are sums "
          "over chunks (lm-eval's task indexing excluded)")
    print(f"largest difference from lm-eval: {worst:.4f} (target: 0.0000 to 4 decimals); pairs on a different side "
          f"(fp32/auto): {flips} (must be 0); targets: >= 1.8x for the default precision (auto)")
    if args.json:
        args.json.write_text(json.dumps({
            "pairs": n, "limit": args.limit, "seed": args.seed, "batch_size": args.batch_size,
            "chunks": [k for _, k in chunks], "precisions": precisions,
            "by_max_length": {str(k): {t: {m: v for m, v in r.items()} for t, r in res.items()}
                              for k, res in results.items()},
            "load_average_end": os.getloadavg()[0],
        }, indent=2))
    return 0 if flips == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
