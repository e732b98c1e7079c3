#!/usr/bin/env python
"""The compression frontier: what each way of making a student costs, at 75 %, 50 % and 25 % of the teacher.

Teacher: the embedded SmolLM2-135M-Instruct. Training text: the 15 Project Gutenberg books of
``../shared/data/gutenberg_nltk`` with ``carroll-alice.txt`` held out whole, and every training paragraph that shares
a 10-word shingle with WikiText-2 test or the held-out book dropped (pocketlm's ``data.format: books``,
``heldout``, ``decontaminate``). Every row of a size trains on the same blocks in the same order with the same seed
and token budget (``data.max_train_tokens``), from one teacher cache (top-64 log-probs) built once for all rows, and
every pruned init reads one importance record measured once on the teacher (256 calibration blocks, removal
perplexity on 16).

Rows (sizes are shares of the teacher's non-embedding parameters; ``models/pruning.py`` has the rules):

| row | student |
|---|---|
| evenly | ``init: teacher_layers``, evenly spaced layers (the depth the size allows; pocketlm's old default) |
| depth | ``init: pruned``, ``axis: depth``: the layers of highest Block Influence (ShortGPT) |
| width | ``init: pruned``, ``axis: width``: hidden and MLP channels by activation importance (Minitron) |
| random | a fresh model of the depth rows' shape |
| <best>_ce | the best pruned init trained with cross-entropy only |
| <best>_moe | the best pruned init upcycled to 4 experts (whole copies of each MLP), top-1: equal to its dense twin at init, with the same active parameters |

At 50 % every row; at 75 % and 25 % evenly, the best pruned init (chosen at 50 %) and its CE twin. Distilled rows
use forward KL on the cached teacher distributions + 0.5 CE, the CE rows CE alone; all use AdamW, lr 3e-4, 8 warm-up
steps, cosine to 0.1, bf16 autocast.

Per row: parameters (total, non-embedding), training tokens and wall time, WikiText-2 test word perplexity (all
articles, lm-eval's wikitext definition, max_length 2048, bf16 body) and its ratio to the teacher's, held-out book
token perplexity, greedy generation tokens/s (batch 1, 3 prompts × 64 new tokens, fp32, the dense students as
transformers' LlamaForCausalLM like the teacher) and its ratio to the teacher's, and the loss curve.
Each row is its own file under ``--out/rows``; a re-run skips finished rows (same budget and settings), so the table
can be built over several sittings or on a lent GPU with a larger ``--tokens``. One row at a time holds the lock
``/tmp/pocketlm-heavy.lock`` (two heavy jobs at once run five times slower on these 2 cores).

    python benchmarks/compression_frontier.py --rows 50:evenly,50:depth      # a few rows
    python benchmarks/compression_frontier.py                                # every row (hours on 2 cores)
    python benchmarks/compression_frontier.py --table                        # the table of the finished rows
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SIZES = {"75": 0.75, "50": 0.5, "25": 0.25}
ROWS_50 = ("evenly", "depth", "width", "random", "best_ce", "best_moe")
ROWS_OTHER = ("evenly", "best", "best_ce")
PROMPTS = ("The history of the city begins", "She opened the letter and read", "In the morning the ship")
LOCK = "/tmp/pocketlm-heavy.lock"


def all_rows() -> list[str]:
    return [f"50:{r}" for r in ROWS_50] + [f"{s}:{r}" for s in ("25", "75") for r in ROWS_OTHER]


@contextlib.contextmanager
def heavy_lock():
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def base_config(args):
    from pocketlm.config import DistillConfig

    return DistillConfig.model_validate({
        "teacher": "smollm2-135m-instruct",
        "data": {"source": str(args.data / "gutenberg_nltk"), "format": "books", "heldout": [args.heldout],
                 "val_fraction": 0, "block_size": args.block_size, "max_train_tokens": args.tokens,
                 "decontaminate": [str(args.data / "wikitext2" / "wiki.test.raw")]},
        "student": {"init": "teacher_layers"},
        "distill": {"mode": "cache", "loss": "forward_kl", "temperature": 1.0, "ce_weight": 0.5, "top_k": 64},
        "train": {"steps": args.tokens // (args.batch_size * args.block_size), "batch_size": args.batch_size,
                  "lr": args.lr, "warmup_steps": 8, "min_lr_ratio": 0.1, "eval_every": 10**6, "save_every": 10**6,
                  "precision": "bf16", "seed": 0},
        "output_dir": str(args.out / "shared"),
    })


class Shared:
    """The teacher, the blocks, the cache and the importance record: built once, reused by every row."""

    def __init__(self, args) -> None:
        from pocketlm.data.text import read_documents
        from pocketlm.distill.run import calibration_blocks, get_cache, prepare
        from pocketlm.core.integrity import RecordError
        from pocketlm.models.importance import Importance, compute_importance
        from pocketlm.models.pruning import as_pocketlm

        self.args, self.cfg = args, base_config(args)
        t0 = time.perf_counter()
        with heavy_lock():
            self.prep = prepare(self.cfg, progress=True)
            self.cache = get_cache(self.cfg, self.prep, progress=True)
            path = args.out / "shared" / "importance.json"
            key = {"data": self.prep.blocks.data_hash, "calibration_blocks": args.calibration_blocks,
                   "removal_blocks": args.removal_blocks, "bf16": True}
            self.importance = None
            if path.is_file():
                with contextlib.suppress(RecordError):
                    imp = Importance.read(path)
                    # (a record from before keys: taken when its block size and block counts match)
                    unkeyed = "key" not in imp.source and imp.removal_blocks == args.removal_blocks and \
                        imp.source.get("block_size") == args.block_size and \
                        imp.n_blocks == min(args.calibration_blocks, len(self.prep.blocks.train))
                    self.importance = imp if imp.source.get("key") == key or unkeyed else None
            if self.importance is None:
                cal = calibration_blocks(self.prep.blocks.train, args.calibration_blocks, 0)
                self.importance = compute_importance(as_pocketlm(self.prep.teacher), cal, bf16=True, progress=True,
                                                     removal_blocks=args.removal_blocks)
                self.importance.source["key"] = key
                self.importance.write(path)
        self.wikitext = read_documents(args.data / "wikitext2" / "wiki.test.raw", txt_split="wikitext_headings")
        self.book = self.prep.blocks.val_docs
        if args.smoke:  # a quick check of the whole path: 2 articles, the book's first 4,000 characters
            self.wikitext, self.book = self.wikitext[:2], [self.book[0][:4000]]
        print(f"shared: {len(self.prep.blocks.train)} train blocks of {args.block_size} "
              f"({self.prep.blocks.n_tokens:,} tokens), held-out book {len(self.book)} doc, "
              f"{len(self.wikitext)} WikiText-2 articles; {time.perf_counter() - t0:.0f} s", flush=True)


def evaluate(model, tokenizer, shared: Shared) -> dict:
    from pocketlm.eval.perplexity import perplexity

    t0 = time.perf_counter()
    wiki = perplexity(model, tokenizer, shared.wikitext, max_length=2048, detokenize="wikitext", batch_size=4,
                      precision="bf16", progress=False)
    book = perplexity(model, tokenizer, shared.book, max_length=2048, batch_size=4, precision="bf16",
                      progress=False)
    out = {"wikitext_word_perplexity": wiki.word_perplexity, "wikitext_token_perplexity": wiki.token_perplexity,
           "wikitext_tokens": wiki.tokens, "book_token_perplexity": book.token_perplexity,
           "book_word_perplexity": book.word_perplexity, "book_tokens": book.tokens}
    out["generate_tokens_per_s"] = generation_speed(model, tokenizer)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def generation_speed(model, tokenizer, new_tokens: int = 64) -> float:
    """Greedy decoding, batch 1, fp32: tokens per second over the prompts (one warm-up call first)."""
    from pocketlm.models.student import PocketLMForCausalLM

    if isinstance(model, PocketLMForCausalLM) and model.config.moe is None:
        from pocketlm.models.hf_export import llama_config_from_student
        from transformers import LlamaForCausalLM

        llama = LlamaForCausalLM(llama_config_from_student(model.config)).eval()
        llama.load_state_dict(model.state_dict(), strict=False)
        llama.tie_weights()
        model = llama
    if next(model.parameters()).dtype != torch.float32:
        model = model.float()
    model = model.eval()
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        model.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), max_new_tokens=4, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
        t0, n = time.perf_counter(), 0
        for p in PROMPTS:
            ids = tokenizer(p, return_tensors="pt")
            out = model.generate(**ids, **kw)
            n += out.shape[1] - ids["input_ids"].shape[1]
    return n / (time.perf_counter() - t0)


def counts(model) -> dict:
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    embed = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("model.embed_tokens", "lm_head")))
    return {"total_params": total, "non_embedding_params": total - embed}


def best_pruned(args) -> str:
    """depth or width: the pruned init of lower WikiText-2 perplexity at 50 % (--best overrides)."""
    if args.best:
        return args.best
    rows = {r: read_row(args, "50", r) for r in ("depth", "width")}
    if any(v is None for v in rows.values()):
        raise SystemExit("the best pruned init is chosen at 50 %: run 50:depth and 50:width first (or pass --best)")
    return min(rows, key=lambda r: rows[r]["wikitext_word_perplexity"])


def row_key(args) -> dict:
    return {"tokens": args.tokens, "block_size": args.block_size, "batch_size": args.batch_size, "lr": args.lr,
            "heldout": args.heldout, "smoke": args.smoke, "calibration_blocks": args.calibration_blocks,
            "removal_blocks": args.removal_blocks, "version": 1}


def student_path(args, size: str, name: str) -> Path:
    return args.out / "students" / f"{size}-{name}"


def remeasure_speed(args, shared: Shared) -> None:
    """Greedy tokens/s of the teacher and of every finished row's saved student, timed again in this one run,
    one after the other (timings taken while other work ran on the cores are not comparable)."""
    from transformers import AutoModelForCausalLM

    from pocketlm.models.student import register_auto_classes

    register_auto_classes()
    tok = shared.prep.tokenizer
    with heavy_lock():
        t_path = args.out / "rows" / "teacher.json"
        teacher = json.loads(t_path.read_text())
        teacher["generate_tokens_per_s"] = generation_speed(shared.prep.teacher, tok)
        t_path.write_text(json.dumps(teacher, indent=1))
        print(f"teacher: {teacher['generate_tokens_per_s']:.1f} tokens/s", flush=True)
        for size in ("75", "50", "25"):
            for name in (ROWS_50 if size == "50" else ROWS_OTHER):
                row, folder = read_row(args, size, name), student_path(args, size, name)
                if row is None or not folder.is_dir():
                    continue
                model = AutoModelForCausalLM.from_pretrained(folder)  # saved without a tokenizer: the teacher's
                row["generate_tokens_per_s"] = generation_speed(model, tok)
                row["speed_ratio_to_teacher"] = row["generate_tokens_per_s"] / teacher["generate_tokens_per_s"]
                row_path(args, size, name).write_text(json.dumps(row, indent=1))
                print(f"{size}:{name}: {row['generate_tokens_per_s']:.1f} tokens/s "
                      f"({row['speed_ratio_to_teacher']:.2f}× teacher)", flush=True)


def row_path(args, size: str, name: str) -> Path:
    return args.out / "rows" / f"{size}-{name}.json"


def read_row(args, size: str, name: str) -> dict | None:
    path = row_path(args, size, name)
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    return row if row.get("key") == row_key(args) else None


def build(shared: Shared, size: str, init: str, moe: bool):
    """The row's student (fp32) and a description of its init."""
    from pocketlm.config import DistillConfig
    from pocketlm.distill.run import build_student
    from pocketlm.models.pruning import PruneTarget, choose_target, prune_model, source_config
    from pocketlm.models.upcycle import upcycle

    frac = SIZES[size]
    teacher = shared.prep.teacher
    depth = choose_target(source_config(teacher), PruneTarget(target_params=frac, axis="depth"))["num_layers"]
    tree = shared.cfg.model_dump()
    if init in ("evenly", "random"):
        tree["student"] = {"init": "teacher_layers" if init == "evenly" else "random", "num_layers": depth}
        student = build_student(DistillConfig.model_validate(tree), teacher)
        what = {"init": tree["student"]["init"], "num_layers": depth}
    else:
        target = PruneTarget(target_params=frac, axis=init)
        student, plan, _ = prune_model(teacher, target, torch.empty(0), importance=shared.importance)
        what = {"init": "pruned", "axis": init, "kept_layers": plan.layers, "widths": plan.config}
    if moe:
        student = upcycle(student, {"router": "topk_softmax", "num_experts": 4, "top_k": 1, "balance_coef": 0.01},
                          seed=0)
        what["moe"] = {"router": "topk_softmax", "num_experts": 4, "top_k": 1}
    return student.float(), what


