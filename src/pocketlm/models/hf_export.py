"""Export a pocketlm student as a plain transformers model folder that loads with no pocketlm installed.

A dense student is a `LlamaForCausalLM`: its parameter names are Llama's, so the export is its state dict under a
`LlamaConfig`. Before anything is written, every tensor is checked against the names and shapes a
`LlamaForCausalLM` of that config has (built on the meta device, so it costs no memory); a student that is not a
plain Llama (e.g. one with MoE layers) is refused.

A top-k softmax MoE student with an MoE MLP in every layer and no shared experts is a `MixtralForCausalLM`: the
router is Mixtral's (softmax, top-k, renormalised) and the experts are stored in Mixtral's layout, so `export_mixtral`
renames the router (`mlp.router.proj` → `mlp.gate`) and lets transformers write its own on-disk format. Other MoE
students save and load as pocketlm models (`save_pretrained`, `AutoModelForCausalLM` after `import pocketlm`).

The folder is written next to its destination and renamed into place, so a reader never sees half of it.

A run's final student folder (`write_student_folder`) is written in the most standard of these layouts that
represents the student exactly — Llama, else Mixtral, else pocketlm's own, with the reason — and a standard folder
is kept only when it reloads, in transformers' own class, to the student's logits.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM
from pocketlm.core.outdir import MIN_FREE, write_folder


def _attention_problems(config: PocketLMConfig) -> list[str]:
    """Why a student's attention is not Llama's (empty when it is): Llama rotates q/k (RoPE), attends the whole
    context, and has the same heads in every layer."""
    problems = []
    if config.position_scheme != "rotary":
        problems.append(f"position_scheme is {config.position_scheme!r}; Llama uses rotary positions")
    if config.sliding_window is not None:
        problems.append(f"sliding_window is {config.sliding_window}; Llama attends the whole context")
    kept = config.kept_kv_heads
    if kept is not None and len({len(heads) for heads in kept}) > 1:
        problems.append(
            f"heads were pruned unevenly (KV heads kept per layer: {[len(h) for h in kept]}); Llama has the same "
            "number of heads in every layer"
        )
    return problems


def llama_config_from_student(config: PocketLMConfig) -> LlamaConfig:
    """The `LlamaConfig` whose `LlamaForCausalLM` computes exactly what a student of `config` computes.
    A student pruned to the same number of KV groups in every layer exports with those reduced head counts."""
    problems = _attention_problems(config)
    if problems:
        raise ValueError("this student's attention is not Llama's, so it cannot be exported as Llama:\n  "
                         + "\n  ".join(problems))
    kv_heads = len(config.kept_kv_heads[0]) if config.kept_kv_heads else config.num_key_value_heads
    group = config.num_attention_heads // config.num_key_value_heads
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=group * kv_heads,
        num_key_value_heads=kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        architectures=["LlamaForCausalLM"],
        dtype=config.dtype,
    )


def _matched(ours: dict[str, torch.Tensor], reference: Any, arch: str, refusal: str) -> dict[str, torch.Tensor]:
    """`ours` (already under `reference`'s names) checked name by name and shape by shape against the state dict of
    `reference` (a model built on the meta device); a tied lm_head is left out. Raises `ValueError` listing every
    mismatch, prefixed by `refusal`."""
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    ours = dict(ours)
    if reference.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        ours.pop("lm_head.weight", None)
    problems = [f"{name}: not in the student" for name in sorted(expected.keys() - ours.keys())]
    problems += [f"{name}: not a {arch} parameter" for name in sorted(ours.keys() - expected.keys())]
    problems += [
        f"{name}: student shape {tuple(ours[name].shape)}, {arch} expects {shape}"
        for name, shape in sorted(expected.items())
        if name in ours and tuple(ours[name].shape) != shape
    ]
    if problems:
        raise ValueError(refusal + ":\n  " + "\n  ".join(problems))
    return ours


def _llama_tensors(model: PocketLMForCausalLM, llama_config: LlamaConfig, dtype: torch.dtype | None) -> dict:
    """The student's state dict as Llama's, checked name by name and shape by shape; tied lm_head left out."""
    with torch.device("meta"):
        reference = LlamaForCausalLM(llama_config)
    refusal = "this student is not a plain Llama and cannot be exported as one"
    ours = _matched(model.state_dict(), reference, "Llama", refusal)
    return {
        name: t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous() for name, t in sorted(ours.items())
    }


def mixtral_aux_loss_coef(config: PocketLMConfig) -> float:
    """Mixtral's `router_aux_loss_coef` for a student whose every layer adds α·E·Σ_i f_li·P_li (`balance_coef` α):
    α·L, the coefficient under which fine-tuning the export feels the student's load-balancing pressure.

    The student sums a loss per layer: S = α·E·Σ_l Σ_i f_li·P_li (f_li: share of layer l's slots that pick expert
    i, P_li: its mean router probability; `models/routers.load_balancing_loss`). transformers' Mixtral pools the L
    layers into one loss, E·Σ_i f̄_i·P̄_i over the layer means (`load_balancing_loss_func`). So
    S − α·L·E·Σ_i f̄_i·P̄_i = α·E·Σ_i Σ_l (f_li − f̄_i)(P_li − P̄_i): with coefficient α·L the two are equal
    exactly when the layers route alike, and otherwise differ by α·E·L times the across-layer covariance of each
    expert's load and probability (usually positive, so the export's loss is a little lower: by 0.1-3.7 % on a
    tiny 2-layer random-router model over 8 seeds; tests/models/test_export_mixtral.py). The gradients differ the
    same way: the pooled loss pushes every layer's P_li with the mean load f̄_i, the student's with its own f_li.
    With coefficient α (before #17) fine-tuning the export felt about 1/L of the pressure. Mixtral has no router z-loss and masks padding out of its loss; the
    student's `z_loss_coef` term is not exported."""
    return float(config.moe["balance_coef"]) * config.num_hidden_layers


def mixtral_config_from_student(config: PocketLMConfig) -> MixtralConfig:
    """The `MixtralConfig` whose `MixtralForCausalLM` computes what a top-k softmax MoE student of `config` does
    (its balance-loss coefficient scaled to Mixtral's pooled loss: `mixtral_aux_loss_coef`)."""
    problems = _mixtral_problems(config)
    if problems:
        raise ValueError("this student cannot be exported as Mixtral:\n  " + "\n  ".join(problems))
    llama = llama_config_from_student(config).to_dict()
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id")
    moe = config.moe
    return MixtralConfig(
        **{k: llama[k] for k in keep},
        intermediate_size=moe["expert_size"] or config.intermediate_size,
        num_local_experts=moe["num_experts"],
        num_experts_per_tok=moe["top_k"],
        router_aux_loss_coef=mixtral_aux_loss_coef(config),
        router_jitter_noise=0.0,
        output_router_logits=False,
        sliding_window=None,
        architectures=["MixtralForCausalLM"],
        dtype=config.dtype,
    )


def _mixtral_problems(config: PocketLMConfig) -> list[str]:
    moe = config.moe
    if moe is None:
        return ["it has no MoE layers (export_llama exports a dense student)"]
    problems = []
    if moe["router"] != "topk_softmax":
        problems.append(f"moe.router is {moe['router']!r}; Mixtral routes with topk_softmax")
    if moe["num_shared_experts"]:
        problems.append(f"moe.num_shared_experts is {moe['num_shared_experts']}; Mixtral has no shared experts")
    if moe["layers"] is not None and sorted(moe["layers"]) != list(range(config.num_hidden_layers)):
        problems.append(f"moe.layers is {moe['layers']}; Mixtral has an MoE MLP in every layer")
    return problems


def _require_student(model: Any, target: str) -> None:
    """Refuse (a ValueError naming the model's type) a model that is not a pocketlm student: a teacher folder is
    already in a layout transformers loads without pocketlm."""
    if not isinstance(model.config, PocketLMConfig):
        raise ValueError(f"export converts a pocketlm student into a plain {target} folder; this model is a "
                         f"{type(model).__name__} (model_type {model.config.model_type!r}), which transformers "
                         "loads as it is: use its folder directly")


def export_mixtral(
    model: PocketLMForCausalLM,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a top-k softmax MoE student as a `MixtralForCausalLM` folder (config.json with model_type mixtral,
    generation_config.json, safetensors in transformers' Mixtral format, the tokenizer's files if given).
    `dtype` converts the weights (default: as they are). Returns the folder's path."""
    _require_student(model, "Mixtral")
    return write_model_folder(Path(out_dir), _mixtral_writer(model, dtype), model, tokenizer, overwrite=overwrite)


def _mixtral_writer(model: PocketLMForCausalLM, dtype: torch.dtype | None) -> Callable[[Path], Any]:
    """What writes `model` as a `MixtralForCausalLM` (`write(folder)`), checked first: a student Mixtral cannot
    hold is a `ValueError` saying why."""
    config = mixtral_config_from_student(model.config)
    dtype = dtype or next(model.parameters()).dtype
    config.dtype = dtype
    with torch.device("meta"):
        reference = MixtralForCausalLM(config)
    renamed = {name.replace(".mlp.router.proj.", ".mlp.gate."): t for name, t in model.state_dict().items()}
    tensors = _matched(renamed, reference, "Mixtral", "this student's tensors do not fit Mixtral's")
    mixtral = MixtralForCausalLM(config).to(dtype)
    mixtral.load_state_dict({k: t.detach().to("cpu", dtype) for k, t in tensors.items()}, strict=False)
    if config.tie_word_embeddings:
        mixtral.tie_weights()
    return lambda folder: mixtral.save_pretrained(folder, safe_serialization=True)


def fill_model_folder(folder: Path, write_model: Callable[[Path], Any], model: PocketLMForCausalLM,
                      tokenizer: Any) -> None:
    """Write the model (`write_model(folder)`), the student's generation config and the tokenizer into `folder`."""
    write_model(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_model_folder(out_dir: Path, write_model: Callable[[Path], Any], model: PocketLMForCausalLM,
                       tokenizer: Any, *, kind: str = "export", overwrite: bool = False) -> Path:
    """Write the model (`write_model(folder)`), the student's generation config and the tokenizer as one folder,
    by the output-folder rules of `pocketlm.core.outdir.write_folder` (made whole, never over a user's folder)."""
    return write_folder(out_dir, lambda tmp: fill_model_folder(tmp, write_model, model, tokenizer), kind=kind,
                        overwrite=overwrite, need=_need(model))


def _need(model: Any) -> int:
    """Disk a folder of `model` needs: its weights as they are, and the margin."""
    return MIN_FREE + sum(p.numel() * p.element_size() for p in model.parameters())


def export_llama(
    model: PocketLMForCausalLM,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a `LlamaForCausalLM` folder: config.json (model_type llama), generation_config.json,
    model.safetensors and, if given, the tokenizer's files. `dtype` converts the weights (default: as they are).
    Returns the folder's path."""
    _require_student(model, "Llama")
    return write_model_folder(Path(out_dir), _llama_writer(model, dtype), model, tokenizer, overwrite=overwrite)


def _llama_writer(model: PocketLMForCausalLM, dtype: torch.dtype | None) -> Callable[[Path], Any]:
    """What writes `model` as a `LlamaForCausalLM` (`write(folder)`: config.json and model.safetensors), checked
    first: a student that is not a plain Llama is a `ValueError` saying why."""
    llama_config = llama_config_from_student(model.config)
    tensors = _llama_tensors(model, llama_config, dtype)
    llama_config.dtype = dtype or next(iter(tensors.values())).dtype

    def write_model(folder: Path) -> None:
        llama_config.save_pretrained(folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return write_model


@dataclass(frozen=True)
class FolderFormat:
    """The layout a student folder was written in: `model_type` as its config.json says (llama, mixtral or
    pocketlm), and `reason`, why it is not a standard one (None when it is)."""

    model_type: str
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STANDARD = {"llama": LlamaForCausalLM, "mixtral": MixtralForCausalLM}
PROBE_TOKENS = 16  # the reload check's sequence
RELOAD_TOL = dict(rtol=1e-4, atol=1e-5)  # bit-exact on CPU as measured; room for another kernel's rounding on
# an accelerator, where a real mismatch (a wrong field or weight) moves trained logits by far more


def write_student_folder(folder: Path, model: PocketLMForCausalLM, tokenizer: Any) -> FolderFormat:
    """Fill `folder` (new, empty, ours) with the student in the most standard layout that represents it exactly:
    `LlamaForCausalLM` for a dense student whose attention is Llama's (pruned widths included),
    `MixtralForCausalLM` for a top-k softmax MoE in every layer without shared experts, and otherwise pocketlm's
    own (`model_type: pocketlm`, loaded after `import pocketlm`), with the reason. transformers and lm-eval's `hf`
    model read a standard folder without pocketlm installed, and vLLM and llama.cpp's converter take its layout.
    A standard folder is kept only when it reloads, in transformers' class, to the student's logits (`RELOAD_TOL`)
    on a probe sequence."""
    _require_student(model, "Llama or Mixtral")
    layout = "llama" if model.config.moe is None else "mixtral"
    try:
        write = _llama_writer(model, None) if layout == "llama" else _mixtral_writer(model, None)
    except ValueError as e:
        first, *problems = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = " ".join([first, "; ".join(problems)]).strip()
    else:
        candidate = folder / f".{layout}"
        candidate.mkdir()
        fill_model_folder(candidate, write, model, tokenizer)
        try:
            reason = _reload_mismatch(candidate, model, layout)
        except Exception as e:  # a reader that cannot take the folder: the student is saved in our own layout
            reason = f"the {layout} folder does not reload in transformers ({type(e).__name__}: {str(e)[:200]})"
        if reason is None:
            for p in sorted(candidate.iterdir()):
                os.replace(p, folder / p.name)
            candidate.rmdir()
            return FolderFormat(layout)
        shutil.rmtree(candidate)  # made by this call, holding only what it wrote
    fill_model_folder(folder, lambda f: model.save_pretrained(f, safe_serialization=True), model, tokenizer)
    return FolderFormat("pocketlm", reason)


def _reload_mismatch(folder: Path, model: PocketLMForCausalLM, layout: str) -> str | None:
    """Why the `layout` folder does not compute the student's logits (None when it does): it is loaded with
    transformers' own class, beside the student on its device and in its dtype, and both read one probe sequence."""
    param = next(model.parameters())
    reloaded = STANDARD[layout].from_pretrained(folder, dtype=param.dtype).to(param.device).eval()
    n = min(PROBE_TOKENS, model.config.max_position_embeddings)
    ids = torch.randint(model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want, got = model(ids).logits.float(), reloaded(ids).logits.float()
    finally:
        model.train(was_training)
    if torch.allclose(got, want, **RELOAD_TOL):
        return None
    return (f"the {layout} folder reloads to logits up to {(got - want).abs().max().item():.3g} away from the "
            f"student's (tolerance {RELOAD_TOL['atol']:g} + {RELOAD_TOL['rtol']:g}·|logit|)")


def save_student_folder(model: PocketLMForCausalLM, tokenizer: Any, out_dir: str | os.PathLike, *,
                        kind: str = "student", overwrite: bool = False) -> tuple[Path, FolderFormat]:
    """`write_student_folder` into `out_dir` by the output-folder rules of `pocketlm.core.outdir.write_folder`;
    returns the folder and the layout it was written in."""
    written: list[FolderFormat] = []
    path = write_folder(Path(out_dir), lambda tmp: written.append(write_student_folder(tmp, model, tokenizer)),
                        kind=kind, overwrite=overwrite, need=_need(model))
    return path, written[0]
