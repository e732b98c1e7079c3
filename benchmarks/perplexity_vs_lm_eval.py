#!/usr/bin/env python
"""Perplexity: pocketlm against lm-evaluation-harness on the same model, documents and max_length, in one run.

Both score the first ``--documents`` WikiText-2 test articles (``../shared/data/wikitext2/wiki.test.raw`` split at
its top-level `` = Title = `` headings, as pocketlm's ``txt_split="wikitext_headings"`` reads it; ``--documents 0``:
all 62) with the harness's ``wikitext`` definition: the wikitext detokeniser, disjoint rolling windows of
max_length tokens starting with the prefix (BOS/EOS) token, words and bytes counted before detokenising, corpus
figures as ratios of sums. Each ``--max-length`` in the list is measured in turn.

* lm-eval: a local task (``dataset_path: json`` over the same documents, the harness's own ``wikitext``
  ``doc_to_target`` and ``process_results``) through ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapping the
  loaded model, fp32 (the harness's default), ``--batch-size`` windows per forward.
* pocketlm: ``pocketlm.eval.perplexity.perplexity`` on the same model object at each ``--precision`` — by default
  only ``auto``, pocketlm's default (bf16 where the hardware runs it natively: the model body in bf16 autocast, the
  output layer and log-softmax in fp32; fp32 elsewhere); ``fp32`` and ``bf16`` can be added. Perplexity has no
  decisions, so nothing is re-scored.

Prints, per max_length, word perplexity, byte perplexity and bits per byte from each, the relative differences
(target ≤ 0.1 %), median wall times over ``--repeats`` round-robin rounds and the ratios lm-eval time / pocketlm
time (target ≥ 2×). The model is loaded once before timing; lm-eval's time includes building its task from the
local file (a cost its users pay on every run).

    python benchmarks/perplexity_vs_lm_eval.py --documents 4              # 4 articles, L=1024 and 2048, auto
    python benchmarks/perplexity_vs_lm_eval.py --documents 0 --repeats 1  # the whole WikiText-2 test set
    python benchmarks/perplexity_vs_lm_eval.py --documents 1 --max-length 256 --repeats 1   # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")

TASK_YAML = """\
task: pocketlm_wikitext_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function preprocess_wikitext.wikitext_detokenizer
process_results: !function preprocess_wikitext.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 2.0
"""


def run_lm_eval(model, tokenizer, docs: list[str], max_length: int, batch_size: int, workdir: Path) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = workdir / "task"
    task_dir.mkdir(parents=True)
    data = workdir / "docs.jsonl"
    data.write_text("".join(json.dumps({"page": d}) + "\n" for d in docs), encoding="utf-8")
    (task_dir / "task.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    # the harness's own wikitext functions, re-exported next to the YAML so `!function` finds them
    (task_dir / "preprocess_wikitext.py").write_text(
        "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa\n")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=["pocketlm_wikitext_local"],
                                  task_manager=TaskManager(include_path=str(task_dir)), log_samples=False)
    res = out["results"]["pocketlm_wikitext_local"]
    return {m: res[f"{m},none"] for m in METRICS}


def run_pocketlm(model, tokenizer, docs, max_length: int, batch_size: int, precision: str) -> dict:
    from pocketlm.eval.perplexity import perplexity

    r = perplexity(model, tokenizer, docs, max_length=max_length, detokenize="wikitext", batch_size=batch_size,
                   precision=precision, progress=False)
    return {"word_perplexity": r.word_perplexity, "byte_perplexity": r.byte_perplexity,
            "bits_per_byte": r.bits_per_byte, "tokens": r.tokens}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def compare(max_length: int, args, model, tokenizer, docs, precisions: list[str]) -> dict:
    """lm-eval and each precision, round robin over ``--repeats`` rounds: figures and median times."""
    tools = ["lm_eval"] + precisions
    times: dict[str, list[float]] = {t: [] for t in tools}
    figures: dict[str, dict] = {}
    for rep in range(args.repeats):  # round robin, rotating who goes first: a busy spell hits all alike
        with tempfile.TemporaryDirectory() as tmp:
            for t in tools[rep % len(tools):] + tools[:rep % len(tools)]:
                if t == "lm_eval":
                    figures[t], sec = timed(run_lm_eval, model, tokenizer, docs, max_length, args.batch_size,
                                            Path(tmp) / str(rep))
                else:
                    figures[t], sec = timed(run_pocketlm, model, tokenizer, docs, max_length, args.batch_size, t)
                times[t].append(sec)
        print(f"L={max_length} round {rep + 1}: " + ", ".join(f"{t} {times[t][-1]:.1f} s" for t in tools), flush=True)
    return {t: figures[t] | {"seconds": statistics.median(times[t]), "rounds": times[t]} for t in tools}


def report(max_length: int, res: dict) -> float:
    """Print one max_length's table; returns the largest relative difference from lm-eval."""
    theirs = res["lm_eval"]
    tokens = next(r["tokens"] for t, r in res.items() if t != "lm_eval")
    print(f"\nmax_length {max_length}, {tokens} tokens")
    print(f"{'tool':<16}" + "".join(f"{m:>17} {'rel diff':>9}" for m in METRICS) + f" {'time':>8} {'tok/s':>6} "
          f"{'vs lm-eval':>10}")
    print(f"{'lm-eval fp32':<16}" + "".join(f"{theirs[m]:>17.6f} {'':>9}" for m in METRICS)
          + f" {theirs['seconds']:>7.1f}s {tokens / theirs['seconds']:>6.0f} {'1.00x':>10}")
    worst = 0.0
    for t, r in res.items():
        if t == "lm_eval":
            continue
        rel = {m: abs(r[m] - theirs[m]) / abs(theirs[m]) for m in METRICS}
        worst = max(worst, *rel.values())
        print(f"{'pocketlm ' + t:<16}" + "".join(f"{r[m]:>17.6f} {rel[m]:>9.4%}" for m in METRICS)
              + f" {r['seconds']:>7.1f}s {tokens / r['seconds']:>6.0f} {theirs['seconds'] / r['seconds']:>9.2f}x")
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="any model pocketlm can load")
    ap.add_argument("--data", default=str(WIKITEXT), help="WikiText raw file (split at ' = Title = ' headings)")
    ap.add_argument("--documents", type=int, default=4, help="first N articles (0: all)")
    ap.add_argument("--max-length", default="1024,2048", help="comma-separated window lengths, both tools")
    ap.add_argument("--precision", default="auto", help="comma-separated pocketlm precisions (auto, fp32, bf16)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward, both tools")
    ap.add_argument("--repeats", type=int, default=2, help="round-robin rounds; median times are reported")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.max_length.split(",")]
    precisions = [x.strip() for x in args.precision.split(",")]
    if any(p not in ("auto", "fp32", "bf16") for p in precisions):
        ap.error(f"--precision: each of auto, fp32, bf16; got {args.precision!r}")

    from pocketlm.data.text import read_documents
    from pocketlm.eval.loglik import model_device, resolve_precision
    from pocketlm.models.load import load_model

    if not Path(args.data).is_file():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2
    docs = read_documents(args.data, txt_split="wikitext_headings", max_documents=args.documents or None)
    model, tokenizer = load_model(args.model, dtype="float32")
    model.eval()
    print(f"{len(docs)} documents, {sum(len(d) for d in docs)} characters, batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}; auto resolves to {resolve_precision('auto', model_device(model))} here",
          flush=True)
    results = {length: compare(length, args, model, tokenizer, docs, precisions) for length in lengths}
    worst = max(report(length, results[length]) for length in lengths)
    print(f"\nlargest relative difference from lm-eval: {worst:.5%} (target <= 0.1 %); speed target >= 2x for the "
          "default precision (auto); perplexity makes no decisions, so nothing is re-scored")
    if args.json:
        args.json.write_text(json.dumps({
            "documents": len(docs), "batch_size": args.batch_size, "precisions": precisions,
            "by_max_length": {str(k): v for k, v in results.items()},
        }, indent=2))
    return 0 if worst <= 0.001 else 1


if __name__ == "__main__":
    sys.exit(main())
