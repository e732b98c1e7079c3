#!/usr/bin/env python
"""Perplexity: pocketlm against lm-evaluation-harness on the same model, documents and max_length, in one run.

Both score the first ``--documents`` WikiText-2 test articles (``../shared/data/wikitext2/wiki.test.raw`` split at
its top-level `` = Title = `` headings, as pocketlm's ``txt_split="wikitext_headings"`` reads it) with the
harness's ``wikitext`` definition: the wikitext detokeniser, disjoint rolling windows of ``--max-length`` tokens
starting with the prefix (BOS/EOS) token, words and bytes counted before detokenising, corpus figures as ratios
of sums.

* lm-eval: a local task (``dataset_path: json`` over the same documents, the harness's own ``wikitext``
  ``doc_to_target`` and ``process_results``) through ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapping the
  loaded model, fp32 (the harness's default), ``--batch-size`` windows per forward.
* pocketlm: ``pocketlm.eval.perplexity.perplexity`` on the same model object, ``precision="fp32"`` and
  ``precision="bf16"`` (the model body in bf16 autocast, the output layer and log-softmax in fp32).

Prints word perplexity, byte perplexity and bits per byte from each, the relative differences (target ≤ 0.1 %),
median wall times over ``--repeats`` round-robin rounds and the ratios lm-eval time / pocketlm time (target ≥ 2×).
The model is loaded once before timing; lm-eval's time includes building its task from the local file (a cost
its users pay on every run).

    python benchmarks/perplexity_vs_lm_eval.py                          # SmolLM2-135M-Instruct, 3 articles, L=1024
    python benchmarks/perplexity_vs_lm_eval.py --documents 2 --max-length 512   # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="any model pocketlm can load")
    ap.add_argument("--data", default=str(WIKITEXT), help="WikiText raw file (split at ' = Title = ' headings)")
    ap.add_argument("--documents", type=int, default=3, help="first N articles")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward, both tools")
    ap.add_argument("--repeats", type=int, default=2, help="round-robin rounds; median times are reported")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)

    from pocketlm.data.text import read_documents
    from pocketlm.models.load import load_model

    if not Path(args.data).is_file():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2
    docs = read_documents(args.data, txt_split="wikitext_headings", max_documents=args.documents)
    model, tokenizer = load_model(args.model, dtype="float32")
    model.eval()
    print(f"{len(docs)} documents, {sum(len(d) for d in docs)} characters, max_length {args.max_length}, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}", flush=True)

    times: dict[str, list[float]] = {"lm_eval": [], "fp32": [], "bf16": []}
    for rep in range(args.repeats):  # round robin, so a busy spell on a shared machine hits all three alike
        with tempfile.TemporaryDirectory() as tmp:
            ours32, t = timed(run_pocketlm, model, tokenizer, docs, args.max_length, args.batch_size, "fp32")
            times["fp32"].append(t)
            theirs, t = timed(run_lm_eval, model, tokenizer, docs, args.max_length, args.batch_size,
                              Path(tmp) / str(rep))
            times["lm_eval"].append(t)
            ours16, t = timed(run_pocketlm, model, tokenizer, docs, args.max_length, args.batch_size, "bf16")
            times["bf16"].append(t)
        print(f"round {rep + 1}: pocketlm fp32 {times['fp32'][-1]:.1f} s, lm-eval {times['lm_eval'][-1]:.1f} s, "
              f"pocketlm bf16 {times['bf16'][-1]:.1f} s", flush=True)
    t32, t_lm, t16 = (statistics.median(times[k]) for k in ("fp32", "lm_eval", "bf16"))

    tokens = ours32["tokens"]
    print(f"\n{'metric':<16} {'lm-eval fp32':>14} {'pocketlm fp32':>14} {'rel diff':>10} {'pocketlm bf16':>14} "
          f"{'rel diff':>10}")
    worst32 = worst16 = 0.0
    for m in METRICS:
        d32 = abs(ours32[m] - theirs[m]) / abs(theirs[m])
        d16 = abs(ours16[m] - theirs[m]) / abs(theirs[m])
        worst32, worst16 = max(worst32, d32), max(worst16, d16)
        print(f"{m:<16} {theirs[m]:>14.6f} {ours32[m]:>14.6f} {d32:>9.5%} {ours16[m]:>14.6f} {d16:>9.5%}")
    print(f"\nwall time: lm-eval {t_lm:.1f} s ({tokens / t_lm:.0f} tok/s), pocketlm fp32 {t32:.1f} s "
          f"({tokens / t32:.0f} tok/s), pocketlm bf16 {t16:.1f} s ({tokens / t16:.0f} tok/s)")
    print(f"speed ratio lm-eval/pocketlm: fp32 {t_lm / t32:.2f}x, bf16 {t_lm / t16:.2f}x   (target >= 2x)")
    print(f"largest relative difference: fp32 {worst32:.5%}, bf16 {worst16:.5%}   (target <= 0.1 %)")
    if args.json:
        args.json.write_text(json.dumps({
            "documents": len(docs), "tokens": tokens, "max_length": args.max_length, "batch_size": args.batch_size,
            "lm_eval": theirs, "pocketlm_fp32": ours32, "pocketlm_bf16": ours16,
            "seconds": {"lm_eval": t_lm, "pocketlm_fp32": t32, "pocketlm_bf16": t16}, "rounds": times,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