def run_row(args, shared: Shared, size: str, name: str) -> dict:
    from pocketlm.distill.trainer import Trainer

    init = best_pruned(args) if name.startswith("best") else name
    ce, moe = name.endswith("_ce"), name.endswith("_moe")
    cfg = shared.cfg
    loss_cfg = cfg.distill.model_copy(update={"mode": "ce", "ce_weight": 0.0}) if ce else cfg.distill
    with heavy_lock():
        torch.manual_seed(0)
        student, what = build(shared, size, init, moe)
        work = args.out / "work" / f"{size}-{name}"
        shutil.rmtree(work, ignore_errors=True)
        trainer = Trainer(student, train_blocks=shared.prep.blocks.train, val_blocks=None, train_cfg=cfg.train,
                          loss_cfg=loss_cfg, out_dir=work, cache=None if ce else shared.cache,
                          tokenizer=shared.prep.tokenizer, progress=not args.quiet, desc=f"{size}% {name}")
        t0 = time.perf_counter()
        res = trainer.train()
        train_s = time.perf_counter() - t0
        model = trainer.accelerator.unwrap_model(trainer.student).eval()
        ev = evaluate(model, shared.prep.tokenizer, shared)
        shutil.rmtree(work, ignore_errors=True)  # checkpoints of this benchmark's own scratch folder
        model.save_pretrained(student_path(args, size, name))  # for --speed, which times every row in one run
    teacher = teacher_row(args, shared)
    row = {
        "size": size, "row": name, "resolved_init": init, "loss": "ce" if ce else "forward_kl + 0.5 ce",
        "student": what, **counts(model), "train_tokens": res.tokens_seen, "train_seconds": train_s,
        "train_tokens_per_s": res.tokens_seen / train_s, **ev,
        "wikitext_ratio_to_teacher": ev["wikitext_word_perplexity"] / teacher["wikitext_word_perplexity"],
        "speed_ratio_to_teacher": ev["generate_tokens_per_s"] / teacher["generate_tokens_per_s"],
        "loss_curve": [[r["step"], r["loss"]] for r in res.history], "key": row_key(args),
    }
    path = row_path(args, size, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def teacher_row(args, shared: Shared) -> dict:
    path = args.out / "rows" / "teacher.json"
    if path.is_file():
        row = json.loads(path.read_text())
        if row.get("key") == {"heldout": args.heldout, "smoke": args.smoke}:
            return row
    with heavy_lock():
        teacher = shared.prep.teacher
        row = {"row": "teacher", **counts(teacher), **evaluate(teacher, shared.prep.tokenizer, shared),
               "key": {"heldout": args.heldout, "smoke": args.smoke}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def table(args) -> str:
    teacher_path = args.out / "rows" / "teacher.json"
    if not teacher_path.is_file():
        return "(no rows yet)"
    t = json.loads(teacher_path.read_text())
    lines = ["| size | row | init | loss | params (non-emb.) | train tokens | train min | WikiText-2 word ppl | × teacher "
             "| held-out book ppl | gen tok/s | × teacher |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| 100 % | teacher | - | - | {t['total_params'] / 1e6:.1f} M ({t['non_embedding_params'] / 1e6:.1f} M) "
             f"| - | - | {t['wikitext_word_perplexity']:.2f} | 1.00 | {t['book_token_perplexity']:.2f} "
             f"| {t['generate_tokens_per_s']:.1f} | 1.00 |"]
    for size in ("75", "50", "25"):
        for name in (ROWS_50 if size == "50" else ROWS_OTHER):
            r = read_row(args, size, name)
            if r is None:
                continue
            s = r["student"]
            init = s["init"] + (f" ({s['axis']})" if "axis" in s else "") + (" + MoE 4×top-1" if "moe" in s else "")
            lines.append(
                f"| {size} % | {name.replace('best', r['resolved_init'])} | {init} | {r['loss']} "
                f"| {r['total_params'] / 1e6:.1f} M ({r['non_embedding_params'] / 1e6:.1f} M) "
                f"| {r['train_tokens']:,} | {r['train_seconds'] / 60:.1f} | {r['wikitext_word_perplexity']:.2f} "
                f"| {r['wikitext_ratio_to_teacher']:.2f} | {r['book_token_perplexity']:.2f} "
                f"| {r['generate_tokens_per_s']:.1f} | {r['speed_ratio_to_teacher']:.2f} |")
    return "\n".join(lines)


def plot_curves(args) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in ("75", "50", "25") if any(read_row(args, s, n) for n in ROWS_50 + ROWS_OTHER)]
    if not sizes:
        return None
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for name in (ROWS_50 if size == "50" else ROWS_OTHER):
            r = read_row(args, size, name)
            if r:
                steps, losses = zip(*r["loss_curve"])
                ax.plot(steps, losses, label=name.replace("best", r["resolved_init"]))
        ax.set_title(f"{size} % of the non-embedding parameters")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (KD rows: KL + 0.5 CE)")
        ax.legend(fontsize=8)
    path = args.out / "loss_curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-compression-frontier")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--rows", default="all", help=f"comma list of size:row from {', '.join(all_rows())}")
    ap.add_argument("--tokens", type=int, default=131072, help="training tokens per row (the budget)")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--heldout", default="carroll-alice.txt")
    ap.add_argument("--calibration-blocks", type=int, default=256, help="blocks of the importance pass")
    ap.add_argument("--removal-blocks", type=int, default=16, help="blocks of each layer's removal perplexity")
    ap.add_argument("--best", choices=("depth", "width"), help="the best pruned init, if not read from the 50 %% rows")
    ap.add_argument("--table", action="store_true", help="only print the table of the finished rows")
    ap.add_argument("--speed", action="store_true", help="time greedy generation of the teacher and every finished "
                                                         "row again, in one run (after the rows)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="score 2 WikiText-2 articles and 4,000 characters of the "
                                                         "book only (a check of the path, not a result)")
    args = ap.parse_args()
    if not (args.data / "gutenberg_nltk").is_dir():
        raise SystemExit(f"{args.data / 'gutenberg_nltk'} not found: this benchmark needs ../shared/data")
    rows = all_rows() if args.rows == "all" else args.rows.split(",")
    unknown = [r for r in rows if r not in all_rows()]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; valid: {', '.join(all_rows())}")
    if not args.table:
        torch.set_num_threads(2)
        shared = Shared(args)
        teacher_row(args, shared)
        for r in rows if not args.speed else ():
            size, name = r.split(":")
            if read_row(args, size, name) is not None:
                print(f"{r}: done before, skipped", flush=True)
                continue
            row = run_row(args, shared, size, name)
            print(f"{r}: WikiText-2 word ppl {row['wikitext_word_perplexity']:.2f} "
                  f"({row['wikitext_ratio_to_teacher']:.2f}× teacher), book {row['book_token_perplexity']:.2f}, "
                  f"train {row['train_seconds'] / 60:.1f} min, eval {row['eval_seconds'] / 60:.1f} min", flush=True)
            print(table(args), flush=True)
        if args.speed:
            remeasure_speed(args, shared)
    print(table(args))
    curves = plot_curves(args)
    if curves:
        print(f"loss curves: {curves}")


if __name__ == "__main__":
    main()
