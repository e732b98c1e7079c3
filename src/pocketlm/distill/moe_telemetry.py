"""What the trainer does with an MoE student's per-layer router outputs: sum a step's auxiliary losses into the loss,
aggregate its telemetry over micro-batches (sums, not means of ratios), and plot expert load over training.

A layer's `aux` (models/moe.py) holds `aux_loss` (with gradient) and, detached: the weighted losses by name,
`tokens_per_expert` [E], `load_cv`, `dropped_share`, `router_entropy` and `tokens`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from pocketlm.core.io import atomic_path


class StepTelemetry:
    """One optimizer step's router statistics per MoE layer, summed over its micro-batches."""

    def __init__(self) -> None:
        self.load: dict[int, Tensor] = {}  # layer → filled slots per expert [E]
        self.sums: dict[int, dict[str, float]] = {}  # layer → token-weighted sums of the per-call statistics

    def add(self, aux: Sequence[dict[str, Tensor] | None] | None) -> Tensor | None:
        """Record one micro-batch's per-layer aux; return the sum of the layers' auxiliary losses (None: no MoE)."""
        if not aux:
            return None
        total = None
        for i, layer in enumerate(aux):
            if layer is None or "tokens_per_expert" not in layer:
                continue
            total = layer["aux_loss"] if total is None else total + layer["aux_loss"]
            load = layer["tokens_per_expert"].detach().float().cpu()
            self.load[i] = self.load.get(i, torch.zeros_like(load)) + load
            n = float(layer["tokens"])
            sums = self.sums.setdefault(i, {"tokens": 0.0})
            sums["tokens"] += n
            for name, value in layer.items():
                if name not in ("aux_loss", "tokens_per_expert", "tokens", "load_cv"):
                    sums[name] = sums.get(name, 0.0) + n * float(value)
        return total

    def reduced_load(self, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> dict[int, Tensor]:
        """Per-layer load of the step, passed through `reduce` (a sum over processes under DDP)."""
        return {i: reduce(load) for i, load in self.load.items()}

    def row(self) -> dict[str, dict[str, Any]]:
        """{layer: {tokens_per_expert, load_cv, dropped_share, router_entropy, <loss names>}} for metrics.jsonl;
        load_cv is that of the step's summed load."""
        out = {}
        for i, load in sorted(self.load.items()):
            mean = load.mean().item()
            sums = self.sums[i]
            entry: dict[str, Any] = {
                "tokens_per_expert": [int(v) for v in load.tolist()],
                "load_cv": load.std(unbiased=False).item() / mean if mean > 0 else 0.0,
            }
            entry.update({k: v / max(sums["tokens"], 1.0) for k, v in sums.items() if k != "tokens"})
            out[str(i)] = entry
        return out


def plot_expert_load(history: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """A PNG with one heat-map per MoE layer: each expert's share of the layer's routed tokens (rows) at each
    training step (columns), load CV in the title. None when the history holds no MoE telemetry."""
    rows = [(r["step"], r["moe"]) for r in history if r.get("moe")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = sorted({layer for _, moe in rows for layer in moe}, key=int)
    steps = [step for step, _ in rows]
    cols = min(4, len(layers))
    nrows = -(-len(layers) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.6 * nrows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        loads = [moe.get(layer, {}).get("tokens_per_expert") for _, moe in rows]
        width = max(len(x) for x in loads if x)
        share = torch.tensor([[v / max(sum(x), 1) for v in x] if x else [float("nan")] * width for x in loads]).T
        image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, width - 0.5, -0.5))
        last = rows[-1][1].get(layer, {})
        ax.set_title(f"layer {layer}: load CV {last.get('load_cv', float('nan')):.2f} at the end", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of tokens")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle("Expert load per MoE layer over training")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
