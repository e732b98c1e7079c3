"""Sparse upcycling (Komatsuzaki et al., 2022): an MoE student made from a dense one.

Every MoE layer's experts start as copies of that layer's dense MLP, each with optional Gaussian noise, and its
router starts fresh; everything else (embeddings, attention, norms, head) is copied as is. A dense student from the
teacher's layers (`init.init_student_from_teacher`) upcycles the same way, so "MoE student from teacher layers" is
the composition of the two.

Fine-grained experts (expert_size = f / g for a whole g) take the dense MLP's channels in g segments, segment
e mod g for expert e, as Qwen1.5-MoE's upcycling does. The copied down projections are scaled so that a token whose
router is uniform gets the dense output back: by 1 / the router's `upcycle_scale()` (the combine weight a uniform
router gives a token's experts: 1 for top-k with renormalised weights, aux_free and hash; 1/E for switch; k/E for
expert choice) and by g for segments. Hence, without noise, a top-k, aux-free or hash MoE of whole copies computes
exactly what the dense student does, whatever its router; switch and expert choice start close to it while the
fresh router is near uniform. Shared experts start as copies too, with a zero down projection, so they add nothing
until trained.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pocketlm.models.moe import MoELayer, moe_layers
from pocketlm.models.mlp import SwiGLUMLP
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM


def upcycle(
    dense: PocketLMForCausalLM,
    moe: Mapping[str, Any] | Any,
    *,
    noise: float | None = None,
    seed: int = 0,
) -> PocketLMForCausalLM:
    """An MoE student whose MoE layers (`moe`, a MoEConfig or dict of one) are upcycled from `dense`'s MLPs.

    `noise` (default: moe's upcycle_noise) is the std of the Gaussian noise added to each expert's copy, relative to
    the std of the weight it perturbs; it is drawn from `seed`. `dense` is not modified. Raises `ValueError` before
    building anything when `dense` already has MoE layers or the expert size does not divide the dense MLP's.
    """
    if dense.config.moe is not None:
        raise ValueError("upcycle takes a dense student; this one already has MoE layers")
    config = PocketLMConfig.from_dict({**dense.config.to_dict(), "moe": moe.model_dump() if hasattr(moe, "model_dump")
                                       else dict(moe)})
    spec = config.moe
    noise = spec["upcycle_noise"] if noise is None else noise
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    f_dense = dense.config.intermediate_size
    size = spec["expert_size"] or f_dense
    if f_dense % size:
        raise ValueError(f"moe.expert_size ({size}) must divide the dense MLP's intermediate_size ({f_dense})")

    torch.manual_seed(seed)  # the fresh routers
    student = PocketLMForCausalLM(config).to(dense.dtype)
    theirs = dense.state_dict()
    ours = student.state_dict()
    generator = torch.Generator().manual_seed(seed)
    layers = moe_layers(student)
    with torch.no_grad():
        for name, tensor in ours.items():
            if name in theirs and ".mlp." not in name:
                tensor.copy_(theirs[name])
        for i, layer in enumerate(student.model.layers):
            source = dense.model.layers[i].mlp
            if i in layers:
                _fill_experts(layers[i], source, noise, generator)
            else:
                layer.mlp.load_state_dict(source.state_dict())
    return student


def _fill_experts(layer: MoELayer, dense: SwiGLUMLP, noise: float, generator: torch.Generator) -> None:
    experts = layer.experts
    f = experts.expert_size
    groups = dense.gate_proj.weight.shape[0] // f
    scale = groups / layer.router.upcycle_scale()
    for e in range(experts.num_experts):
        seg = slice((e % groups) * f, (e % groups + 1) * f)
        gate_up = torch.cat([dense.gate_proj.weight[seg], dense.up_proj.weight[seg]])  # [2f, d]
        down = dense.down_proj.weight[:, seg] * scale  # [d, f]
        experts.gate_up_proj[e] = _noisy(gate_up, noise, generator)
        experts.down_proj[e] = _noisy(down, noise, generator)
    if layer.shared is not None:
        shared_f = layer.shared.gate_proj.weight.shape[0]
        rows = torch.arange(shared_f) % dense.gate_proj.weight.shape[0]
        layer.shared.gate_proj.weight.copy_(dense.gate_proj.weight[rows])
        layer.shared.up_proj.weight.copy_(dense.up_proj.weight[rows])
        layer.shared.down_proj.weight.zero_()


def _noisy(w: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    if noise == 0:
        return w
    return w + noise * w.float().std() * torch.randn(w.shape, generator=generator).to(w.dtype)
