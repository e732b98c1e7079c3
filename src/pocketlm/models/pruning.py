"""Structured pruning to a target size by calibration importance (Minitron; ShortGPT for depth).

A dense rotary pocketlm model (a teacher converted by `init_student_from_teacher` with all its layers, or a
student) is cut along four axes, each by the scores of `models.importance`:

    depth    keep `num_layers` layers, those of highest importance (Block Influence, or the perplexity increase when
             the layer alone is removed), in their original order — not evenly spaced;
    MLP      keep, in every kept layer, the `intermediate_size` channels of highest mean |activation|: rows of
             gate_proj and up_proj, columns of down_proj;
    heads    keep, in every kept layer, the `num_key_value_heads` KV groups of highest output norm: k/v rows of the
             KV head, q rows of its query heads, o_proj columns of those heads (the group size is unchanged);
    hidden   keep the `hidden_size` residual channels of highest summed |norm output|, the same channels
             everywhere: embedding columns (and so the tied output layer), every RMSNorm weight, the input columns
             of q/k/v/gate/up, the output rows of o_proj/down_proj.

Every axis keeps equal widths in every layer, so the result is a plain Llama shape (export, GGUF, vLLM).

RMSNorm over fewer channels. A norm divides by sqrt(mean(x²) + ε); over d' of d channels the mean is taken over
d' values. The pruned model multiplies each norm weight by sqrt(d/d') and uses ε·d/d', so that it computes exactly
what the full model computes when the removed channels are zero in the residual stream (the test's reference) —
and, for the low-activation channels pruning removes, nearly what the full model computes. Plain slicing would
instead scale every normalised activation by about sqrt(d'/d).

Target sizes. Either explicit widths (any of num_layers, intermediate_size, num_key_value_heads, hidden_size; the
rest stay the source's) or `target_params`, a fraction of the source's non-embedding parameters, with a rule per
axis (`choose_target`):

    depth    the number of layers closest to the target (a tie: fewer); 50% of SmolLM2-135M's 30 layers is 15;
    width    depth and heads kept; among hidden sizes that are multiples of lcm(heads, 8) (transformers' Llama needs
             hidden_size divisible by the head count), each with the largest intermediate size (a multiple of 32)
             that fits within the target, the one whose two shrink factors are closest (hidden/d ≈ intermediate/f: Minitron shrinks
             both together); ties go to the larger hidden size.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from pocketlm.models.config import PruneTargetError, parse_fraction  # noqa: F401 - PruneTargetError: re-exported
from pocketlm.models.importance import Importance, compute_importance
from pocketlm.models.init import init_student_from_teacher, student_config_from_teacher
from pocketlm.models.sizing import architecture, parameter_breakdown
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM

AXES = ("width", "depth")
WIDTHS = ("num_layers", "intermediate_size", "num_key_value_heads", "hidden_size")
INTERMEDIATE_MULTIPLE = 32


@dataclass
class PruneTarget:
    num_layers: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    hidden_size: Optional[int] = None
    target_params: Optional[float] = None  # fraction of the source's non-embedding parameters, in (0, 1]
    axis: str = "width"  # how target_params is met: width or depth
    depth_metric: str = "block_influence"  # or perplexity: how layers are ranked


@dataclass
class PrunePlan:
    """Original indices kept on each axis (each list sorted)."""

    layers: list[int]
    mlp_channels: list[list[int]]  # per kept layer
    kv_groups: list[list[int]]  # per kept layer
    hidden_channels: list[int]
    config: dict[str, int]  # the pruned widths
    non_embedding_params: int
    source_non_embedding_params: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def non_embedding_params(config: PocketLMConfig) -> int:
    """Parameters of a model of `config` other than the token embedding and the output layer: the size model's
    count (models/sizing.py), which the tests check against the parameters of built models."""
    return parameter_breakdown(architecture(config))["non_embedding"]


def _source_problem(c: PocketLMConfig) -> str | None:
    """Why a model of config `c` cannot be pruned (None when it can)."""
    if c.moe is not None:
        return "pruning works on dense models; prune first, then upcycle to MoE (student.moe)"
    if c.kept_kv_heads is not None:
        return ("this model's heads were pruned with prune-heads; prune its width from the model before "
                "prune-heads")
    return None


def _source_config(model: PocketLMForCausalLM) -> PocketLMConfig:
    if not isinstance(model, PocketLMForCausalLM):
        raise PruneTargetError(f"pruning works on pocketlm models, got {type(model).__name__}")
    problem = _source_problem(model.config)
    if problem:
        raise PruneTargetError(problem)
    return model.config


def _with(c: PocketLMConfig, **widths: int) -> PocketLMConfig:
    """`c` with new widths; the head count follows the KV groups, head_dim stays, ε scales with the hidden size."""
    values = c.to_dict()
    for k in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        values.pop(k, None)
    group = c.num_attention_heads // c.num_key_value_heads
    kv = widths.get("num_key_value_heads", c.num_key_value_heads)
    hidden = widths.get("hidden_size", c.hidden_size)
    values.update(
        num_hidden_layers=widths.get("num_layers", c.num_hidden_layers),
        intermediate_size=widths.get("intermediate_size", c.intermediate_size),
        num_key_value_heads=kv, num_attention_heads=kv * group, head_dim=c.head_dim, hidden_size=hidden,
        rms_norm_eps=c.rms_norm_eps * c.hidden_size / hidden,
    )
    return PocketLMConfig(**values)


def check_target(c: PocketLMConfig, target: PruneTarget, removal_blocks: int | None = None) -> None:
    """Refuse a target the model of config `c` cannot be cut to, naming the field, before any work
    (`choose_target` also refuses a `target_params` no model of this shape meets). `removal_blocks` (when given)
    is the number of blocks the removal perplexity will be measured on: `depth_metric: perplexity` needs some."""
    problem = _source_problem(c)
    if problem:
        raise PruneTargetError(problem)
    if target.axis not in AXES:
        raise PruneTargetError(f"axis: unknown {target.axis!r}; valid: {', '.join(AXES)}")
    if target.depth_metric not in ("block_influence", "perplexity"):
        raise PruneTargetError(f"depth_metric: unknown {target.depth_metric!r}; valid: block_influence, perplexity")
    if target.depth_metric == "perplexity" and removal_blocks == 0:
        raise PruneTargetError("depth_metric: perplexity ranks layers by their removal perplexity, which "
                               "removal_blocks: 0 does not measure; give removal_blocks > 0 or use block_influence")
    given = [w for w in WIDTHS if getattr(target, w) is not None]
    if target.target_params is not None and given:
        raise PruneTargetError(f"give target_params or explicit widths ({', '.join(given)}), not both")
    if target.target_params is None and not given:
        raise PruneTargetError(f"no pruning target: give target_params or one of {', '.join(WIDTHS)}")
    if target.target_params is not None:
        parse_fraction(target.target_params)
    source = {"num_layers": c.num_hidden_layers, "intermediate_size": c.intermediate_size,
              "num_key_value_heads": c.num_key_value_heads, "hidden_size": c.hidden_size}
    for name in given:
        v = getattr(target, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PruneTargetError(f"{name}: must be a positive integer, got {v!r}")
        if v > source[name]:
            raise PruneTargetError(f"{name}: {v} is more than the model has ({source[name]}); pruning only removes")
    if target.num_key_value_heads is not None and target.num_key_value_heads < c.num_key_value_heads \
            and c.position_scheme != "rotary":
        raise PruneTargetError(f"num_key_value_heads: this model's {c.position_scheme} positions give each head its "
                               "own bias, which removing heads would shift; only rotary models lose heads here")
    group = c.num_attention_heads // c.num_key_value_heads
    heads = (target.num_key_value_heads or c.num_key_value_heads) * group
    hidden = target.hidden_size or c.hidden_size
    if hidden % heads:
        field = "hidden_size" if target.hidden_size is not None else "num_key_value_heads"
        raise PruneTargetError(
            f"{field}: hidden size {hidden} is not divisible by the {heads} attention heads that remain "
            f"(transformers' Llama requires it); e.g. hidden_size {hidden // heads * heads or heads}")


def choose_target(c: PocketLMConfig, target: PruneTarget, removal_blocks: int | None = None) -> dict[str, int]:
    """The widths to prune to: the explicit ones, or those `target_params` gives by the rule of its axis."""
    check_target(c, target, removal_blocks)
    if target.target_params is None:
        return {w: getattr(target, w) for w in WIDTHS if getattr(target, w) is not None}
    budget = parse_fraction(target.target_params) * non_embedding_params(c)
    if target.axis == "depth":
        per_layer = non_embedding_params(_with(c, num_layers=2)) - non_embedding_params(_with(c, num_layers=1))
        rest = non_embedding_params(_with(c, num_layers=1)) - per_layer  # the final norm
        n = round((budget - rest) / per_layer - 1e-9)  # the depth closest to the target (a tie: the smaller)
        if n < 1:
            raise PruneTargetError(f"target_params: {target.target_params} is less than one layer of this model")
        return {"num_layers": min(n, c.num_hidden_layers)}
    step = math.lcm(c.num_attention_heads, 8)
    best: tuple[float, int, int] | None = None
    for h in range(step, c.hidden_size + 1, step):
        at = lambda f: non_embedding_params(_with(c, hidden_size=h, intermediate_size=f))  # noqa: E731, B023
        slope = at(2 * INTERMEDIATE_MULTIPLE) - at(INTERMEDIATE_MULTIPLE)
        f = int((budget - at(INTERMEDIATE_MULTIPLE)) // slope + 1) * INTERMEDIATE_MULTIPLE
        f = min(f // INTERMEDIATE_MULTIPLE * INTERMEDIATE_MULTIPLE, c.intermediate_size)
        if f < INTERMEDIATE_MULTIPLE:
            continue
        gap = abs(h / c.hidden_size - f / c.intermediate_size)
        if best is None or gap <= best[0]:
            best = (gap, h, f)
    if best is None:
        raise PruneTargetError(f"target_params: no width of this model fits {target.target_params} of its "
                               "non-embedding parameters; try axis: depth")
    return {"hidden_size": best[1], "intermediate_size": best[2]}


def _top(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest scores, in increasing index order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def plan_pruning(model: PocketLMForCausalLM, importance: Importance, target: PruneTarget) -> PrunePlan:
    """What to keep on each axis, from `importance` (measured on `model`) and the target."""
    c = _source_config(model)
    if not importance.fits(c):
        raise PruneTargetError("the importance scores were measured on a model of another shape")
    widths = choose_target(c, target)
    n_layers = widths.get("num_layers", c.num_hidden_layers)
    layers = _top(importance.layer_scores(target.depth_metric), n_layers)
    f = widths.get("intermediate_size", c.intermediate_size)
    kv = widths.get("num_key_value_heads", c.num_key_value_heads)
    pruned = _with(c, **widths)
    return PrunePlan(
        layers=layers,
        mlp_channels=[_top(importance.mlp[i], f) for i in layers],
        kv_groups=[_top(importance.kv_groups[i], kv) for i in layers],
        hidden_channels=_top(importance.hidden, widths.get("hidden_size", c.hidden_size)),
        config={"num_layers": n_layers, "intermediate_size": f, "num_key_value_heads": kv,
                "hidden_size": pruned.hidden_size},
        non_embedding_params=non_embedding_params(pruned),
        source_non_embedding_params=non_embedding_params(c),
    )


_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def apply_plan(model: PocketLMForCausalLM, plan: PrunePlan) -> PocketLMForCausalLM:
    """A new model holding only what `plan` keeps (the input is not changed); see the module docstring."""
    c = _source_config(model)
    group = c.num_attention_heads // c.num_key_value_heads
    hd = c.head_dim
    new_conf = _with(c, **plan.config)
    hid = torch.tensor(plan.hidden_channels, dtype=torch.long)
    scale = math.sqrt(c.hidden_size / new_conf.hidden_size)

    def rows(groups: list[int], per_group: int) -> torch.Tensor:  # rows of a [heads·h_d, ...] projection
        heads = [g * per_group + r for g in groups for r in range(per_group)]
        return torch.tensor([h * hd + j for h in heads for j in range(hd)], dtype=torch.long)

    source = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, w in source.items():
        m = _LAYER_KEY.fullmatch(name)
        if m is None:
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = w[:, hid]
            elif name == "model.norm.weight":
                out[name] = w[hid] * scale
            else:
                raise PruneTargetError(f"cannot prune the parameter {name} (not part of a dense pocketlm model)")
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i not in plan.layers:
            continue
        j = plan.layers.index(i)
        ch = torch.tensor(plan.mlp_channels[j], dtype=torch.long)
        kv = plan.kv_groups[j]
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            new = w[hid] * scale
        elif rest == "self_attn.q_proj.weight":
            new = w[rows(kv, group)][:, hid]
        elif rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            new = w[rows(kv, 1)][:, hid]
        elif rest == "self_attn.o_proj.weight":
            new = w[hid][:, rows(kv, group)]
        elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            new = w[ch][:, hid]
        elif rest == "mlp.down_proj.weight":
            new = w[hid][:, ch]
        else:
            raise PruneTargetError(f"cannot prune the parameter {name} (not part of a dense pocketlm model)")
        out[f"model.layers.{j}.{rest}"] = new
    pruned = PocketLMForCausalLM(new_conf).to(next(model.parameters()).dtype)
    missing, unexpected = pruned.load_state_dict({k: v.contiguous() for k, v in out.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and new_conf.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not match the pruned model: missing {missing}, unexpected {unexpected}")
    if new_conf.tie_word_embeddings:
        pruned.tie_weights()
    return pruned


def prune(model: PocketLMForCausalLM, importance: Importance, target: PruneTarget) -> tuple[PocketLMForCausalLM, PrunePlan]:
    """`apply_plan(model, plan_pruning(model, importance, target))`, with the plan."""
    plan = plan_pruning(model, importance, target)
    return apply_plan(model, plan), plan


def as_pocketlm(model: Any) -> PocketLMForCausalLM:
    """`model` itself if it is a pocketlm model, else a pocketlm copy of a Llama-family model with all its layers
    (`init_student_from_teacher`: the same function, to float rounding)."""
    if isinstance(model, PocketLMForCausalLM):
        return model
    n = int(model.config.get_text_config(decoder=True).num_hidden_layers)
    conf = student_config_from_teacher(model.config, layers=list(range(n)))
    copy = init_student_from_teacher(model, conf, layers=list(range(n)))
    return copy.to(next(model.parameters()).device)  # measured where the model is (a GPU teacher: on the GPU)


def source_config(model: Any) -> PocketLMConfig:
    """The `PocketLMConfig` `as_pocketlm(model)` has, without copying any weight (for checking a target early)."""
    if isinstance(model, PocketLMForCausalLM):
        return model.config
    n = int(model.config.get_text_config(decoder=True).num_hidden_layers)
    return student_config_from_teacher(model.config, layers=list(range(n)))


def prune_model(
    model: Any,
    target: PruneTarget,
    calibration: torch.Tensor,
    *,
    removal_blocks: int = 16,
    batch_size: int = 8,
    bf16: bool = False,
    importance: Importance | None = None,
    progress: bool = False,
) -> tuple[PocketLMForCausalLM, PrunePlan, Importance]:
    """`model` (pocketlm or Llama-family) pruned to `target` by importance on `calibration` blocks [n, L] (or the
    `importance` given, measured on the same model). The target is checked before anything is measured."""
    choose_target(source_config(model), target, None if importance is not None else removal_blocks)
    source = as_pocketlm(model)
    if importance is None:
        importance = compute_importance(source, calibration, batch_size=batch_size, removal_blocks=removal_blocks,
                                        bf16=bf16, progress=progress, desc="importance")
    pruned, plan = prune(source, importance, target)
    return pruned, plan, importance


def pruned_config(c: PocketLMConfig, target: PruneTarget) -> PocketLMConfig:
    """The shape a model of `c` has once pruned to `target` (which parts are kept needs the importance; the shape
    does not)."""
    return _with(c, **choose_target(c, target))
