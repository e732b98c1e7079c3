#!/usr/bin/env python
"""Distillation training throughput: pocketlm (teacher cache, and online) against TRL's GKDTrainer.

Three trainers, each on the same teacher, student weights, token blocks (same blocks in the same order), sequence
length, batch, optimizer and precision:

* ``pocketlm-cache``  pocketlm's Trainer, ``distill.mode=cache``: forward KL against the teacher's cached top-k
  log-probs (+ one tail bucket). The training process loads only the student and the cache, never the teacher.
  The cache is built beforehand in its own process; its build time is printed and folded into an
  "amortised over one epoch" tokens/s, but it is not part of the steady-state figure.
* ``pocketlm-online`` pocketlm's Trainer, ``distill.mode=online``: the teacher runs every step, full-vocabulary KL.
* ``trl-gkd``         TRL's ``GKDTrainer`` in supervised mode: ``lmbda=0`` (never samples from the student),
  ``beta=0`` (TRL's generalised JSD is then forward KL(teacher || student)), ``temperature=1``, ``seq_kd=False``.

…for the demo's student (8 of the teacher's 30 layers) and one half its depth (4 layers), both initialised from the
teacher once and saved, so every trainer starts from identical weights. Every measurement runs in its own
subprocess and reports its own peak RSS (``ru_maxrss``).

tokens/s = batch × (L − 1) × timed steps / wall time from the end of the last warm-up step to the end of the last
timed step (the same window, measured the same way, for all three). The script prints a table, the ratios
pocketlm-cache / TRL and pocketlm-online / TRL (tokens/s and peak memory) for each student, the first-step loss of
each trainer on the same batch (a check that all three do the same work), and writes everything as JSON with
``--json``. Every process runs one torch thread by default (``--threads``): on a shared machine two threads per
process make each parallel op wait for a descheduled thread, which distorts the comparison (see the README).
See benchmarks/README.md.

    python benchmarks/kd_throughput.py                       # fp32, batch 4, L 256, 2 warm-up + 6 timed steps
    python benchmarks/kd_throughput.py --precision bf16 --json bench.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
TRAINERS = ("pocketlm-cache", "pocketlm-online", "trl-gkd")
SEED = 0


# ================================================================================================ worker side
def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _wikitext_articles(path: Path) -> list[str]:
    """The raw WikiText-2 test file as stored in shared/data has no blank lines (one paragraph per line), so
    pocketlm's `.raw` reader would see a single document; split it into its articles at the top-level
    ` = Title = ` headings instead (62 articles), so documents are joined with EOS as pocketlm packs them."""
    docs: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if re.match(r"^ = [^=].* = \s*$", line) or not docs:
            docs.append([])
        docs[-1].append(line.strip("\r"))
    return ["\n".join(d) for d in docs]


def _pocketlm_config(spec: dict):
    from pocketlm.config import DistillConfig
    from pocketlm.demo import DEMO_CONFIG

    tree = json.loads(json.dumps(DEMO_CONFIG))  # deep copy
    tree["data"]["block_size"] = spec["seq_len"]
    tree["student"]["num_layers"] = spec.get("layers", tree["student"]["num_layers"])
    tree["distill"]["mode"] = spec.get("mode", "cache")
    # the peer's objective exactly: GKD with lmbda=0, beta=0 is forward KL at T=1 with no CE term (the demo itself
    # mixes in CE; that would change the work and the loss being compared)
    tree["distill"].update(loss="forward_kl", temperature=1.0, ce_weight=0.0)
    tree["train"].update(
        # no LR warm-up and a cosine to 0: the same schedule as TRL's "cosine" with warmup_steps=0
        steps=spec["warmup"] + spec["steps"], batch_size=spec["batch_size"], grad_accum=1, warmup_steps=0,
        min_lr_ratio=0.0,
        eval_every=10**9, save_every=10**9, precision=spec["precision"], seed=SEED,
    )
    tree["output_dir"] = spec["workdir"]
    return DistillConfig.model_validate(tree)


def worker_prep(spec: dict) -> dict:
    """Load the embedded teacher once; write the token blocks, an HF copy of the teacher and the initial students."""
    import torch
    from safetensors.torch import save_file

    from pocketlm.data.text import build_blocks
    from pocketlm.distill.run import build_student
    from pocketlm.models.hf_export import save_student_folder
    from pocketlm.models.init import evenly_spaced_layers
    from pocketlm.models.load import load_model

    work = Path(spec["workdir"])
    t0 = time.perf_counter()
    teacher, tok = load_model("smollm2-135m-instruct")
    load_s = time.perf_counter() - t0
    cfg = _pocketlm_config(spec)
    if WIKITEXT.is_file():
        docs, source = _wikitext_articles(WIKITEXT), f"WikiText-2 raw test ({WIKITEXT})"
    else:
        from pocketlm.data.synthetic import teacher_corpus

        s = cfg.data.synthetic
        docs = teacher_corpus(teacher, tok, num_documents=s.num_documents, max_new_tokens=s.max_new_tokens,
                              temperature=s.temperature, top_p=s.top_p, batch_size=s.batch_size, seed=SEED,
                              progress=False)
        source = f"teacher-written corpus ({len(docs)} documents; {WIKITEXT} not found)"
    blocks = build_blocks(docs, tok, block_size=spec["seq_len"], val_fraction=cfg.data.val_fraction, seed=SEED)
    all_train = blocks.train
    n = spec["train_blocks"] or len(all_train)
    train = all_train[:n].contiguous()
    need = (spec["warmup"] + spec["steps"]) * spec["batch_size"]
    if len(train) < spec["batch_size"]:
        raise SystemExit(f"only {len(train)} training blocks: fewer than one batch of {spec['batch_size']}")
    save_file({"train": train}, str(work / "blocks.safetensors"))
    # the teacher as a plain HF folder: the online and TRL runs load it without GGUF de-quantisation, so their
    # peak memory is that of training, not of reading a GGUF file
    # (a GGUF-loaded model refuses save_pretrained, so copy its de-quantised weights into a plain one first)
    from transformers import AutoModelForCausalLM

    conf = copy.deepcopy(teacher.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(conf, attr):
            delattr(conf, attr)
    plain = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    plain.load_state_dict(teacher.state_dict())
    plain.save_pretrained(work / "teacher", safe_serialization=True)
    tok.save_pretrained(work / "teacher")
    del plain
    students = {}
    for n_layers in spec["layer_list"]:
        scfg = _pocketlm_config({**spec, "layers": n_layers})
        student = build_student(scfg, teacher)
        save_student_folder(student, tok, work / f"student-{n_layers}")
        students[n_layers] = {
            "params": sum(p.numel() for p in {id(p): p for p in student.parameters()}.values()),
            "teacher_layers": evenly_spaced_layers(teacher.config.num_hidden_layers, n_layers),
        }
        del student
    return {
        "source": source, "n_documents": len(docs), "n_train_blocks_all": len(all_train),
        "n_train_blocks": len(train), "blocks_needed": need, "teacher_load_gguf_s": load_s,
        "teacher_params": sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values()),
        "students": students, "torch_threads": torch.get_num_threads(),
    }


def worker_cache(spec: dict) -> dict:
    """Build the teacher cache over the training blocks (the step pocketlm's cache mode pays once)."""
    from safetensors.torch import load_file

    from pocketlm.distill.cache import build_teacher_cache
    from pocketlm.models.load import fingerprint_model, fingerprint_tokenizer, load_model

    work = Path(spec["workdir"])
    t0 = time.perf_counter()
    teacher, tok = load_model(work / "teacher")
    load_s = time.perf_counter() - t0
    blocks = load_file(str(work / "blocks.safetensors"))["train"]
    t_fp, k_fp = fingerprint_model(teacher), fingerprint_tokenizer(tok)
    cfg = _pocketlm_config(spec)
    t0 = time.perf_counter()
    build_teacher_cache(
        teacher, blocks, work / "teacher_cache", k=cfg.distill.top_k, teacher_fingerprint=t_fp,
        tokenizer_fingerprint=k_fp, data_hash=f"bench-{blocks.shape[0]}x{blocks.shape[1]}",
        batch_size=cfg.train.eval_batch_size, progress=False,
    )
    build_s = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in (work / "teacher_cache").glob("*.safetensors"))
    return {"teacher_load_s": load_s, "build_s": build_s, "n_blocks": int(blocks.shape[0]),
            "cache_bytes": disk, "top_k": cfg.distill.top_k, "batch_size": cfg.train.eval_batch_size}


