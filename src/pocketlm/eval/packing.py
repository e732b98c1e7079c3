"""Shared-prefix packing: requests that begin with the same tokens run as one row, the shared part computed once.

Multiple-choice suites score several continuations of one context — BBQ three answers after a ~100-token context,
StereoSet three completions of one sentence, CrowS-Pairs two sentences that part at the changed words. A group of
requests with common prefix P is laid out as one row ``P s_1 s_2 … s_m`` (s_i: request i's tokens after P) with

* a 4-D attention mask that is the prefix tree's ancestor relation: a token of s_i attends to P and to the earlier
  tokens of s_i, never to another s_j (tree attention, as in SpecInfer's and Medusa's token trees);
* position ids that restart at |P| for every s_i,

so each request sees exactly the tokens at exactly the positions it would see in a row of its own, and gets the
same log-probabilities (checked on every model by a probe before packing is used, see ``loglik._Forward``), while
the model runs |P| + Σ|s_i| tokens instead of m·|P| + Σ|s_i|. The mask replaces the model's own in every layer, so
it carries the model's sliding window itself, and where full-attention and sliding-window layers mix (Gemma-2/3,
Qwen2 with ``max_window_layers``) it is one mask per layer type (`layer_windows`).

Shape legend: b = rows in a batch, t = padded row length, n = scored tokens in a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

PAD_SEGMENT = -1  # segment id of padding positions


@dataclass
class Row:
    """One model input row and what to read from it.

    ``segments[j]`` is 0 for the shared prefix and i + 1 for the remainder of the row's i-th request (None: a
    plain causal row of one request). ``reads`` holds, per request, (request index, row positions whose logits
    predict its continuation, the continuation's tokens).
    """

    tokens: list[int]
    positions: list[int]
    segments: list[int] | None
    reads: list[tuple[int, list[int], list[int]]]

    def __len__(self) -> int:
        return len(self.tokens)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plain_row(index: int, tokens: list[int], n_targets: int, targets: list[int]) -> Row:
    """A row holding one request: model input ``tokens``, the last ``n_targets`` positions predict ``targets``."""
    n = len(tokens)
    return Row(tokens, list(range(n)), None, [(index, list(range(n - n_targets, n)), targets)])


def _tree_row(members: list[int], inputs: list[list[int]], targets: list[list[int]], shared: int) -> Row:
    prefix = inputs[members[0]][:shared]
    tokens, positions, segments = list(prefix), list(range(shared)), [0] * shared
    reads = []
    for seg, i in enumerate(members, start=1):
        start = len(tokens)
        rest = inputs[i][shared:]
        tokens += rest
        positions += range(shared, shared + len(rest))
        segments += [seg] * len(rest)
        n = len(inputs[i])
        # input position q of request i sits at row index q (q < shared) or start + q - shared
        where = [q if q < shared else start + q - shared for q in range(n - len(targets[i]), n)]
        reads.append((i, where, targets[i]))
    return Row(tokens, positions, segments, reads)


def pack_requests(
    inputs: list[list[int]], targets: list[list[int]], *, max_row_tokens: int, max_members: int = 32,
    min_shared: int = 4,
) -> list[Row]:
    """Group requests by shared prefix into rows; a request that shares nothing worth packing gets a plain row.

    Requests are visited in lexicographic order of their inputs, so those sharing the longest prefixes are
    neighbours. A request joins the open group when that saves tokens: with m members sharing P, adding one
    whose common prefix with P is p saves m·p tokens, against (m − 1)·|P| saved now, so it joins iff
    m·p > (m − 1)·|P|, p ≥ ``min_shared``, and the row stays within ``max_row_tokens`` and ``max_members``.
    """
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    rows: list[Row] = []
    members: list[int] = []
    shared = 0
    row_len = 0

    def close() -> None:
        if len(members) == 1:
            i = members[0]
            rows.append(plain_row(i, inputs[i], len(targets[i]), targets[i]))
        elif members:
            rows.append(_tree_row(members, inputs, targets, shared))

    for i in order:
        if members:
            p = min(_common_prefix(inputs[members[0]], inputs[i]), shared)
            m = len(members)
            # the m old suffixes grow by shared - p each, the prefix shrinks by as much once
            new_len = row_len + (m - 1) * (shared - p) + len(inputs[i]) - p
            if (p >= min_shared and m * p > (m - 1) * shared and m < max_members and new_len <= max_row_tokens):
                members.append(i)
                shared, row_len = p, new_len
                continue
            close()
        members, shared, row_len = [i], len(inputs[i]), len(inputs[i])
    close()
    return rows


Windows = int | dict[str, int | None] | None  # one sliding window for every layer, or one per layer type


def layer_windows(config: object) -> Windows:
    """The sliding window the tree mask must carry for the model's layers: None (every layer attends fully), an int
    (every layer slides over that many positions, as Mistral's), or {layer type: window} where full-attention and
    sliding-window layers mix (Gemma-2/3, Cohere2, gpt-oss, Qwen2 with ``max_window_layers``).

    A 4-D mask replaces the model's own in every layer, so one mask cannot serve both kinds of layer; transformers
    takes a dict of masks keyed by layer type for these models (each layer reads ``mask[config.layer_types[i]]``).
    Raises ValueError for layer types a tree mask cannot express (chunked or recurrent attention)."""
    window = getattr(config, "sliding_window", None)
    if window is not None and not isinstance(window, int):
        raise ValueError(f"a sliding_window of {window!r} takes no prefix-tree mask")
    window = window if window is not None and window > 0 else None
    types = getattr(config, "layer_types", None)
    if not types:
        return window
    per_type = {"full_attention": None, "sliding_attention": window}
    unknown = sorted(set(types) - set(per_type))
    if unknown:
        raise ValueError(f"layer types {unknown} take no prefix-tree mask")
    if "sliding_attention" in types and window is None:
        raise ValueError("sliding-window layers without a sliding_window")
    if len(set(types)) == 1:
        return per_type[types[0]]
    return per_type


def smallest_window(windows: object) -> int | None:
    """The narrowest window in ``windows`` (`Windows`, or a config's raw ``sliding_window``); None: none slides."""
    found = [w for w in (windows.values() if isinstance(windows, dict) else [windows]) if isinstance(w, int) and w > 0]
    return min(found, default=None)


def batch_tensors(rows: list[Row], device: torch.device, mask_kind: str | None, window: Windows = None):
    """Right-padded ``input_ids`` [b, t]; with ``mask_kind`` ("bool" or "additive") also ``position_ids`` [b, t]
    and the 4-D tree mask [b, 1, t, t] (True / 0.0 where attending is allowed; with a sliding ``window``, only keys
    fewer than ``window`` positions back, as Mistral's mask; with a dict of windows (`layer_windows`), a dict of
    such masks keyed by layer type); and the reads, flattened: request index, row, position and target per scored
    token [n] each."""
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # [b, t]
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r.tokens, dtype=torch.long)
    req, row_ix, pos, tgt = [], [], [], []
    for b, r in enumerate(rows):
        for index, where, targets in r.reads:
            req += [index] * len(where)
            row_ix += [b] * len(where)
            pos += where
            tgt += targets
    reads = tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (req, row_ix, pos, tgt))
    if mask_kind is None:
        return input_ids.to(device), None, None, reads
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)  # [b, t]
    segments = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.long)  # [b, t]
    for i, r in enumerate(rows):
        position_ids[i, : len(r)] = torch.tensor(r.positions, dtype=torch.long)
        segments[i, : len(r)] = torch.tensor(r.segments if r.segments is not None else [0] * len(r))
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]  # [t, t]: key <= query
    q_seg, k_seg = segments[:, :, None], segments[:, None, :]  # [b, t, 1], [b, 1, t]
    real = (k_seg != PAD_SEGMENT) & (q_seg != PAD_SEGMENT)
    allowed = causal[None] & ((k_seg == 0) | (k_seg == q_seg)) & real  # [b, t, t]
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # a padding query attends to itself (never read)

    def mask_for(w: int | None) -> torch.Tensor:
        # an ancestor's position difference is its distance in the request's own sequence (a query's own key: 0)
        keep = allowed if w is None else allowed & ((position_ids[:, :, None] - position_ids[:, None, :]) < w)
        mask = keep[:, None]  # [b, 1, t, t]
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)
        return mask.to(device)

    masks = {layer: mask_for(w) for layer, w in window.items()} if isinstance(window, dict) else mask_for(window)
    return input_ids.to(device), position_ids.to(device), masks, reads
