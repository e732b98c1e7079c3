"""`pocketlm size`: the size model's figures for a model spec (models/sizing.py), beside what the real model measures
(inspect/size_measure.py) and, for a GGUF file, the bytes its tensors really take, as `Results` (kind "size").

A spec is anything `pocketlm size` accepts: a config.json file, a pocketlm distillation YAML (its student), a model
folder, a .gguf, a hub id or the embedded teacher's name. Only the config is read unless measuring is asked for.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from pocketlm.core.config import load_config
from pocketlm.core.fingerprint import model_info
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.distill.config import DistillConfig
from pocketlm.distill.run import prune_target
from pocketlm.inspect.size_measure import measure
from pocketlm.models.config_check import check_model_config
from pocketlm.models.gguf_export import gguf_file_bytes
from pocketlm.models.init import student_config_from_teacher
from pocketlm.models.load import explain_load_error, load_model, parse_dtype, resolve
from pocketlm.models.pruning import pruned_config
from pocketlm.models.sizing import (
    CHINCHILLA_TOKENS_PER_PARAM,
    QUANT_GROUP,
    SCALE_BYTES,
    SizeEstimate,
    compare,
    config_from_dict,
    estimate,
    flatten,
)
from pocketlm.models.student import register_auto_classes


# ------------------------------------------------------------------------------------------ from a spec
def load_size_config(spec: str | Path) -> tuple[Any, Mapping[str, Any] | None]:
    """(config object, raw config.json dict or None) for anything `pocketlm size` accepts, without weights:
    a config.json file, a pocketlm distillation YAML (its student), a model folder, a .gguf, a hub id or the
    embedded teacher's name."""
    register_auto_classes()  # model_type "pocketlm"
    path = Path(str(spec)).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return student_config_from_yaml(path), None
    if path.suffix == ".json" and path.is_file():
        raw = _read_json(path)
        check_model_config(raw, str(path))
        return config_from_dict(raw), raw
    ms = resolve(spec)
    raw = _read_json(Path(ms.path) / "config.json") if ms.kind == "folder" else None
    if raw is not None:
        check_model_config(raw, str(Path(ms.path) / "config.json"))
    try:
        config = AutoConfig.from_pretrained(ms.path, gguf_file=ms.gguf_file) if ms.gguf_file else (
            config_from_dict(raw) if raw is not None else AutoConfig.from_pretrained(ms.path))
    except Exception as e:  # noqa: BLE001 - a cut GGUF fails in struct or numpy: named as damaged
        raise explain_load_error(ms, e, "could not read the config of") from e
    if raw is None:
        check_model_config(config.to_dict(), ms.describe())
    return config, raw


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{path} is not a model config: it has no model_type")
    return raw


def student_config_from_yaml(path: Path):
    """The `PocketLMConfig` a distillation YAML would build (`distill.run.build_student`), from the teacher's
    config alone: teacher layers keep the teacher's widths; random init applies the width overrides; pruned init
    takes the shape of its target (models/pruning.py); `moe` makes the MLPs sparse."""
    return student_config(load_config(DistillConfig, path))


def student_config(cfg: DistillConfig, teacher: Any = None):
    """The `PocketLMConfig` of the student `cfg` describes (as `student_config_from_yaml`), from `teacher` (its
    transformers config; None: read from `cfg.teacher` by `load_size_config`)."""
    if teacher is None:
        teacher, _ = load_size_config(cfg.teacher)
    s = cfg.student
    if s.init == "pruned":
        n = int(teacher.get_text_config(decoder=True).num_hidden_layers)
        conf = pruned_config(student_config_from_teacher(teacher, layers=list(range(n))), prune_target(cfg))
        return conf if s.moe is None else type(conf)(**{**conf.to_dict(), "moe": s.moe.model_dump()})
    names = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    overrides = {k: getattr(s, k) for k in names if s.init == "random" and getattr(s, k) is not None}
    if s.moe is not None:
        overrides["moe"] = s.moe.model_dump()
    return student_config_from_teacher(teacher, num_layers=s.num_layers, layers=s.layers, **overrides)


# ------------------------------------------------------------------------------------------ the command's result
def unit_of(name: str) -> str:
    """The unit of a flattened figure: params, FLOPs, tokens or bytes."""
    if name.startswith("params"):
        return "params"
    if name.startswith("flops"):
        return "FLOPs"
    return "tokens" if name.startswith("chinchilla") else "bytes"


def _is_config_file(spec: str | Path) -> bool:
    return Path(str(spec)).suffix in (".yaml", ".yml", ".json")


def _model_for_measuring(spec: str | Path, config: Any, dtype: str,
                         trust_remote_code: bool | None = None) -> tuple[Any, str]:
    """The real model to measure, loaded in `dtype`: its weights, or for a config alone a randomly initialised
    instance of it."""
    if _is_config_file(spec):
        torch_dtype = parse_dtype(dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="eager")
        return model.eval(), "random init of the config"
    return load_model(spec, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code)[0], \
        "weights"


