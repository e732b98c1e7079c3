"""Attention heat-maps: PNG grids (matplotlib) and one self-contained interactive HTML page (jinja2).

PNG: one figure per layer with a panel per head (or one panel for a chosen head); queries on the y axis, keys on the
x axis, tokens on both. HTML: pick a layer and a head, hover a token to see where it attends (bertviz's idea, with
no external resources: the data, script and style are inline). Teacher and student sit side by side when both are
given; when their tokens are the same, hovering a token in one highlights it in both.

Model output and user text are untrusted: the page is rendered with autoescape on, the data travels as JSON in a
`<script type="application/json">` block through jinja2's `tojson` (which escapes <, >, & and '), and the script
only ever writes text through `textContent`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure

from pocketlm.inspect.attention import AttentionMaps, capture_attention, mean_entropy
from pocketlm.core.io import write_text_atomic
from pocketlm.core.results import Metric, Results

MAX_LABELS = 48  # more tokens than this: label every k-th so the axis stays legible


def _axis_label(token: str) -> str:
    """A token as a tick label: mathtext off (a `$` would start a formula), empty tokens visible."""
    return token.replace("$", r"\$") or "∅"


def layer_figure(
    pattern: torch.Tensor, tokens: Sequence[str], *, title: str, head_ids: Sequence[int] | None = None
) -> Figure:
    """pattern [n_h, s, s] → a figure with one heat-map panel per head (and one shared colour bar)."""
    n_h, s, _ = pattern.shape
    if len(tokens) != s:
        raise ValueError(f"{len(tokens)} tokens for a pattern over {s} positions")
    head_ids = list(range(n_h)) if head_ids is None else list(head_ids)
    cols = math.ceil(math.sqrt(n_h))
    rows = math.ceil(n_h / cols)
    side = min(max(2.6, 0.16 * s + 1.2), 9.0)  # inches per panel
    fig = Figure(figsize=(cols * side + 0.8, rows * side + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    step = max(1, math.ceil(s / MAX_LABELS))
    ticks = list(range(0, s, step))
    labels = [_axis_label(tokens[i]) for i in ticks]
    fontsize = max(4.0, min(8.0, 220.0 / s))
    image, used = None, []
    for idx, ax in enumerate(axes.flat):
        if idx >= n_h:
            ax.remove()  # exactly one panel per head
            continue
        used.append(ax)
        image = ax.imshow(pattern[idx].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {head_ids[idx]}", fontsize=9)
        ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, labels, fontsize=fontsize)
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    fig.colorbar(image, ax=used, shrink=0.6, label="attention")
    fig.suptitle(title, fontsize=10)
    return fig


def panels(fig: Figure) -> int:
    """How many heat-map panels a figure holds (axes with an image; the colour bar is not one)."""
    return sum(1 for ax in fig.axes if ax.images)


def write_heatmaps(
    maps: AttentionMaps,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "",
    layer: int | None = None,
    head: int | None = None,
    dpi: int = 100,
) -> list[Path]:
    """Write `{prefix}layer{L}.png` for every layer (or only `layer`), or `{prefix}layer{L}_head{H}.png` for one
    head (`head` is the original head index; it needs `layer`). Returns the paths written."""
    check_selection(maps, layer, head)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for li in range(maps.num_layers) if layer is None else [layer]:
        pattern, heads = maps.patterns[li], maps.head_ids[li]
        name = f"{prefix}layer{li}"
        if head is not None:
            pattern, heads = pattern[heads.index(head)][None], [head]
            name += f"_head{head}"
        title = f"{maps.spec} · layer {li}" + (f" · head {head}" if head is not None else "")
        fig = layer_figure(pattern, maps.tokens, title=title, head_ids=heads)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def check_selection(maps: AttentionMaps, layer: int | None, head: int | None) -> None:
    """A chosen layer/head must exist in the model; the message says what does."""
    if head is not None and layer is None:
        raise ValueError("--head needs --layer (a head is chosen within a layer)")
    if layer is not None and not 0 <= layer < maps.num_layers:
        raise ValueError(f"{maps.spec} has layers 0..{maps.num_layers - 1}; --layer {layer} is not one of them")
    if head is not None and head not in maps.head_ids[layer]:
        raise ValueError(f"{maps.spec} layer {layer} has heads {maps.head_ids[layer]}; --head {head} is not one")


# --- interactive HTML -------------------------------------------------------------------------------------------

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{{ title }}</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222}
.views{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
.view{border:1px solid #ccc;border-radius:6px;padding:.8em;overflow:auto;max-width:100%}
.view h2{font-size:1em;margin:.2em 0 .6em}
.strip span{display:inline-block;padding:1px 3px;margin:1px;border-radius:3px;cursor:default;white-space:pre;
  border:1px solid #eee}
.strip span.q{outline:2px solid #d33}
table.m{border-collapse:collapse;margin-top:.6em;font-size:11px}
table.m td{width:14px;height:14px;padding:0;border:1px solid #f4f4f4}
table.m th{font-weight:normal;white-space:pre;padding:0 3px;max-width:9em;overflow:hidden;text-overflow:ellipsis}
table.m thead th{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;height:7em}
table.m tr.q th{color:#d33}
.note{color:#666;font-size:12px}
</style></head><body>
<h1 style="font-size:1.2em">{{ title }}</h1>
<p class="note">Text: <code>{{ text }}</code>. Pick a layer and head; hover a token (in the strip or a row of the
matrix) to see where it attends: darker = more attention (the token strip is scaled to that token's largest
weight). Rows are queries, columns keys.</p>
<div class="views">
{% for view in views %}
<section class="view" data-view="{{ loop.index0 }}">
  <h2>{{ view.label }}: <code>{{ view.spec }}</code></h2>
  <label>layer <select class="layer">{% for l in range(view.layers) %}<option value="{{ l }}">{{ l }}</option>{% endfor %}</select></label>
  <label>head <select class="head"></select></label>
  <span class="note ent"></span>
  <div class="strip">{% for t in view.tokens %}<span data-i="{{ loop.index0 }}">{{ t }}</span>{% endfor %}</div>
  <table class="m"><thead><tr><th></th>{% for t in view.tokens %}<th>{{ t }}</th>{% endfor %}</tr></thead>
  <tbody>{% for t in view.tokens %}{% set i = loop.index0 %}<tr data-i="{{ i }}"><th>{{ t }}</th>{% for _ in view.tokens %}<td></td>{% endfor %}</tr>{% endfor %}</tbody></table>
  <script type="application/json" class="data">{{ view.data | tojson }}</script>
</section>
{% endfor %}
</div>
<script>
(function () {
  "use strict";
  const views = Array.from(document.querySelectorAll("section.view")).map(function (el) {
    const data = JSON.parse(el.querySelector("script.data").textContent);
    return {el: el, data: data, layer: el.querySelector("select.layer"), head: el.querySelector("select.head"),
            ent: el.querySelector(".ent"), strip: Array.from(el.querySelectorAll(".strip span")),
            rows: Array.from(el.querySelectorAll("table.m tbody tr"))};
  });
  function pattern(v) { return v.data.patterns[+v.layer.value][+v.head.value]; }
  function fillHeads(v) {
    const ids = v.data.head_ids[+v.layer.value];
    v.head.replaceChildren();
    ids.forEach(function (h, k) { const o = document.createElement("option"); o.value = k; o.textContent = h; v.head.appendChild(o); });
  }
  function colour(w) { return "rgba(31,90,200," + w.toFixed(3) + ")"; }
  function draw(v) {
    const p = pattern(v);
    v.rows.forEach(function (tr, i) {
      Array.from(tr.querySelectorAll("td")).forEach(function (td, j) { td.style.background = colour(p[i][j]); td.title = p[i][j].toFixed(3); });
    });
    const e = v.data.entropy[+v.layer.value][+v.head.value];
    v.ent.textContent = "entropy " + e.toFixed(3) + " nats";
    show(v, null);
  }
  function show(v, i) {
    v.rows.forEach(function (tr, r) { tr.classList.toggle("q", r === i); });
    const row = i === null ? null : pattern(v)[i];
    const top = row === null ? 1 : Math.max.apply(null, row) || 1;  // the strip is scaled to the row's maximum
    v.strip.forEach(function (sp, j) {
      sp.classList.toggle("q", j === i);
      sp.style.background = row === null ? "" : colour(row[j] / top);
      sp.title = row === null ? "" : row[j].toFixed(3);
    });
  }
  function same(a, b) { return a.data.tokens.length === b.data.tokens.length && a.data.tokens.every(function (t, k) { return t === b.data.tokens[k]; }); }
  function hover(v, i) { views.forEach(function (w) { if (w === v || same(v, w)) show(w, i); }); }
  views.forEach(function (v) {
    fillHeads(v); draw(v);
    v.layer.addEventListener("change", function () { fillHeads(v); draw(v); });
    v.head.addEventListener("change", function () { draw(v); });
    v.strip.forEach(function (sp, i) { sp.addEventListener("mouseenter", function () { hover(v, i); }); });
    v.rows.forEach(function (tr, i) { tr.addEventListener("mouseenter", function () { hover(v, i); }); });
  });
})();
</script>
</body></html>
"""


