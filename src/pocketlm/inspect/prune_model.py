"""`pocketlm prune`: a model cut to a target size by calibration importance (models/pruning.py), saved as a
student folder with its importance record, and held-out perplexity before and after.

The calibration blocks come from the training part of the data and the perplexity from the held-out documents, so
what is kept is not chosen on the text that judges it.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

from pocketlm.core.io import write_text_atomic
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.data.books import read_books
from pocketlm.data.text import hash_documents, pack, read_documents, split_documents
from pocketlm.eval.perplexity import document_perplexities
from pocketlm.inspect.prune import before_after_metrics
from pocketlm.models.hf_export import export_llama
from pocketlm.models.importance import Importance
from pocketlm.models.load import load_model, model_info
from pocketlm.models.pruning import PrunePlan, PruneTarget, choose_target, prune_model, source_config

IMPORTANCE_FILE = "importance.json"


def prune_results(
    model_spec: str,
    data: str,
    target: PruneTarget,
    out_dir: str | os.PathLike,
    *,
    data_format: str = "auto",
    field: str = "text",
    split: str = "train",
    txt_split: str = "blank_lines",
    max_documents: int | None = None,
    val_fraction: float = 0.2,
    block_size: int = 256,
    calibration_blocks: int = 256,
    removal_blocks: int = 16,
    batch_size: int = 8,
    max_length: int | None = None,
    bf16: bool = False,
    seed: int = 0,
    progress: bool = True,
    trust_remote_code: bool | None = None,
) -> Results:
    """Prune `model_spec` (a Llama-family model or a dense pocketlm student) to `target` by importance on
    `calibration_blocks` blocks of the training documents of `data`; save it to out_dir/student with
    out_dir/importance.json, and score held-out perplexity before and after. The target is checked against the
    model's shape before anything is measured."""
    start = time.perf_counter()
    docs = _read_docs(data, data_format, field=field, split=split, max_documents=max_documents, txt_split=txt_split)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
    conf = source_config(model)
    choose_target(conf, target, removal_blocks)  # a target the model cannot be cut to: refused before any work
    calibration = _calibration_sample(pack(train_docs, tokenizer, block_size), calibration_blocks, seed)
    pruned, plan, importance = prune_model(model, target, calibration, removal_blocks=removal_blocks,
                                           batch_size=batch_size, bf16=bf16, progress=progress)
    ppl_kwargs = dict(max_length=max_length, batch_size=batch_size, progress=progress)
    before = document_perplexities(model, tokenizer, val_docs, **ppl_kwargs)
    after = document_perplexities(pruned, tokenizer, val_docs, **ppl_kwargs)

    student_dir, record = _save(pruned, tokenizer, Path(out_dir), importance, plan)
    metrics = before_after_metrics(before, after, seed) + _parameter_metrics(plan, model, pruned)
    return Results(
        kind="prune",
        model=model_info(model_spec, model, tokenizer),
        data={"source": str(data), "hash": hash_documents(docs), "n": len(docs),
              "calibration_documents": len(train_docs), "perplexity_documents": len(val_docs)},
        settings={**{k: v for k, v in vars(target).items()}, "block_size": block_size,
                  "calibration_blocks": int(len(calibration)), "removal_blocks": importance.removal_blocks,
                  "batch_size": batch_size, "max_length": max_length, "bf16": bf16, "val_fraction": val_fraction,
                  "seed": seed},
        metrics=metrics,
        details=_prune_details(conf, plan, pruned, tokenizer, student_dir, record),
        provenance=provenance(),
        wall_time_s=time.perf_counter() - start,
    )


def _read_docs(data: str, data_format: str, *, field: str, split: str, max_documents: int | None,
               txt_split: str) -> list[str]:
    """The documents of `data`: a books folder's texts, or what `read_documents` reads."""
    if data_format == "books":
        return [b.text for b in read_books(data)][:max_documents]
    return read_documents(data, field=field, split=split, max_documents=max_documents, txt_split=txt_split)


def _calibration_sample(blocks: torch.Tensor, calibration_blocks: int, seed: int) -> torch.Tensor:
    """`calibration_blocks` of `blocks` [n, L] drawn at random with `seed`, in their original order."""
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    return blocks[sorted(order[:calibration_blocks])]


def _save(pruned: torch.nn.Module, tokenizer, out: Path, importance: Importance, plan: PrunePlan) -> tuple[Path, Path]:
    """The pruned model to out/student, the importance and plan to out/importance.json; both paths.

    A dense rotary model with equal widths in every layer: written as a plain LlamaForCausalLM folder, which
    transformers, lm-eval, vLLM and llama.cpp's converter read without pocketlm (pocketlm reads it too)."""
    student_dir = export_llama(pruned.float(), out / "student", tokenizer)
    record = write_text_atomic(out / IMPORTANCE_FILE, json.dumps(
        {"importance": importance.to_dict(), "plan": plan.to_dict()}, indent=1))
    return student_dir, record


def _parameter_metrics(plan: PrunePlan, model: torch.nn.Module, pruned: torch.nn.Module) -> list[Metric]:
    """Non-embedding and total parameters before and after pruning."""
    return [
        Metric("non_embedding_parameters", plan.source_non_embedding_params, 1, group="before"),
        Metric("non_embedding_parameters", plan.non_embedding_params, 1, group="after"),
        Metric("parameters", sum(p.numel() for p in model.parameters()), 1, group="before"),
        Metric("parameters", sum(p.numel() for p in pruned.parameters()), 1, group="after"),
    ]


def _prune_details(conf, plan: PrunePlan, pruned: torch.nn.Module, tokenizer, student_dir, record) -> dict:
    """The Results details of prune: the saved student and record, what was kept, the widths before and after."""
    return {
        "student": str(student_dir),
        "importance_file": str(record),
        "kept_layers": plan.layers,
        "widths": {"before": {"num_layers": conf.num_hidden_layers, "intermediate_size": conf.intermediate_size,
                              "num_key_value_heads": conf.num_key_value_heads, "hidden_size": conf.hidden_size},
                   "after": plan.config},
        "fraction_of_non_embedding": plan.non_embedding_params / plan.source_non_embedding_params,
        "pruned_model": model_info(str(student_dir), pruned, tokenizer),
    }


def pruned_table(res: Results) -> str:
    """What was kept, in a few lines."""
    d = res.details
    b, a = d["widths"]["before"], d["widths"]["after"]
    lines = [f"{'':<22}{'before':>12}{'after':>12}"]
    for k in ("num_layers", "hidden_size", "intermediate_size", "num_key_value_heads"):
        lines.append(f"{k:<22}{b[k]:>12}{a[k]:>12}")
    lines.append(f"kept layers: {d['kept_layers']}")
    lines.append(f"non-embedding parameters: {d['fraction_of_non_embedding']:.1%} of the model's")
    return "\n".join(lines)