def _step_window(stamps: list[float], start: float, warmup: int) -> tuple[float, list[float]]:
    """Wall time of the timed steps (end of the last warm-up step → end of the last step) and per-step times."""
    ends = [start, *stamps]
    per_step = [b - a for a, b in zip(ends, ends[1:])]
    return ends[-1] - ends[warmup], per_step


def worker_pocketlm(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    from pocketlm.distill.cache import TeacherCache
    from pocketlm.distill.trainer import Trainer
    from pocketlm.models.load import load_model

    work = Path(spec["workdir"])
    mode = spec["mode"]
    cfg = _pocketlm_config(spec)
    t0 = time.perf_counter()
    student, tok = load_model(work / f"student-{spec['layers']}")
    teacher = load_model(work / "teacher")[0] if mode == "online" else None
    cache = TeacherCache.open(work / "teacher_cache") if mode == "cache" else None
    blocks = load_file(str(work / "blocks.safetensors"))["train"]
    trainer = Trainer(
        student, train_blocks=blocks, val_blocks=None, train_cfg=cfg.train, loss_cfg=cfg.distill,
        out_dir=work / f"run-{mode}-{spec['layers']}", teacher=teacher, cache=cache, tokenizer=tok, progress=False,
    )
    trainer.save = lambda: None  # no checkpoint at the last step (TRL runs with save_strategy="no" too)
    setup_s = time.perf_counter() - t0
    stamps: list[float] = []
    inner = trainer._train_step

    def timed_step():
        row = inner()
        stamps.append(time.perf_counter())
        return row

    trainer._train_step = timed_step
    rss_start = _rss_now_mb()
    start = time.perf_counter()
    result = trainer.train()
    window, per_step = _step_window(stamps, start, spec["warmup"])
    return {
        "setup_s": setup_s, "window_s": window, "per_step_s": per_step,
        "losses": [r["loss"] for r in result.history], "rss_start_mb": rss_start,
        "teacher_loaded": teacher is not None, "torch_threads": torch.get_num_threads(),
        "trl_imported": "trl" in sys.modules,
    }


def worker_trl(spec: dict) -> dict:
    import datasets
    import torch
    import trl
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    try:  # TRL >= 0.2x moved GKD to trl.experimental
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # pragma: no cover - older TRL
        from trl import GKDConfig, GKDTrainer

    from pocketlm.training import batch_indices
    from pocketlm.models.load import load_model

    work = Path(spec["workdir"])
    cfg = _pocketlm_config(spec)
    tc = cfg.train
    total = spec["warmup"] + spec["steps"]
    t0 = time.perf_counter()
    student, tok = load_model(work / f"student-{spec['layers']}")
    teacher = load_model(work / "teacher")[0]
    blocks = load_file(str(work / "blocks.safetensors"))["train"]
    # exactly pocketlm's batches, in pocketlm's order; TRL reads them with a sequential sampler
    order = torch.cat([batch_indices(len(blocks), tc.batch_size, tc.seed, s) for s in range(total)])
    ids = blocks[order]
    labels = ids.clone()
    labels[:, 0] = -100  # position 0 is never a target: TRL's token count is then B·(L−1), as ours
    ds = datasets.Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist(),
    }).with_format("torch")

    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    bf16 = spec["precision"] == "bf16"
    # SFTConfig turns activation checkpointing on by default; pocketlm does not checkpoint, so turn it off
    # (transformers 5 renamed gradient_checkpointing to activation_checkpointing and keeps the old name as an alias)
    names = {f.name for f in dataclasses.fields(GKDConfig)}
    no_ckpt = {"activation_checkpointing": False} if "activation_checkpointing" in names else {
        "gradient_checkpointing": False}
    args = GKDConfig(
        output_dir=str(work / f"trl-{spec['layers']}"),
        # the distillation: supervised (no student sampling, no teacher sampling), forward KL at T=1
        lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
        # the same optimisation as pocketlm's: AdamW (torch), LR, betas, weight decay, clipping, no accumulation
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=1, max_steps=total,
        learning_rate=tc.lr, adam_beta1=tc.betas[0], adam_beta2=tc.betas[1], adam_epsilon=1e-8,
        weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, optim="adamw_torch",
        lr_scheduler_type="cosine", warmup_steps=0,
        # same precision, no activation checkpointing (SFTConfig turns it on by default), CPU
        bf16=bf16, fp16=False, use_cpu=True, **no_ckpt,
        # data: our token blocks as they are
        max_length=spec["seq_len"], packing=False, padding_free=False, train_sampling_strategy="sequential",
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=False,
        # no eval, no saving, no reporting; log every step (pocketlm writes a metrics row every step as well)
        eval_strategy="no", save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, seed=SEED,
    )
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                         processing_class=tok, data_collator=collate, callbacks=[Stamp()])
    setup_s = time.perf_counter() - t0
    rss_start = _rss_now_mb()
    start = time.perf_counter()
    trainer.train()
    window, per_step = _step_window(stamps, start, spec["warmup"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "setup_s": setup_s, "window_s": window, "per_step_s": per_step, "losses": losses, "rss_start_mb": rss_start,
        "teacher_loaded": True, "torch_threads": torch.get_num_threads(), "trl_version": trl.__version__,
        "gkd_module": GKDTrainer.__module__,
        "activation_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
    }


WORKERS = {"prep": worker_prep, "cache": worker_cache, "pocketlm": worker_pocketlm, "trl": worker_trl}


def run_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    load0 = os.getloadavg()[0]
    out = WORKERS[spec["stage"]](spec)
    out.update(peak_rss_mb=_peak_rss_mb(), loadavg_start=load0, loadavg_end=os.getloadavg()[0])
    Path(spec["out"]).write_text(json.dumps(out))


# ================================================================================================ parent side
def spawn(stage: str, spec: dict, workdir: Path, label: str) -> dict:
    spec = {**spec, "stage": stage, "workdir": str(workdir)}
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_")
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec["out"] = str(out_path)
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, **({"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {}),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error", "TRL_EXPERIMENTAL_SILENCE": "1"}
    print(f"[bench] {label} ...", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", str(spec_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"[bench] {label} failed (exit {proc.returncode}); last output:\n{tail}")
    out = json.loads(out_path.read_text())
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _aggregate(rs: list[dict], warmup: int) -> dict:
    """Repeats of one (trainer, student): median tokens/s, highest peak RSS, the first repeat's losses."""
    return {
        "tokens_per_s": _median([r["tokens_per_s"] for r in rs]),
        "tokens_per_s_repeats": [r["tokens_per_s"] for r in rs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        "rss_start_mb": rs[0]["rss_start_mb"],
        "timed_step_s": [x for r in rs for x in r["per_step_s"][warmup:]],
        "losses": rs[0]["losses"],
        "loadavg_start": min(r["loadavg_start"] for r in rs),
        "loadavg_end": max(r["loadavg_end"] for r in rs),
        "repeats": rs,
    }


def _fmt_loss(x) -> str:
    return "n/a" if x is None else f"{x:.5f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps, excluded from the timing (default 2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="block length L; tokens trained per step = B·(L−1)")
    p.add_argument("--layers", default="8,4", help="student depths, comma separated (default 8,4: the demo's "
                                                   "student and one half its size)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 for all (default), or bf16 autocast for all (pocketlm train.precision=bf16, TRL bf16=True)")
    p.add_argument("--train-blocks", type=int, default=64,
                   help="training blocks the cache is built over and the runs draw from (default 64; 0 = all 1073 "
                        "of WikiText-2: a cache build of ~15 min at 1 thread)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"subset of {','.join(TRAINERS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in every process (default 1; 0 = torch's default, one per core). "
                        "On a shared machine 2 threads make every parallel op wait for a descheduled thread: "
                        "see benchmarks/README.md")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each (trainer, student) this many times, round robin; report the median")
    p.add_argument("--json", dest="json_out", help="write the results here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder (students, cache, logs)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        run_worker(a._worker)
        return 0
    if a.steps < 1 or a.warmup < 0 or a.repeats < 1 or a.threads < 0:
        p.error("--steps and --repeats must be >= 1, --warmup and --threads >= 0")
    layer_list = [int(x) for x in a.layers.split(",") if x.strip()]
    trainers = [t for t in a.trainers.split(",") if t]
    if bad := set(trainers) - set(TRAINERS):
        p.error(f"unknown trainer(s) {sorted(bad)}")

    workdir = Path(tempfile.mkdtemp(prefix="kd_throughput-"))
    base = {"steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size, "seq_len": a.seq_len,
            "precision": a.precision, "train_blocks": a.train_blocks, "layer_list": layer_list,
            "threads": a.threads}
    tokens_per_step = a.batch_size * (a.seq_len - 1)
    results: dict = {"settings": {**base, "trainers": trainers, "tokens_per_step": tokens_per_step,
                                  "python": sys.version.split()[0], "cpu_count": os.cpu_count()}}
    try:
        prep = spawn("prep", base, workdir, "prepare (teacher, blocks, initial students)")
        results["prep"] = prep
        print(f"[bench] data: {prep['source']}; {prep['n_train_blocks']} of {prep['n_train_blocks_all']} training "
              f"blocks of {a.seq_len} tokens used; torch threads {prep['torch_threads']}", flush=True)
        if prep["n_train_blocks"] < prep["blocks_needed"]:
            print(f"[bench] note: {prep['blocks_needed']} blocks are drawn; the runs pass over the "
                  f"{prep['n_train_blocks']} blocks more than once (same order for all trainers)")
        cache_info = None
        if "pocketlm-cache" in trainers:
            cache_info = spawn("cache", base, workdir, "build the teacher cache")
            results["cache_build"] = cache_info
        reps: dict = {f"{t}/{n}": [] for n in layer_list for t in trainers}
        for i in range(a.repeats):  # round robin, so slow drift in the machine's load hits every trainer alike
            for n in layer_list:
                for t in trainers:
                    spec = {**base, "layers": n}
                    label = f"{t} student {n} layers" + (f" (repeat {i + 1}/{a.repeats})" if a.repeats > 1 else "")
                    if t == "trl-gkd":
                        r = spawn("trl", spec, workdir, label)
                    else:
                        r = spawn("pocketlm", {**spec, "mode": t.split("-")[1]}, workdir, label)
                    r["tokens_per_s"] = tokens_per_step * a.steps / r["window_s"]
                    reps[f"{t}/{n}"].append(r)
        runs = {key: _aggregate(rs, a.warmup) for key, rs in reps.items()}
        results["runs"] = runs
    finally:
        if a.keep:
            print(f"[bench] work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ report
    print()
    print(f"KD training throughput: {a.precision}, batch {a.batch_size} × L {a.seq_len} "
          f"({tokens_per_step} trained tokens/step), {a.warmup} warm-up + {a.steps} timed steps, "
          f"{prep['torch_threads']} torch thread(s), {a.repeats} repeat(s) (median), "
          f"teacher smollm2-135m-instruct (30 layers, fp32 weights)")
    hdr = (f"{'trainer':<16} {'student':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'RSS@start MB':>13} "
           f"{'step s (min-max)':>17} {'1st-step loss':>14} {'last loss':>10} {'load avg':>9}")
    print(hdr)
    print("-" * len(hdr))
    for n in layer_list:
        for t in trainers:
            r = runs[f"{t}/{n}"]
            timed = r["timed_step_s"]
            first = r["losses"][0] if r["losses"] else None
            print(f"{t:<16} {str(n) + ' L':>8} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f} "
                  f"{r['rss_start_mb']:>13.0f} {min(timed):>8.2f}-{max(timed):<8.2f} {_fmt_loss(first):>14} "
                  f"{_fmt_loss(r['losses'][-1] if r['losses'] else None):>10} "
                  f"{r['loadavg_start']:>4.1f}/{r['loadavg_end']:<4.1f}")
    if cache_info:
        L1 = a.seq_len - 1
        build_tok_s = cache_info["n_blocks"] * a.seq_len / cache_info["build_s"]
        per_block = cache_info["cache_bytes"] / cache_info["n_blocks"]
        print(f"\nteacher cache: {cache_info['n_blocks']} blocks built in {cache_info['build_s']:.1f} s "
              f"({build_tok_s:.0f} teacher tokens/s, top-{cache_info['top_k']}, batch {cache_info['batch_size']}; "
              f"teacher load {cache_info['teacher_load_s']:.1f} s not counted), {cache_info['cache_bytes'] / 2**20:.1f} "
              f"MiB on disk = {per_block / 1024:.1f} KiB/block (all {prep['n_train_blocks_all']} training blocks: "
              f"{per_block * prep['n_train_blocks_all'] / 2**20:.0f} MiB); peak RSS of the build "
              f"{cache_info['peak_rss_mb']:.0f} MB")
        # the cache is held in memory whole; what a cache of all the training data would add to the cache runs
        extra_mb = per_block * (prep["n_train_blocks_all"] - cache_info["n_blocks"]) / 2**20
        for n in layer_list:
            r = runs.get(f"pocketlm-cache/{n}")
            if r and extra_mb > 0:
                r["peak_rss_full_cache_projected_mb"] = r["peak_rss_mb"] + extra_mb
                print(f"  pocketlm-cache, {n} layers: peak RSS with a cache of all {prep['n_train_blocks_all']} "
                      f"training blocks ≈ {r['peak_rss_full_cache_projected_mb']:.0f} MB (measured + the larger "
                      f"cache held in memory)")
        # one epoch over the cached blocks: the build is linear in the blocks, so this does not depend on how many
        epoch_tokens = (cache_info["n_blocks"] // a.batch_size) * a.batch_size * L1
        for n in layer_list:
            r = runs.get(f"pocketlm-cache/{n}")
            if r:
                amort = epoch_tokens / (cache_info["build_s"] + epoch_tokens / r["tokens_per_s"])
                r["amortised_one_epoch_tokens_per_s"] = amort
                print(f"  pocketlm-cache, {n} layers, amortised over one epoch (cache build + training): "
                      f"{amort:.1f} tokens/s")
    ratios: dict = {}
    if "trl-gkd" in trainers:
        print("\nratios against TRL GKDTrainer (same run):")
        for n in layer_list:
            trl_r = runs[f"trl-gkd/{n}"]
            for t in ("pocketlm-cache", "pocketlm-online"):
                r = runs.get(f"{t}/{n}")
                if not r:
                    continue
                rr = {"tokens_per_s": r["tokens_per_s"] / trl_r["tokens_per_s"],
                      "median_step_time": _median(trl_r["timed_step_s"]) / _median(r["timed_step_s"]),
                      "peak_rss": r["peak_rss_mb"] / trl_r["peak_rss_mb"]}
                line = (f"  {n} layers  {t:<16} / trl-gkd: tokens/s ×{rr['tokens_per_s']:.2f} "
                        f"(from median step times ×{rr['median_step_time']:.2f}), peak RSS ×{rr['peak_rss']:.2f}")
                if "amortised_one_epoch_tokens_per_s" in r:
                    rr["amortised_tokens_per_s"] = r["amortised_one_epoch_tokens_per_s"] / trl_r["tokens_per_s"]
                    line += f" (amortised over one epoch incl. cache build: ×{rr['amortised_tokens_per_s']:.2f})"
                ratios[f"{t}/{n}"] = rr
                print(line)
        target = ratios.get("pocketlm-cache/8")
        if target:
            ok = target["tokens_per_s"] >= 2.0 and target["peak_rss"] < 1.0
            print(f"  target (the demo's student, 8 layers: pocketlm-cache ≥ 2× TRL tokens/s with lower peak "
                  f"memory): {'MET' if ok else 'NOT MET'} (×{target['tokens_per_s']:.2f}, "
                  f"peak RSS ×{target['peak_rss']:.2f})")
            results["target_met"] = ok
        else:
            print("  target (the demo's student, 8 layers): not measured in this run (add 8 to --layers)")
        print("\nfirst-step loss on the same batch (forward KL(teacher‖student), mean over B·(L−1) tokens; "
              "cache: top-k + tail bucket, a lower bound of the full KL):")
        for n in layer_list:
            trl_loss = (runs[f"trl-gkd/{n}"]["losses"] or [None])[0]
            for t in ("pocketlm-cache", "pocketlm-online"):
                r = runs.get(f"{t}/{n}")
                if r and r["losses"] and trl_loss:
                    rel = r["losses"][0] / trl_loss - 1
                    ratios.setdefault(f"{t}/{n}", {})["first_loss_rel_diff"] = rel
                    print(f"  {n} layers  {t:<16} {r['losses'][0]:.5f} vs trl-gkd {trl_loss:.5f} "
                          f"({rel:+.3%})")
    results["ratios"] = ratios
    loads = [r[k] for r in runs.values() for k in ("loadavg_start", "loadavg_end")]
    ncpu = os.cpu_count() or 1
    if max(loads) > ncpu + 0.5:
        print(f"\nnote: 1-minute load average reached {max(loads):.1f} on {ncpu} CPUs during the runs: other work "
              f"shared the cores, absolute tokens/s are disturbed (the ratios less so, but not immune)")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