def _view_data(maps: AttentionMaps, decimals: int) -> dict:
    return {
        "tokens": maps.tokens,
        "head_ids": maps.head_ids,
        "patterns": [[[[round(float(w), decimals) for w in row] for row in head] for head in layer.tolist()]
                     for layer in maps.patterns],
        "entropy": [e.tolist() for e in maps.entropy()],
    }


def render_html(views: Sequence[tuple[str, AttentionMaps]], *, text: str, title: str = "pocketlm attention",
                decimals: int = 3) -> str:
    """The interactive page for [(label, maps)], e.g. [("student", s), ("teacher", t)]."""
    from jinja2 import Environment

    if not views:
        raise ValueError("render_html needs at least one model's attention")
    env = Environment(autoescape=True)
    template = env.from_string(_TEMPLATE)
    return template.render(
        title=title, text=text,
        views=[{"label": label, "spec": m.spec, "tokens": m.tokens, "layers": m.num_layers,
                "data": _view_data(m, decimals)} for label, m in views],
    )


def write_html(path: str | os.PathLike, views: Sequence[tuple[str, AttentionMaps]], *, text: str,
               title: str = "pocketlm attention") -> Path:
    return write_text_atomic(path, render_html(views, text=text, title=title))


# --- the `pocketlm attention` command's API ---------------------------------------------------------------------


