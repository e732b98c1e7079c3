"""The report's figures: matplotlib (Agg) → PNG → ``data:`` URI, so the HTML page is one self-contained file.

Here, below the report, so that a task's own report part (`tasks.base.ReportPart`) can draw them. Each function takes plain numbers from results.json and returns a data URI (or None when there is nothing to
draw). Text in figures is rasterised, so nothing a model wrote can become markup through a plot.
"""
from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any, Sequence

from pocketlm.core.io import figure_data_uri

ROLE_COLORS = {"teacher": "#7f7f7f", "student": "#1f77b4", "ce_baseline": "#ff7f0e"}
Interval = tuple[float, float] | None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(fig) -> str:
    uri = figure_data_uri(fig)
    _plt().close(fig)
    return uri


def png_file_uri(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _err(value: float, ci: Interval) -> list[float]:
    if ci is None or not (_finite(ci[0]) and _finite(ci[1])):
        return [0.0, 0.0]
    return [max(0.0, value - ci[0]), max(0.0, ci[1] - value)]


def training_curves(histories: dict[str, list[dict[str, Any]]]) -> str | None:
    """Loss (with its KD and CE parts), validation perplexity and tokens/s over steps, one line per run."""
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for role, rows in histories.items():
        color = ROLE_COLORS.get(role)
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], color=color, label=f"{role} loss")
        for part, style in (("kd", ":"), ("ce", "--")):
            if any(part in r for r in rows) and role != "ce_baseline":
                axes[0].plot(steps, [r.get(part, math.nan) for r in rows], color=color, ls=style, alpha=0.7,
                             label=f"{role} {part}")
        val = [(r["step"], r["val_perplexity"]) for r in rows if _finite(r.get("val_perplexity"))]
        if val:
            axes[1].plot(*zip(*val), marker="o", color=color, label=role)
        axes[2].plot(steps, [r.get("tokens_per_s", math.nan) for r in rows], color=color, label=role)
    for ax, title in zip(axes, ("training loss", "validation perplexity (blocks)", "tokens / s")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return to_data_uri(fig)


def metric_bars(metrics: Sequence[tuple[str, dict[str, tuple[float, Interval]]]], title: str) -> str | None:
    """One small panel per metric: a bar per model with its 95 % interval as an error bar."""
    metrics = [(name, {r: v for r, v in by_role.items() if _finite(v[0])}) for name, by_role in metrics]
    metrics = [(n, b) for n, b in metrics if b]
    if not metrics:
        return None
    plt = _plt()
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, by_role) in zip(axes.flat, metrics):
        roles = list(by_role)
        values = [by_role[r][0] for r in roles]
        errs = list(zip(*[_err(by_role[r][0], by_role[r][1]) for r in roles]))
        ax.bar(range(len(roles)), values, yerr=errs, capsize=4, color=[ROLE_COLORS.get(r, "#2ca02c") for r in roles])
        ax.set_xticks(range(len(roles)), roles, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_data_uri(fig)


def group_bars(metric: str, groups: Sequence[str], by_role: dict[str, list[tuple[float | None, Interval]]],
               title: str) -> str | None:
    """Horizontal bars per group (category), one per model, with 95 % intervals."""
    if not groups or not by_role:
        return None
    plt = _plt()
    roles = list(by_role)
    height = 0.8 / len(roles)
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.34 * len(groups) * len(roles)))
    for j, role in enumerate(roles):
        vals = [v if _finite(v) else 0.0 for v, _ in by_role[role]]
        errs = list(zip(*[_err(v if _finite(v) else 0.0, ci if _finite(v) else None) for v, ci in by_role[role]]))
        ax.barh([i + j * height for i in range(len(groups))], vals, height=height, xerr=errs, capsize=3,
                color=ROLE_COLORS.get(role, "#2ca02c"), label=role)
    ax.set_yticks([i + height * (len(roles) - 1) / 2 for i in range(len(groups))], list(groups), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_data_uri(fig)


def expert_load(history: list[dict[str, Any]]) -> str | None:
    """The trainer's expert-load heat-maps (`distill.moe_telemetry.plot_expert_load`), from the logged history."""
    import tempfile

    from pocketlm.distill.moe_telemetry import plot_expert_load

    if not any(r.get("moe") for r in history):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_expert_load(history, Path(tmp) / "moe_load.png")
        return png_file_uri(path) if path else None
