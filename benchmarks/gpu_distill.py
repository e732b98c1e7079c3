#!/usr/bin/env python
"""Distillation at a larger scale on one accelerator: tokens/s and peak GPU memory, for benchmarks/RESULTS.md.

The embedded SmolLM2-135M-Instruct teacher (or any teacher spec) distilled into the demo-shaped student (8 of its 30
layers) on WikiText-2 articles (``--data``, split at the ``" = Title = "`` headings), bf16 autocast, in two modes:
``cache`` (teacher top-k built once, then training reads it; the build's tokens/s is reported on its own) and
``online`` (the teacher runs every step). Prints and writes (``--json``) tokens/s of each phase, the peak memory the
CUDA allocator held, and the validation perplexity at the end. Runs on CPU too (slowly); a GPU is what it is for.

    python benchmarks/gpu_distill.py --teacher /path/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data ../shared/data/wikitext2/wiki.test.raw --steps 200 --batch-size 32 --block-size 1024
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--data", required=True, help="WikiText raw file")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--modes", default="cache,online")
    ap.add_argument("--max-documents", type=int, default=None, help="first N articles only (smoke runs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from pocketlm.config import DistillConfig
    from pocketlm.data.text import read_documents
    from pocketlm.distill.run import prepare, run_distill

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    docs = read_documents(args.data, txt_split="wikitext_headings", max_documents=args.max_documents)
    report: dict = {"device": device, "torch": torch.__version__, "documents": len(docs), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "docs.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        prepared = None
        for mode in args.modes.split(","):
            cfg = DistillConfig.model_validate({
                "teacher": args.teacher, "teacher_dtype": "float32",
                "data": {"source": str(data), "block_size": args.block_size, "val_fraction": 0.05},
                "student": {"init": "teacher_layers", "num_layers": args.layers},
                "distill": {"mode": mode, "loss": "forward_kl", "top_k": 64, "ce_weight": 0.5},
                "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": 5e-4, "warmup_steps": 10,
                          "precision": "bf16", "eval_every": args.steps, "save_every": args.steps,
                          "eval_batch_size": args.batch_size},
                "output_dir": str(Path(tmp) / mode),
            })
            if prepared is None:
                prepared = prepare(cfg, progress=False)
                n_tokens = prepared.blocks.n_tokens
                report["train_tokens"] = n_tokens
                print(f"{device}: {len(docs)} documents, {n_tokens} training tokens in blocks of "
                      f"{args.block_size}", flush=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if mode == "cache":
                from pocketlm.distill.run import get_cache

                get_cache(cfg, prepared, progress=False)
                if cuda:
                    torch.cuda.synchronize()
                build = time.perf_counter() - start
            result = run_distill(cfg, prepared=prepared, progress=False)
            row = {
                "train_tokens_per_s": result.train.tokens_per_second,
                "steps": result.train.steps, "tokens_seen": result.train.tokens_seen,
                "train_seconds": result.train.wall_seconds, "val_perplexity": result.train.final_val_perplexity,
                "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            }
            if mode == "cache":
                row["cache_build_tokens_per_s"] = n_tokens / build
                row["cache_build_seconds"] = build
            report["runs"][mode] = row
            print(mode, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
