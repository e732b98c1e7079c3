"""Which parts of a model matter, measured on calibration text: the scores that structured pruning ranks by.

One forward pass over N calibration blocks, with hooks, gives (Minitron, Muralidharan et al. 2024, §2; ShortGPT,
Men et al. 2024):

    depth   Block Influence of layer i: BI_i = 1 − E_t cos(x_i,t , x_{i+1},t), the mean cosine between the residual
            stream entering and leaving block i over all calibration tokens t. A block that barely turns the stream
            does little.
    MLP     per intermediate channel c of layer i: E_t |a_i,t,c|, with a = silu(gate(x)) · up(x) the activation that
            enters the down projection.                                                       → mlp [L][f]
    heads   per KV group g of layer i (one KV head and the query heads that read it): E_t ‖z_i,t,g‖₂, the L2 norm
            of the group's attention output (its heads' outputs concatenated) before o_proj mixes the heads.
                                                                                              → kv_groups [L][n_kv]
    hidden  per residual channel c: Σ_n E_t |y_n,t,c| over every RMSNorm n of the model (both norms of every block
            and the final norm), y being the norm's output.                                   → hidden [d]

and, with a few more passes over the first `removal_blocks` blocks, the direct depth measure: the perplexity of the
model with block i alone skipped (its input passed on as its output), minus the full model's.

Expectations are means over every calibration token (the blocks are full, so there is no padding to mask). The
scores are summed in float64; the model runs in its own dtype, or bf16 autocast when asked.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pocketlm.core.integrity import RecordError, read_json
from pocketlm.core.io import write_text_atomic
from pocketlm.models.student import BlockOutput, PocketLMForCausalLM


@dataclass
class Importance:
    """Calibration importance of one model's parts (see the module docstring for each definition)."""

    block_influence: list[float]  # [L]
    mlp: list[list[float]]  # [L][f]
    kv_groups: list[list[float]]  # [L][n_kv]
    hidden: list[float]  # [d]
    n_blocks: int
    n_tokens: int
    base_perplexity: float | None = None  # token perplexity of the whole model on the removal blocks
    removal_perplexity: list[float] | None = None  # [L] the same with block i skipped
    removal_blocks: int = 0
    source: dict[str, Any] = field(default_factory=dict)  # what was measured: model fingerprint, data hash, settings

    @property
    def num_layers(self) -> int:
        return len(self.block_influence)

    @property
    def removal_increase(self) -> list[float] | None:
        """Perplexity increase when each block alone is removed (None when not measured)."""
        if self.removal_perplexity is None or self.base_perplexity is None:
            return None
        return [p - self.base_perplexity for p in self.removal_perplexity]

    def layer_scores(self, metric: str = "block_influence") -> list[float]:
        """Per layer, higher = more important: Block Influence, or the perplexity increase on removal."""
        if metric == "block_influence":
            return list(self.block_influence)
        if metric == "perplexity":
            inc = self.removal_increase
            if inc is None:
                raise ValueError("depth_metric perplexity needs the removal perplexities (removal_blocks > 0)")
            return inc
        raise ValueError(f"unknown depth metric {metric!r}; valid: block_influence, perplexity")

    def fits(self, config: Any) -> bool:
        """Whether these scores have the shape of a model of `config` (layers, MLP, KV groups, hidden)."""
        return (self.num_layers == config.num_hidden_layers and len(self.hidden) == config.hidden_size
                and all(len(r) == config.intermediate_size for r in self.mlp)
                and all(len(r) == config.num_key_value_heads for r in self.kv_groups))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["removal_increase"] = self.removal_increase
        return d

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps({"importance": self.to_dict()}, indent=1))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "Importance":
        """An importance record written by `write`; anything else is a RecordError naming the file."""
        doc = read_json(Path(path), "importance record")
        body = doc.get("importance") if isinstance(doc, dict) else None
        if not isinstance(body, dict):
            raise RecordError(f"{path}: not an importance record of pocketlm (no 'importance' object)")
        body = {k: v for k, v in body.items() if k != "removal_increase"}
        try:
            imp = cls(**body)
        except TypeError as e:
            raise RecordError(f"{path}: importance record has unexpected fields ({e})") from None
        imp._check(str(path))
        return imp

    def _check(self, where: str) -> None:
        def numbers(xs: Any) -> bool:
            return isinstance(xs, list) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)

        L = len(self.block_influence) if isinstance(self.block_influence, list) else -1
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        ok = (numbers(self.block_influence) and L > 0 and numbers(self.hidden)
              and whole(self.n_blocks) and whole(self.n_tokens) and whole(self.removal_blocks)
              and isinstance(self.source, dict)
              and (self.base_perplexity is None or numbers([self.base_perplexity]))
              and isinstance(self.mlp, list) and len(self.mlp) == L and all(numbers(r) for r in self.mlp)
              and isinstance(self.kv_groups, list) and len(self.kv_groups) == L
              and all(numbers(r) for r in self.kv_groups)
              and (self.removal_perplexity is None or (numbers(self.removal_perplexity)
                                                       and len(self.removal_perplexity) == L)))
        if not ok:
            raise RecordError(f"{where}: importance record is malformed (lists of finite numbers, one per layer)")


def _blocks_of(model: torch.nn.Module):
    if not isinstance(model, PocketLMForCausalLM):
        raise ValueError(f"importance is measured on pocketlm models; got {type(model).__name__} (convert a Llama "
                         "teacher with models.init.init_student_from_teacher first)")
    if model.config.moe is not None:
        raise ValueError("importance is measured on dense models; prune before upcycling to MoE")
    return model.model.layers