# the estimate a GGUF file of each type (its header's general.file_type) is checked against
GGUF_ESTIMATES = {"ALL_F32": "fp32", "MOSTLY_F16": "bf16", "MOSTLY_BF16": "bf16", "MOSTLY_Q8_0": "int8",
                  "MOSTLY_Q4_0": "int4"}


def gguf_file_figures(spec: str | Path, est: SizeEstimate) -> dict[str, Any] | None:
    """For a .gguf spec (or the embedded teacher): the bytes its tensors really take, by GGML type, and the file's
    size, beside the weight-bytes estimate at its file type's width (none for other types, e.g. Q4_1); None for
    any other spec. The estimate keeps vectors at 16 bits where the file has them in F32, and a matrix whose rows
    are not whole blocks in F16 where the estimate rounds it up to blocks."""
    if _is_config_file(spec):
        return None
    ms = resolve(spec)
    if ms.gguf_file is None:
        return None
    real = gguf_file_bytes(Path(ms.path) / ms.gguf_file)
    width = GGUF_ESTIMATES.get(real["file_type"] or "")
    guess = est.weight_bytes[width] if width else None
    return {**real, "estimate_of": f"weight_bytes_{width}" if width else None, "estimate": guess,
            "rel_error": (guess - real["tensor_bytes"]) / real["tensor_bytes"] if guess else None}


def _one(spec: str | Path, context: int, batch: int, measure_context: int | None,
         trust_remote_code: bool | None = None) -> tuple[dict, SizeEstimate]:
    config, raw = load_size_config(spec)
    est = estimate(config, context, batch, raw=raw)
    info: dict[str, Any] = {"spec": str(spec), "family": est.family}
    file = gguf_file_figures(spec, est)
    if file is not None:
        info["file"] = file
    if measure_context:
        measured: dict[str, float] = {}
        for dtype in ("float32", "bfloat16"):  # loaded in each (a GGUF-loaded model refuses to be cast)
            model, source = _model_for_measuring(spec, config, dtype, trust_remote_code)
            if source == "weights" and dtype == "float32":
                info.update(model_info(str(spec), model))
            measured.update(measure(model, measure_context, 1, flops=dtype == "float32"))
            del model
        at = flatten(estimate(config, measure_context, 1, raw=raw))
        info["measured"] = {
            "context": measure_context, "batch": 1, "source": source,
            "figures": {k: {"estimate": at[k], "measured": v, "rel_error": (at[k] - v) / v if v else None}
                        for k, v in measured.items()},
        }  # fmt: skip
    return info, est


def size_results(spec: str | Path, baseline: str | Path | None = None, *, context: int = 2048, batch: int = 1,
                 measure_context: int | None = None, trust_remote_code: bool | None = None):
    """`pocketlm size`'s `Results` (kind "size"): every estimate for `spec`, and with `baseline` the baseline's
    (`baseline_<name>`) and the ratios spec / baseline (`ratio_<name>`); with `measure_context`, the measured
    figures (`measured_<name>`, at that context, batch 1) with the estimates at the same context in `details`."""
    t0 = time.perf_counter()
    info, est = _one(spec, context, batch, measure_context, trust_remote_code)
    metrics = [Metric(k, float(v), 1, unit=unit_of(k)) for k, v in flatten(est).items()]
    metrics += [Metric(f"measured_{k}", float(f["measured"]), 1, unit=unit_of(k))
                for k, f in info.get("measured", {}).get("figures", {}).items()]
    file = info.pop("file", None)
    metrics += [Metric(f"file_{k}", float(file[k]), 1, unit="bytes") for k in ("tensor_bytes", "file_bytes")
                if file is not None]
    details: dict[str, Any] = {"model": {**est.to_dict(), "measured": info.pop("measured", None), "file": file}}
    base_info = None
    if baseline is not None:
        base_info, base = _one(baseline, context, batch, measure_context, trust_remote_code)
        metrics += [Metric(f"baseline_{k}", float(v), 1, unit=unit_of(k)) for k, v in flatten(base).items()]
        metrics += [Metric(f"ratio_{k}", r, 1, unit="ratio") for k, r in compare(est, base).items()]
        details["baseline"] = {**base.to_dict(), "measured": base_info.pop("measured", None),
                               "file": base_info.pop("file", None)}
    settings = {"context": context, "batch": batch, "measure_context": measure_context,
                "quant_group": QUANT_GROUP, "quant_scale_bytes": SCALE_BYTES,
                "chinchilla_tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM}
    return Results(kind="size", model=info, baseline=base_info, data={"source": None, "hash": None, "n": 0},
                   settings=settings, metrics=metrics, details=details, provenance=provenance(),
                   wall_time_s=time.perf_counter() - t0)
