#!/usr/bin/env python
"""MoE layer forward+backward tokens/s: pocketlm's dropless `MoELayer` against transformers' Mixtral sparse MoE block.

Both sides get the same dimensions and the same weights: pocketlm's top-k softmax router and experts are copied into
a `MixtralSparseMoeBlock` (router `gate.weight`, experts `gate_up_proj` / `down_proj`: the same layout). For each
size the outputs and the gradients (input, router, experts) are checked equal before anything is timed. Then, for
each transformers experts backend that runs on CPU (`eager`: a loop over the hit experts with `index_add_`;
`grouped_mm`: tokens sorted by expert, `torch._grouped_mm`; `batched_mm`: one weight matrix gathered per token
slot), fwd+bwd is timed round robin with ours, and the ratio ours / theirs is printed per backend and size.
`batched_mm` is run only where the weights it gathers (token slots × 3·f·d floats, twice with their gradients) fit
under `--batched-mm-max-gib`; elsewhere it is reported as out of memory with that figure.

Our layer does all it does in training: router, dropless dispatch and its telemetry (tokens per expert, load CV,
router entropy); the balance loss is off because Mixtral's block does not compute one (the model does, outside it).
tokens/s = tokens / the shortest wall time of one forward+backward over `--repeats` timed rounds, after one warm-up
(the minimum, as timeit advises, because on a shared machine other processes only ever add time; the medians
are in the JSON too).

    python benchmarks/moe_dispatch.py                   # E=8 k=2 f=1024 and E=32 k=4 f=256, d=512, 256-8192 tokens
    python benchmarks/moe_dispatch.py --quick           # 256 and 2048 tokens, 3 repeats
    python benchmarks/moe_dispatch.py --json dispatch.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from pocketlm.config import MoEConfig
from pocketlm.models.moe import Experts, MoELayer
from pocketlm.models.routers import build_router

BACKENDS = ("eager", "grouped_mm", "batched_mm")
SHAPES = ((8, 2, 1024), (32, 4, 256))  # (E, k, f)


def build_pair(d: int, E: int, k: int, f: int, seed: int = 0) -> tuple[MoELayer, dict[str, MixtralSparseMoeBlock]]:
    """Our layer, and one Mixtral block per backend (each with its own config), all with the same weights."""
    torch.manual_seed(seed)
    moe = MoEConfig(router="topk_softmax", num_experts=E, top_k=k, balance_coef=0.0).model_dump()
    ours = MoELayer(build_router("topk_softmax", d, moe, vocab_size=1, layer_idx=0), Experts(E, d, f))
    torch.nn.init.normal_(ours.router.proj.weight, std=0.05)
    torch.nn.init.normal_(ours.experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(ours.experts.down_proj, std=0.02)
    blocks = {}
    for backend in BACKENDS:
        cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k,
                            router_jitter_noise=0.0)
        cfg._experts_implementation = backend  # what from_pretrained(..., experts_implementation=) sets
        block = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            block.gate.weight.copy_(ours.router.proj.weight)
            block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            block.experts.down_proj.copy_(ours.experts.down_proj)
        blocks[backend] = block.train()
    return ours.train(), blocks


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(g)
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


def batched_mm_gib(n: int, k: int, d: int, f: int) -> float:
    """Expert weights batched_mm gathers, one copy per token slot, and their gradients: n·k·3·f·d floats × 2."""
    return 2 * n * k * 3 * f * d * 4 / 2**30


def check_equal(ours: MoELayer, theirs: MixtralSparseMoeBlock, x: torch.Tensor, g: torch.Tensor, backend: str) -> float:
    """Largest |difference| of outputs and gradients; raises if they are not equal to fp32 tolerance."""
    a, ga = fwd_bwd(ours, x, g)
    b, gb = fwd_bwd(theirs, x, g)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{backend}: outputs differ")
    worst = (a - b).abs().max().item()
    for name, u, v in zip(["input", "router", "gate_up_proj", "down_proj"], ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=f"{backend}: {name} gradients differ")
        worst = max(worst, (u - v).abs().max().item())
    return worst


def time_round_robin(mods: dict[str, torch.nn.Module], x: torch.Tensor, g: torch.Tensor, repeats: int) -> dict:
    for m in mods.values():
        fwd_bwd(m, x, g)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in mods}
    for _ in range(repeats):
        for name, m in mods.items():
            t0 = time.perf_counter()
            fwd_bwd(m, x, g)
            times[name].append(time.perf_counter() - t0)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def run_shape(E: int, k: int, f: int, d: int, sizes: list[int], repeats: int, max_gib: float) -> list[dict]:
    rows = []
    for n in sizes:
        ours, blocks = build_pair(d, E, k, f)
        g = torch.Generator().manual_seed(n)
        x = torch.randn(1, n, d, generator=g)
        grad = torch.randn(1, n, d, generator=g)
        runnable = [b for b in BACKENDS if b != "batched_mm" or batched_mm_gib(n, k, d, f) <= max_gib]
        worst = {b: check_equal(ours, blocks[b], x, grad, b) for b in runnable}
        timed = time_round_robin({"pocketlm": ours, **{b: blocks[b] for b in runnable}}, x, grad, repeats)
        secs = {name: best for name, (best, _) in timed.items()}
        row = {"E": E, "k": k, "f": f, "d": d, "tokens": n, "pocketlm_tok_s": n / secs["pocketlm"],
               "median_tok_s": {name: n / median for name, (_, median) in timed.items()}}
        for b in BACKENDS:
            if b in secs:
                row[f"{b}_tok_s"] = n / secs[b]
                row[f"ratio_vs_{b}"] = secs[b] / secs["pocketlm"]
                row[f"max_abs_diff_{b}"] = worst[b]
            else:
                row[f"{b}_oom_gib"] = batched_mm_gib(n, k, d, f)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    parts = [f"E={r['E']:<2} k={r['k']} f={r['f']:<4} tokens={r['tokens']:<5} pocketlm {r['pocketlm_tok_s']:8.0f} tok/s"]
    for b in BACKENDS:
        if f"ratio_vs_{b}" in r:
            parts.append(f"{b} {r[f'{b}_tok_s']:8.0f} tok/s → ×{r[f'ratio_vs_{b}']:.2f}")
        else:
            parts.append(f"{b}: not run, would gather {r[f'{b}_oom_gib']:.1f} GiB (out of memory at this size)")
    return " | ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,1024,2048,8192", help="token counts (one sequence of n tokens)")
    ap.add_argument("--quick", action="store_true", help="sizes 256,2048 and 3 repeats")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--batched-mm-max-gib", type=float, default=4.0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [256, 2048] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), d={args.hidden}, fp32, fwd+bwd; "
          f"ratio = pocketlm tokens/s ÷ backend tokens/s (best of {repeats})")
    t0 = time.perf_counter()
    rows = [r for E, k, f in SHAPES for r in run_shape(E, k, f, args.hidden, sizes, repeats, args.batched_mm_max_gib)]
    for b in ("eager", "grouped_mm"):
        ratios = [r[f"ratio_vs_{b}"] for r in rows]
        print(f"vs {b}: min ×{min(ratios):.2f}, max ×{max(ratios):.2f}")
    best = [min(r[f"ratio_vs_{b}"] for b in BACKENDS if f"ratio_vs_{b}" in r) for r in rows]
    print(f"vs the best backend at each size: min ×{min(best):.2f}; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