def attention_results(
    model_spec: str,
    text: str,
    out_dir: str | os.PathLike,
    *,
    baseline_spec: str | None = None,
    layer: int | None = None,
    head: int | None = None,
    max_tokens: int = 64,
    dtype: str = "float32",
    trust_remote_code: bool | None = None,
) -> Results:
    """Capture `text`'s attention in the model (and the baseline), write PNG heat-maps (`model_*.png`,
    `baseline_*.png`), `attention.html` and `results.json` into `out_dir`; entropy per head as metrics."""
    import hashlib
    import time

    from pocketlm.models.load import load_model
    from pocketlm.core.provenance import provenance
    from pocketlm.models.load import model_info

    start = time.perf_counter()
    if not text or not text.strip():
        raise ValueError("--text is empty")
    if head is not None and layer is None:
        raise ValueError("--head needs --layer (a head is chosen within a layer)")
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
    out = Path(out_dir)
    runs = [("model", model_spec)] + ([("baseline", baseline_spec)] if baseline_spec else [])
    captured: list[tuple[str, AttentionMaps, dict]] = []
    for label, spec in runs:
        model, tokenizer = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        maps = capture_attention(model, tokenizer, text, spec=str(spec), max_tokens=max_tokens)
        check_selection(maps, layer, head)
        captured.append((label, maps, model_info(spec, model, tokenizer)))
        del model
    files: list[str] = []
    metrics: list[Metric] = []
    details: dict = {"files": files}
    for label, maps, _ in captured:
        files += [str(p) for p in write_heatmaps(maps, out, prefix=f"{label}_", layer=layer, head=head)]
        entropy = maps.entropy()
        name = "attention_entropy" if label == "model" else "baseline_attention_entropy"
        metrics.append(Metric(name, mean_entropy(entropy), sum(e.numel() for e in entropy), unit="nats"))
        metrics += [Metric(name, float(e.mean()), e.numel(), group=f"layer {i}", unit="nats")
                    for i, e in enumerate(entropy)]
        details[label] = {"tokens": maps.tokens, "token_ids": maps.token_ids, "head_ids": maps.head_ids,
                          "entropy": [e.tolist() for e in entropy]}
    html = write_html(out / "attention.html", [(label, maps) for label, maps, _ in captured], text=text)
    files.append(str(html))
    return Results(
        kind="attention",
        model=captured[0][2],
        baseline=captured[1][2] if len(captured) > 1 else None,
        data={"source": "text", "hash": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
              "n": len(captured[0][1].tokens)},
        settings={"layer": layer, "head": head, "max_tokens": max_tokens, "dtype": dtype},
        metrics=metrics,
        details=details,
        provenance=provenance(),
        wall_time_s=time.perf_counter() - start,
    )
