"""Configs: one pydantic model per component; YAML mirrors them exactly.

Unknown keys are errors that name the key; values are checked where they are declared; `--set a.b=c` overrides
are applied to the YAML tree before validation, so they are checked the same way.

This module is the users' facade: each config lives beside its component (the strict base and YAML loading in
core/config.py, the student's in models/config.py, the distillation run's in distill/config.py) and is re-exported
here, so `from pocketlm.config import DistillConfig` keeps working.
"""
from __future__ import annotations

from pocketlm.core.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    format_validation_error,
    load_config,
    load_yaml_text,
    parse_override,
    registered,
)
from pocketlm.distill.config import (
    SEED_MAX,
    DataConfig,
    DistillConfig,
    LossConfig,
    SyntheticDataConfig,
    TrainConfig,
)
from pocketlm.models.config import MoEConfig, PruningConfig, StudentConfig


__all__ = [
    "SEED_MAX", "ConfigError", "DataConfig", "DistillConfig", "LossConfig", "MoEConfig", "PruningConfig",
    "StrictModel", "StudentConfig", "SyntheticDataConfig", "TrainConfig", "apply_overrides",
    "format_validation_error", "load_config", "load_yaml_text", "parse_override", "registered",
]
