"""`pocketlm demo` / `make demo`: distillation against its baseline, on the embedded teacher, in minutes.

The teacher (SmolLM2-135M-Instruct) writes a corpus; a student with about a quarter of its non-embedding
parameters is made from evenly spaced teacher layers; one copy is distilled from the teacher's cached top-k
distributions (forward KL, mixed half and half with cross-entropy on the text, as Hinton et al. do: the chat
template and the prompts in the text are not the teacher's samples, so only the data can teach them), the other
trained with cross-entropy alone on the same tokens for the same steps. Teacher and both
students are then scored by the same perplexity code on held-out teacher-written documents.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pocketlm.config import DistillConfig

# the demo's config (configs/demo.yaml mirrors it; a test keeps the two equal)
DEMO_CONFIG: dict[str, Any] = {
    "teacher": "smollm2-135m-instruct",
    "data": {
        "block_size": 256,
        "val_fraction": 0.1,
        "synthetic": {"num_documents": 192, "max_new_tokens": 160, "temperature": 1.0, "top_p": 1.0,
                      "batch_size": 64, "dtype": "bfloat16"},
    },
    "student": {"init": "teacher_layers", "num_layers": 8},
    "distill": {"mode": "cache", "loss": "forward_kl", "temperature": 1.0, "ce_weight": 0.5, "top_k": 64},
    "train": {"steps": 80, "batch_size": 4, "lr": 5e-4, "warmup_steps": 8, "eval_every": 20, "save_every": 20,
              "precision": "bf16", "seed": 0},
    "output_dir": "outputs/demo",
}


def param_counts(model) -> dict[str, int]:
    """Total, embedding (input + untied output) and non-embedding parameters, counting shared tensors once."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    total = sum(seen.values())
    emb = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    out = model.get_output_embeddings()
    if out is not None:
        emb[id(out.weight)] = out.weight.numel()
    embedding = sum(emb.values())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _table(rows: list[dict[str, Any]], teacher_ne: int) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="pocketlm demo: perplexity on held-out teacher-written text (lower is better)")
    for col, just in [("model", "left"), ("params", "right"), ("non-emb.", "right"),
                      ("vs teacher", "right"), ("perplexity", "right"), ("bits/byte", "right")]:
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(r["name"], f"{r['params']['total'] / 1e6:.1f} M", f"{r['params']['non_embedding'] / 1e6:.1f} M",
                  f"{r['params']['non_embedding'] / teacher_ne:.0%}", f"{r['perplexity']['token_perplexity']:.2f}",
                  f"{r['perplexity']['bits_per_byte']:.3f}")
    Console(width=max(100, Console().width)).print(t)


def run_demo(out: str | os.PathLike = "outputs/demo", *, progress: bool = True, overrides: list[str] | None = None):
    from pocketlm.config import apply_overrides
    from pocketlm.distill.run import prepare, run_distill
    from pocketlm.eval.perplexity import perplexity
    from pocketlm.provenance import provenance

    start = time.perf_counter()
    out = Path(out)
    tree = apply_overrides({**DEMO_CONFIG, "output_dir": str(out)}, overrides or [])
    base = DistillConfig.model_validate(tree)
    print(f"[demo] loading the teacher {base.teacher} and letting it write "
          f"{base.data.synthetic.num_documents} documents ...", flush=True)
    prep = prepare(base, progress=progress)
    print(f"[demo] {prep.blocks.train.shape[0]} training blocks of {base.data.block_size} tokens "
          f"({prep.blocks.n_tokens:,} tokens), {len(prep.blocks.val_docs)} held-out documents", flush=True)

    runs = {
        "student (distilled)": base.model_copy(update={"output_dir": str(out / "distilled")}),
        "student (cross-entropy only)": base.model_copy(update={
            "output_dir": str(out / "ce_only"), "distill": base.distill.model_copy(update={"mode": "ce"})}),
    }
    results: dict[str, Any] = {}
    students: dict[str, Any] = {}
    for name, cfg in runs.items():
        print(f"[demo] training {name} for {cfg.train.steps} steps ...", flush=True)
        r = run_distill(cfg, resume=_has_ckpt(cfg), progress=progress, prepared=prep, desc=name)
        results[name] = r
        students[name] = r.student_dir

    from pocketlm.models.load import load_model

    rows = []
    models = [("teacher", prep.teacher, None)] + [(n, *load_model(p)[:1], results[n]) for n, p in students.items()]
    for name, model, res in models:
        print(f"[demo] scoring {name} ...", flush=True)
        ppl = perplexity(model, prep.tokenizer, prep.blocks.val_docs, max_length=512, progress=progress)
        row = {"name": name, "params": param_counts(model), "perplexity": ppl.to_dict()}
        if res is not None:
            row["train"] = res.to_dict()
        rows.append(row)
    teacher_ne = rows[0]["params"]["non_embedding"]
    _table(rows, teacher_ne)
    kd, ce = rows[1]["perplexity"]["token_perplexity"], rows[2]["perplexity"]["token_perplexity"]
    verdict = "ahead" if kd < ce else "NOT ahead"
    print(f"[demo] the distilled student is {verdict} of the cross-entropy one: perplexity {kd:.2f} vs {ce:.2f} "
          f"(teacher {rows[0]['perplexity']['token_perplexity']:.2f}); wall time {time.perf_counter() - start:.0f} s")
    doc = {
        "config": base.model_dump(),
        "teacher_fingerprint": prep.teacher_fingerprint,
        "tokenizer_fingerprint": prep.tokenizer_fingerprint,
        "data_hash": prep.blocks.data_hash,
        "n_train_tokens": prep.blocks.n_tokens,
        "n_val_documents": len(prep.blocks.val_docs),
        "models": rows,
        "distilled_beats_ce": kd < ce,
        "wall_seconds": time.perf_counter() - start,
        "provenance": provenance(),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, out / "results.json")
    print(f"[demo] wrote {out / 'results.json'}")
    return doc


def _has_ckpt(cfg: DistillConfig) -> bool:
    from pocketlm.distill.checkpoint import latest_checkpoint

    return latest_checkpoint(Path(cfg.output_dir) / "checkpoints") is not None
