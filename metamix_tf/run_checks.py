"""Checks of a run's config before any phase runs, and the GBOPs target it asks for.

Everything here fails fast with one line naming the key, what was received and what to do.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing

from metamix_tf import config as config_lib
from metamix_tf import models
from metamix_tf.config import ExperimentConfig
from metamix_tf.quant.cost import CostModel

__all__ = ["ALL", "PHASES", "check", "check_avg_bits", "quant_config", "resolve_target"]

PHASES = ("pretrain", "search", "finetune")
ALL = "all"


def _check_numbers(section, prefix: str) -> None:
    """Numeric fields must hold numbers (YAML 1.1 reads ``5e-4`` without a dot as a string)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, f"{prefix}{f.name}.")
            continue
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        if origin is None:
            kinds = (hint,)
        elif origin in (typing.Union, types.UnionType):
            kinds = typing.get_args(hint)
        else:  # containers (candidate bits, layer names): left to their own checks
            continue
        numeric = any(k in (int, float) for k in kinds)
        if numeric and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(
                f"`{prefix}{f.name}` must be a number (in YAML write 5.0e-4, not 5e-4, which "
                f"YAML reads as a string). Received: {prefix}{f.name}={value!r}")


def check(config: ExperimentConfig, phase: str, model_fn) -> None:
    _check_numbers(config, "")
    if phase not in PHASES + (ALL,):
        raise ValueError(f"`phase` must be one of {PHASES + (ALL,)}. Received: phase={phase!r}")
    if model_fn is None and config.model.name not in models.MODEL_NAMES:
        raise ValueError(f"Unknown model name; expected one of {models.MODEL_NAMES}. "
                         f"Received: model={config.model.name!r}")
    s = config.search
    for section, name in ((config.pretrain, "pretrain"), (s, "search"),
                          (config.finetune, "finetune")):
        if not isinstance(section.epochs, int) or section.epochs < 0:
            raise ValueError(f"`{name}.epochs` must be an integer >= 0. "
                             f"Received: {name}.epochs={section.epochs!r}")
    if s.searcher != "none" and s.epochs < 1:
        raise ValueError(f"The '{s.searcher}' searcher needs `search.epochs` >= 1 to learn the "
                         f"bit logits. Received: search.epochs={s.epochs}")
    if s.warmup_epochs < 0:
        raise ValueError(f"`search.warmup_epochs` must be >= 0. "
                         f"Received: search.warmup_epochs={s.warmup_epochs}")
    if s.meta_candidates is not None and s.meta_candidates > len(config.quant.candidate_bits):
        raise ValueError(f"`search.meta_candidates` must be at most the number of candidate "
                         f"bit-widths ({len(config.quant.candidate_bits)}). "
                         f"Received: meta_candidates={s.meta_candidates}")
    if s.target_gbops is None and s.target_avg_bits is None and s.searcher != "none":
        raise ValueError("Give the GBOPs target as `search.target_gbops` or "
                         "`search.target_avg_bits`. Received: both None")
    if s.target_gbops is not None and not s.target_gbops > 0:
        raise ValueError(f"`search.target_gbops` must be > 0. "
                         f"Received: target_gbops={s.target_gbops}")
    for section, name in ((s, "search"), (config.finetune, "finetune")):
        teacher = section.teacher
        if teacher not in (None, "self") and not os.path.exists(str(teacher)):
            raise FileNotFoundError(f"Teacher model file not found: {teacher}. Use 'self' (the "
                                    f"float model) or a .keras file. "
                                    f"Received: {name}.teacher={teacher!r}")


def quant_config(config: ExperimentConfig) -> config_lib.QuantConfig:
    """The quantization config; uniform LSQ adds its bit-width to the candidates if needed."""
    quant = config.quant
    if config.search.searcher == "none" and config.search.uniform_bits not in quant.candidate_bits:
        quant = dataclasses.replace(
            quant, candidate_bits=tuple(sorted({*quant.candidate_bits,
                                                config.search.uniform_bits})))
    return quant


def check_avg_bits(config: ExperimentConfig) -> None:
    bits = config.search.target_avg_bits
    low, high = min(config.quant.candidate_bits), max(config.quant.candidate_bits)
    if not low <= bits <= high:
        raise ValueError(f"The average activation bit-width target {bits} is outside the "
                         f"candidate bits [{low}, {high}]. Received: target_avg_bits={bits}")


def resolve_target(config: ExperimentConfig, cost: CostModel) -> float:
    """The GBOPs target: ``search.target_gbops`` if set, else every searchable layer at
    ``search.target_avg_bits``; checked against what the candidate bits allow."""
    s = config.search
    if s.target_gbops is not None:
        target = float(s.target_gbops)
    elif s.target_avg_bits is not None:
        check_avg_bits(config)
        target = cost.uniform_gbops(float(s.target_avg_bits))
    else:
        target = cost.uniform_gbops(float(s.uniform_bits))
    return cost.check_target(target)