def compute_importance(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    removal_blocks: int = 16,
    bf16: bool = False,
    progress: bool = False,
    desc: str = "importance",
) -> Importance:
    """Importance of `model`'s layers, MLP channels, KV groups and hidden channels on `blocks` [n, L] (token ids).

    One pass over all blocks collects every activation score; `removal_blocks` (0: none) more passes per layer, over
    the first `removal_blocks` blocks, measure the perplexity with each layer skipped. `model` is not changed.
    """
    layers = _blocks_of(model)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"calibration blocks must be [n >= 1, L >= 2] token ids, got {list(blocks.shape)}")
    conf = model.config
    group = conf.num_attention_heads // conf.num_key_value_heads
    sums = _zero_sums(layers, conf.hidden_size)
    handles = _install_score_hooks(model, layers, sums)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    n_tokens = _activation_pass(model, blocks, handles, batch_size, autocast, device, progress=progress, desc=desc)
    n_removal = min(removal_blocks, len(blocks))
    try:
        base, removal = _removal_perplexities(model, layers, blocks, n_removal, batch_size, autocast, device,
                                              progress=progress, desc=desc)
    finally:
        model.train(was_training)
    return Importance(
        block_influence=(1.0 - sums["cos"] / n_tokens).tolist(),
        mlp=[(s / n_tokens).tolist() for s in sums["mlp"]],
        kv_groups=[(s / n_tokens).tolist() for s in sums["kv"]],
        hidden=(sums["hidden"] / n_tokens).tolist(),
        n_blocks=len(blocks),
        n_tokens=n_tokens,
        base_perplexity=base,
        removal_perplexity=removal,
        removal_blocks=n_removal,
        source={"block_size": int(blocks.shape[1]), "bf16": bf16, "group_size": group},
    )


def _zero_sums(layers: torch.nn.ModuleList, hidden_size: int) -> dict[str, Any]:
    """float64 accumulators of every activation score, on the CPU (see the module docstring)."""
    return {
        "cos": torch.zeros(len(layers), dtype=torch.float64),
        "mlp": [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers],
        "kv": [torch.zeros(layer.self_attn.num_kv_heads, dtype=torch.float64) for layer in layers],
        "hidden": torch.zeros(hidden_size, dtype=torch.float64),
    }


def _install_score_hooks(model: torch.nn.Module, layers: torch.nn.ModuleList, sums: dict[str, Any]) -> list:
    """Hooks that add each forward pass's activation scores into `sums`; returns their handles."""

    def block_hook(i: int):
        def hook(module, args, kwargs, output):
            x_in, x_out = args[0].double(), output.hidden_states.double()  # [b, s, d]
            sums["cos"][i] += F.cosine_similarity(x_in, x_out, dim=-1).sum().cpu()
        return hook

    def down_hook(i: int):
        def hook(module, args):
            sums["mlp"][i] += args[0].double().abs().sum(dim=(0, 1)).cpu()  # [f]
        return hook

    def o_hook(i: int, n_kv: int):
        def hook(module, args):
            z = args[0].double()  # [b, s, n_h·h_d], heads in order, group g = heads g·group .. g·group + group − 1
            sums["kv"][i] += z.reshape(*z.shape[:2], n_kv, -1).norm(dim=-1).sum(dim=(0, 1)).cpu()  # [n_kv]
        return hook

    def norm_hook(module, args, output):
        sums["hidden"] += output.double().abs().sum(dim=(0, 1)).cpu()  # [d]

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i, layer.self_attn.num_kv_heads)))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(norm_hook))
    handles.append(model.model.norm.register_forward_hook(norm_hook))
    return handles


def _activation_pass(model, blocks: torch.Tensor, handles: list, batch_size: int, autocast, device, *,
                     progress: bool, desc: str) -> int:
    """One forward pass over every block with the score hooks on; removes the hooks and returns the token count."""
    n_tokens = 0
    try:
        with torch.no_grad(), autocast:
            for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, unit="batch"):
                ids = blocks[start:start + batch_size].to(device)
                model(input_ids=ids, use_cache=False)
                n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return n_tokens


def _removal_perplexities(model, layers: torch.nn.ModuleList, blocks: torch.Tensor, n_removal: int, batch_size: int,
                          autocast, device, *, progress: bool, desc: str) -> tuple[float | None, list[float] | None]:
    """The perplexity of the whole model on the first `n_removal` blocks, and of the model with each layer skipped
    (None, None when `n_removal` is 0)."""
    base = removal = None
    if n_removal:
        sub = blocks[:n_removal]
        base = _perplexity(model, sub, batch_size, autocast, device)
        removal = []
        for i in tqdm(range(len(layers)), desc=f"{desc}: remove each layer", disable=not progress, unit="layer"):
            with skipped(layers[i]):
                removal.append(_perplexity(model, sub, batch_size, autocast, device))
    return base, removal


class skipped:
    """Within the context, decoder block `block` passes its input on unchanged (the model without that layer)."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.block = block

    def __enter__(self) -> None:
        self.handle = self.block.register_forward_hook(
            lambda module, args, output: BlockOutput(args[0], None, None)
        )

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _perplexity(model, blocks: torch.Tensor, batch_size: int, autocast, device) -> float:
    """exp of the mean next-token negative log-likelihood over every position of `blocks` (float64 sums)."""
    nll, count = 0.0, 0
    with torch.no_grad(), autocast:
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size].to(device)
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
            logits = logits if logits.dtype == torch.float64 else logits.float()  # [b, L-1, V]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum").double().item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)
