#!/usr/bin/env python
"""Distilled MoE students against a distilled dense student with the same active parameters, one per router.

The demo's setting, scaled down to fit these 2 cores: the embedded SmolLM2-135M-Instruct writes a corpus (demo
settings, `--documents` of them), a student keeps `--layers` evenly spaced teacher layers, and every student is
distilled through pocketlm's `Trainer` from the same cached top-64 teacher distributions (forward KL + 0.5 CE, bf16
autocast), on the same blocks in the same order, for the same steps. The MoE students are that dense student
upcycled (models/upcycle.py), so every student starts from the teacher's weights and computes the same per token:

| student | MLP of each layer | active MLP per token |
|---|---|---|
| dense | the teacher's (f = 1536) | f |
| switch, expert_choice, hash | 4 experts, copies of it (1 % noise), top-1 (expert choice: 1 on average) | f |
| topk_softmax, aux_free | 8 experts of f/2, its two halves replicated (1 % noise), top-2 | f |

so each MoE student holds 4× the dense MLP parameters at the same active parameters (`size_moe.parameter_counts`).
Reported per student: validation token perplexity on the held-out documents' blocks (the trainer's), total and
active parameters, and for MoE students the load coefficient of variation (mean over layers, last step) and the
dropped-token share. Expert choice routes each sequence by looking at all of it, so its validation perplexity
sees later tokens and is not comparable with the causal students' (it is flagged).

Every stage is kept under `--out` and reused, so the run can be split into calls that each stay under ~8 minutes:

    python benchmarks/moe_vs_dense.py --students none                      # corpus + teacher cache only
    python benchmarks/moe_vs_dense.py --students dense,topk_softmax,aux_free
    python benchmarks/moe_vs_dense.py --students switch,expert_choice,hash
    python benchmarks/moe_vs_dense.py --students none --json moe_vs_dense.json   # the table of all finished
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path


from pocketlm.config import DistillConfig
from pocketlm.distill.run import build_student, get_cache, prepare
from pocketlm.distill.trainer import Trainer
from pocketlm.models.size_moe import parameter_counts

COARSE = {"num_experts": 4, "top_k": 1, "upcycle_noise": 0.01}
FINE = {"num_experts": 8, "top_k": 2, "expert_size": 768, "upcycle_noise": 0.01}
STUDENTS: dict[str, dict | None] = {
    "dense": None,
    "topk_softmax": {"router": "topk_softmax", **FINE, "balance_coef": 0.01, "z_loss_coef": 0.001},
    "aux_free": {"router": "aux_free", **FINE, "bias_update_rate": 0.001},
    "switch": {"router": "switch", **COARSE, "capacity_factor": 1.25, "balance_coef": 0.01, "z_loss_coef": 0.001},
    "expert_choice": {"router": "expert_choice", **COARSE, "z_loss_coef": 0.001},
    "hash": {"router": "hash", **COARSE},
}


def config(args: argparse.Namespace, moe: dict | None) -> DistillConfig:
    return DistillConfig.model_validate({
        "teacher": "smollm2-135m-instruct",
        "data": {"block_size": 256, "val_fraction": 0.1,
                 "synthetic": {"num_documents": args.documents, "max_new_tokens": 160, "temperature": 1.0,
                               "top_p": 1.0, "batch_size": 64, "dtype": "bfloat16"}},
        "student": {"init": "teacher_layers", "num_layers": args.layers, **({"moe": moe} if moe else {})},
        "distill": {"mode": "cache", "loss": "forward_kl", "temperature": 1.0, "ce_weight": 0.5, "top_k": 64},
        "train": {"steps": args.steps, "batch_size": 4, "lr": 5e-4, "warmup_steps": 8, "eval_every": args.steps,
                  "save_every": args.steps, "precision": "bf16", "seed": 0},
        "output_dir": str(args.out),
    })


def train_one(name: str, args: argparse.Namespace, prep, cache) -> dict:
    cfg = config(args, STUDENTS[name])
    student = build_student(cfg, prep.teacher)
    counts = parameter_counts(student)
    out = Path(args.out) / "students" / name
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(student, train_blocks=prep.blocks.train, val_blocks=prep.blocks.val, train_cfg=cfg.train,
                      loss_cfg=cfg.distill, out_dir=out, cache=cache, tokenizer=prep.tokenizer, progress=False,
                      desc=name)
    t0 = time.perf_counter()
    res = trainer.train()
    last = res.history[-1].get("moe", {})
    row = {
        "student": name, "val_perplexity": res.final_val_perplexity, "steps": res.steps,
        "tokens": res.tokens_seen, "train_seconds": time.perf_counter() - t0,
        "tokens_per_second": res.tokens_per_second, "total_params": counts.total, "active_params": counts.active,
        "final_loss": res.history[-1]["loss"], "moe": STUDENTS[name],
        "load_cv": sum(v["load_cv"] for v in last.values()) / len(last) if last else None,
        "dropped_share": sum(v["dropped_share"] for v in last.values()) / len(last) if last else None,
        "sees_future_tokens": name == "expert_choice",
    }
    (out / "result.json").write_text(json.dumps(row, indent=2))
    return row


def table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["student"] == "dense"), None)
    lines = [f"{'student':14} {'val ppl':>8} {'vs dense':>9} {'total':>7} {'active':>7} {'load CV':>8} "
             f"{'dropped':>8} {'tok/s':>6}"]
    for r in rows:
        ratio = f"{r['val_perplexity'] / dense['val_perplexity']:.3f}" if dense else "-"
        cv = "-" if r["load_cv"] is None else f"{r['load_cv']:.3f}"
        drop = "-" if r["dropped_share"] is None else f"{r['dropped_share']:.3f}"
        flag = "  (routing sees later tokens: not comparable)" if r["sees_future_tokens"] else ""
        lines.append(f"{r['student']:14} {r['val_perplexity']:8.2f} {ratio:>9} {r['total_params'] / 1e6:6.1f}M "
                     f"{r['active_params'] / 1e6:6.1f}M {cv:>8} {drop:>8} {r['tokens_per_second']:6.0f}{flag}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/bench-moe-vs-dense")
    ap.add_argument("--students", default=",".join(STUDENTS), help=f"comma list of {', '.join(STUDENTS)}, or none")
    ap.add_argument("--layers", type=int, default=4, help="teacher layers kept (evenly spaced)")
    ap.add_argument("--documents", type=int, default=96, help="teacher-written documents (the demo writes 192)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--json", help="write every finished student's row here")
    args = ap.parse_args()
    names = [] if args.students == "none" else args.students.split(",")
    unknown = [n for n in names if n not in STUDENTS]
    if unknown:
        raise SystemExit(f"unknown students {unknown}; valid: {', '.join(STUDENTS)}")

    t0 = time.perf_counter()
    base = config(args, None)
    prep = prepare(base, progress=True)
    cache = get_cache(base, prep, progress=True)
    print(f"prepared in {time.perf_counter() - t0:.0f} s: {len(prep.blocks.train)} train / "
          f"{len(prep.blocks.val)} val blocks of {base.data.block_size} tokens", flush=True)
    for name in names:
        row = train_one(name, args, prep, cache)
        print(f"{name}: val ppl {row['val_perplexity']:.2f} in {row['train_seconds']:.0f} s", flush=True)
    rows = []
    for name in STUDENTS:
        path = Path(args.out) / "students" / name / "result.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    rows = [r for r in rows if r["steps"] == args.steps and math.isfinite(r["val_perplexity"])]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
