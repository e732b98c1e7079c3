"""Head pruning (Michel et al., 2019): remove a student's least important attention heads, physically.

What is removed: **whole KV groups** — one key/value head together with the n_h / n_kv query heads that read it.
With MHA a group is one head, so this is plain head pruning; with GQA/MQA it is the only unit that
- shrinks every projection, k_proj/v_proj included, and so the KV cache, which is what attention costs at
  inference (removing query heads only would leave the cache as large as before);
- keeps the layer a grouped-query attention with equal groups (query head h reads KV head h // group), the layout
  SDPA's `enable_gqa` and a Llama export expect; uneven groups would need a per-head KV index map.
A group's importance is E_x |Σ_{h∈g} ∂L_x/∂ξ_h|, the first-order estimate of the loss change when the whole group
is masked (Michel et al.'s I_h with one mask for the group). Groups are ranked across layers after normalising each
layer's scores by their L2 norm (Michel et al. §4.1, after Molchanov et al., 2017); a layer always keeps at least one
group. The kept groups are recorded in `PocketLMConfig.kept_kv_heads` (original indices), so the pruned student
saves and loads like any other, and each kept head keeps its identity (its ALiBi slope, its place in reports).

Importance is measured on part of the data and perplexity on held-out documents, so the heads are not chosen on
the documents that judge the result.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.core.stats import paired_statistic_delta_ci
from pocketlm.data.text import hash_documents, pack, read_documents, split_documents
from pocketlm.eval.perplexity import document_perplexities, perplexity_metrics
from pocketlm.inspect.attention import HeadImportance, attention_modules, head_importance, is_student
from pocketlm.models.hf_export import save_student_folder
from pocketlm.models.load import load_model, model_info
from pocketlm.models.pruning import as_pocketlm
from pocketlm.models.student import PocketLMForCausalLM


def check_head_count(n_heads: int, group: int, kv_heads: Sequence[int], *, name: str = "--heads") -> None:
    """Whether `n_heads` query heads can be removed from a model whose layers hold `kv_heads` KV heads each, `group`
    query heads per KV head: whole groups only, and each layer keeps at least one (a ValueError naming `name`).
    `plan_pruning` applies it to a loaded model; the pipeline to the shapes a config names, before any model work."""
    if n_heads < 1 or n_heads % group:
        raise ValueError(
            f"{name} must be a positive multiple of the group size {group} (query heads per KV head): pruning "
            f"removes whole KV groups; got {n_heads}"
        )
    removable = sum(k - 1 for k in kv_heads)
    if n_heads // group > removable:
        raise ValueError(
            f"{name} {n_heads} would remove {n_heads // group} KV groups, but only {removable} can go (each layer "
            f"keeps at least one of its groups; {group * sum(kv_heads)} query heads in all)"
        )


def plan_pruning(
    model: torch.nn.Module, importance: HeadImportance, n_heads: int, *, normalize: bool = True
) -> dict[int, list[int]]:
    """{layer: original KV head ids to remove} for the `n_heads` query heads of least importance, in whole groups."""
    attns = attention_modules(model)
    group = attns[0].num_heads // attns[0].num_kv_heads
    check_head_count(n_heads, group, [a.num_kv_heads for a in attns])
    scores = HeadImportance.layer_normalized(importance.per_group) if normalize else importance.per_group
    ranked = sorted(
        ((float(s), layer, local) for layer, layer_scores in enumerate(scores) for local, s in enumerate(layer_scores)),
    )
    left = [a.num_kv_heads for a in attns]
    remove: dict[int, list[int]] = {}
    for _, layer, local in ranked:
        if sum(len(v) for v in remove.values()) == n_heads // group:
            break
        if left[layer] > 1:
            left[layer] -= 1
            remove.setdefault(layer, []).append(attns[layer].kv_head_ids[local])
    return {layer: sorted(ids) for layer, ids in sorted(remove.items())}


def _kept_rows(local_groups: Sequence[int], heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of a [heads·h_d, ...] projection that belong to the given local groups' heads."""
    heads = [g * heads_per_group + r for g in local_groups for r in range(heads_per_group)]
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def prune_student(model: torch.nn.Module, remove: dict[int, Sequence[int]]) -> torch.nn.Module:
    """A new student without the KV groups `remove` names ({layer: original KV head ids}); q/k/v/o projections
    are sliced, everything else copied; the config records the kept groups. The input model is not changed."""
    if not is_student(model):
        raise ValueError(f"prune-heads works on pocketlm students, not on a {type(model).__name__}")
    attns = attention_modules(model)
    kept_local: list[list[int]] = []
    for layer, attn in enumerate(attns):
        gone = set(remove.get(layer, ()))
        unknown = gone - set(attn.kv_head_ids)
        if unknown:
            raise ValueError(f"layer {layer} has KV heads {attn.kv_head_ids}; cannot remove {sorted(unknown)}")
        kept_local.append([i for i, h in enumerate(attn.kv_head_ids) if h not in gone])
        if not kept_local[-1]:
            raise ValueError(f"layer {layer} would keep no KV group; a layer keeps at least one")
    config = copy.deepcopy(model.config)
    config.kept_kv_heads = [[a.kv_head_ids[i] for i in kept] for a, kept in zip(attns, kept_local)]
    config._check()
    state = model.state_dict()
    prefix = "model.layers" if hasattr(model, "model") else "layers"
    for layer, (attn, kept) in enumerate(zip(attns, kept_local)):
        per_group = attn.num_heads // attn.num_kv_heads
        q_rows = _kept_rows(kept, per_group, attn.head_dim)
        kv_rows = _kept_rows(kept, 1, attn.head_dim)
        name = f"{prefix}.{layer}.self_attn"
        state[f"{name}.q_proj.weight"] = state[f"{name}.q_proj.weight"][q_rows]
        state[f"{name}.k_proj.weight"] = state[f"{name}.k_proj.weight"][kv_rows]
        state[f"{name}.v_proj.weight"] = state[f"{name}.v_proj.weight"][kv_rows]
        state[f"{name}.o_proj.weight"] = state[f"{name}.o_proj.weight"][:, q_rows]
    param = next(model.parameters())
    pruned = PocketLMForCausalLM(config).to(device=param.device, dtype=param.dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.eval()


def removed_heads(model: torch.nn.Module, remove: dict[int, Sequence[int]]) -> dict[int, list[int]]:
    """{layer: original query-head ids} that removing the KV groups `remove` takes away."""
    attns = attention_modules(model)
    group = attns[0].num_heads // attns[0].num_kv_heads
    return {layer: [g * group + r for g in ids for r in range(group)] for layer, ids in remove.items()}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _exp_ratio(nll: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(nll.sum(axis=axis) / tokens.sum(axis=axis))


def before_after_metrics(before: Sequence, after: Sequence, seed: int) -> list[Metric]:
    """Held-out perplexity before and after pruning (one group each) and their paired difference with its
    bootstrap interval over documents."""
    metrics = []
    for label, per_doc in (("before", before), ("after", after)):
        metrics += [Metric(m.name, m.value, m.n, m.ci, m.higher_is_better, group=label)
                    for m in perplexity_metrics(per_doc, seed=seed)]
    nll_b, nll_a = [-r.loglikelihood for r in before], [-r.loglikelihood for r in after]
    toks = [r.tokens for r in before]
    delta = _exp_ratio(np.array(nll_a), np.array(toks)) - _exp_ratio(np.array(nll_b), np.array(toks))
    ci = paired_statistic_delta_ci(_exp_ratio, (nll_a, toks), (nll_b, toks), seed=seed)
    return [*metrics, Metric("token_perplexity_delta", float(delta), len(before), ci, higher_is_better=False)]


def prune_heads_results(
    model_spec: str,
    data: str,
    n_heads: int,
    out_dir: str | os.PathLike,
    *,
    field: str = "text",
    split: str = "train",
    txt_split: str = "blank_lines",
    max_documents: int | None = None,
    val_fraction: float = 0.2,
    block_size: int = 128,
    max_blocks: int = 64,
    batch_size: int = 8,
    max_length: int | None = None,
    normalize: bool = True,
    seed: int = 0,
    progress: bool = True,
    trust_remote_code: bool | None = None,
) -> Results:
    """Measure head importance on the training part of `data`, remove the `n_heads` least important query heads
    (whole KV groups), save the pruned student to `out_dir/student`, and report held-out perplexity before and
    after. Bad arguments and data fail before the model loads."""
    start = time.perf_counter()
    _check_counts(n_heads, block_size, max_blocks, batch_size)
    docs = read_documents(data, field=field, split=split, max_documents=max_documents, txt_split=txt_split)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
    model = _as_student(model, model_spec)
    blocks = pack(train_docs, tokenizer, block_size)[:max_blocks]  # [n, L]

    importance = head_importance(model, blocks, batch_size=batch_size, progress=progress)
    remove = plan_pruning(model, importance, n_heads, normalize=normalize)
    pruned = prune_student(model, remove)
    ppl_kwargs = dict(max_length=max_length, batch_size=batch_size, progress=progress)
    before = document_perplexities(model, tokenizer, val_docs, **ppl_kwargs)
    after = document_perplexities(pruned, tokenizer, val_docs, **ppl_kwargs)
    student_dir, layout = _save_checked(pruned, tokenizer, Path(out_dir) / "student", blocks[:1])

    metrics = before_after_metrics(before, after, seed)
    metrics += _size_metrics(model, pruned)
    return Results(
        kind="prune_heads",
        model=model_info(model_spec, model, tokenizer),
        data={"source": str(data), "hash": hash_documents(docs), "n": len(docs),
              "importance_documents": len(train_docs), "perplexity_documents": len(val_docs)},
        settings={"heads": n_heads, "unit": "kv_group", "normalize": "layer_l2" if normalize else None,
                  "val_fraction": val_fraction, "block_size": block_size, "blocks": int(blocks.shape[0]),
                  "batch_size": batch_size, "max_length": max_length, "seed": seed},
        metrics=metrics,
        details=_prune_heads_details(model, pruned, tokenizer, remove, importance, before, after, student_dir, layout),
        provenance=provenance(),
        wall_time_s=time.perf_counter() - start,
    )


def _check_counts(n_heads: int, block_size: int, max_blocks: int, batch_size: int) -> None:
    """Each count at least its minimum, checked before any data is read."""
    for name, value, least in (("--heads", n_heads, 1), ("--block-size", block_size, 2),
                               ("--max-blocks", max_blocks, 1), ("--batch-size", batch_size, 1)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")


def _as_student(model: torch.nn.Module, model_spec: str) -> torch.nn.Module:
    """`model` itself when it is a pocketlm student; a Llama-layout folder (a distilled student is one): its exact
    pocketlm copy; anything else a ValueError."""
    if is_student(model):
        return model
    try:
        return as_pocketlm(model).eval()
    except ValueError as e:
        raise ValueError(f"{model_spec} is a {type(model).__name__}; prune-heads works on pocketlm students "
                         f"and Llama-layout models, and this one is neither ({e})") from None


def _save_checked(pruned: torch.nn.Module, tokenizer, path: Path, probe: torch.Tensor):
    """Save the pruned student to `path` and check that it reloads to the same logits on `probe`; (folder, layout).

    Written beside `path` and swapped in (a folder there pocketlm did not write is refused), as a Llama when every
    layer keeps as many groups, else in pocketlm's layout with the reason."""
    student_dir, layout = save_student_folder(pruned, tokenizer, path)
    reloaded, _ = load_model(student_dir)
    with torch.no_grad():
        if not torch.allclose(reloaded(probe).logits, pruned(probe).logits, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the pruned student saved to {student_dir} does not reload to the same logits")
    return student_dir, layout


def _size_metrics(model: torch.nn.Module, pruned: torch.nn.Module) -> list[Metric]:
    """Attention heads and parameters before and after pruning."""
    heads_before = sum(a.num_heads for a in attention_modules(model))
    heads_after = sum(a.num_heads for a in attention_modules(pruned))
    return [
        Metric("attention_heads", heads_before, 1, group="before"),
        Metric("attention_heads", heads_after, 1, group="after"),
        Metric("parameters", count_parameters(model), 1, group="before"),
        Metric("parameters", count_parameters(pruned), 1, group="after"),
    ]


def _prune_heads_details(model, pruned, tokenizer, remove, importance, before, after, student_dir, layout) -> dict:
    """The Results details of prune-heads: the saved student, what was removed and kept, the measurements."""
    return {
        "student": str(student_dir),
        "student_format": layout.to_dict(),
        "removed_kv_heads": {str(k): v for k, v in remove.items()},
        "removed_query_heads": {str(k): v for k, v in removed_heads(model, remove).items()},
        "kept_kv_heads": pruned.config.kept_kv_heads,
        "importance": importance.to_dict(),
        "perplexity_sums": {"before": [asdict(r) for r in before], "after": [asdict(r) for r in after]},
        "pruned_model": model_info(str(student_dir), pruned, tokenizer),
    }
