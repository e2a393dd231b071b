"""Which settings the results in a run directory were made with, and what a rerun may do.

Each phase writes ``<phase>.settings.json`` before it trains: the flattened config keys it
depends on, i.e. its own sections and those of the phases before it
(:data:`PHASE_SECTIONS`). A rerun compares its config with every phase that has results
(a ``<phase>.done`` or a checkpoint). When they differ, :func:`stale_phases` refuses with
one line naming the changed keys, or, with ``overwrite=True``, returns the first changed
phase and every phase after it, whose outputs :func:`clear` then removes. A run directory
from before these files existed is compared with its ``config.yaml``.

Keys that do not change what a phase computes (the run directory, XLA, where TFDS keeps
its files, the evaluation batch size) are not compared.
"""

from __future__ import annotations

import json
import os
import shutil

import yaml

from metamix_tf import config as config_lib

__all__ = [
    "PHASE_SECTIONS",
    "SettingsChangedError",
    "settings",
    "recorded",
    "stale_phases",
    "clear",
    "record",
]

PHASES = ("pretrain", "search", "finetune")
# Config sections (top-level keys) each phase's results depend on, earlier phases included.
PHASE_SECTIONS = {
    "pretrain": ("seed", "model", "data", "pretrain"),
    "search": ("seed", "model", "data", "pretrain", "quant", "search"),
    "finetune": ("seed", "model", "data", "pretrain", "quant", "search", "finetune"),
}
IGNORED_KEYS = ("model_dir", "jit_compile", "steps_per_execution", "data.data_dir",
                "data.eval_batch_size")
# What each phase leaves in the run directory (the files after it depend on it too).
_OUTPUTS = {
    "pretrain": ("float.keras",),
    "search": ("search.keras", "bits.json", "bits.png"),
    "finetune": ("final.keras", "export"),
}


class SettingsChangedError(ValueError):
    """A rerun's settings differ from those the run directory's results were made with."""


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings(config: config_lib.ExperimentConfig | dict, phase: str) -> dict:
    """``{dotted key: value}`` of the settings ``phase``'s results depend on."""
    values = config if isinstance(config, dict) else config_lib.to_dict(config)
    flat = _flatten({k: v for k, v in values.items() if k in PHASE_SECTIONS[phase]})
    flat = {k: v for k, v in flat.items() if k not in IGNORED_KEYS}
    return json.loads(json.dumps(flat))  # tuples -> lists, as read back from JSON


def _settings_path(model_dir: str, phase: str) -> str:
    return os.path.join(model_dir, f"{phase}.settings.json")


def _has_results(model_dir: str, phase: str) -> bool:
    return (os.path.exists(os.path.join(model_dir, f"{phase}.done"))
            or os.path.exists(os.path.join(model_dir, "ckpt", phase, "checkpoint")))


def recorded(model_dir: str, phase: str) -> dict | None:
    """The settings ``phase``'s results in ``model_dir`` were made with, or None if it has
    none (a run directory without settings files: read from its ``config.yaml``)."""
    if not _has_results(model_dir, phase):
        return None
    path = _settings_path(model_dir, phase)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    legacy = os.path.join(model_dir, "config.yaml")
    if not os.path.exists(legacy):
        return None
    with open(legacy) as f:
        values = yaml.safe_load(f) or {}
    # Through the dataclasses, so that defaults added since fill in as they did then.
    return settings(config_lib.from_dict(config_lib.ExperimentConfig, values), phase)


def _changes(old: dict, new: dict) -> list:
    return sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))


def stale_phases(config: config_lib.ExperimentConfig, model_dir: str | None = None,
                 overwrite: bool = False) -> tuple:
    """The phases whose results in ``model_dir`` (default ``config.model_dir``) were made
    with other settings, and every phase after the first of them.

    Raises:
      SettingsChangedError: when there are such phases and ``overwrite`` is False.
    """
    model_dir = model_dir or config.model_dir
    changed: dict = {}
    stale: tuple = ()
    for phase in PHASES:
        old = recorded(model_dir, phase)
        if old is None:
            continue
        new = settings(config, phase)
        keys = _changes(old, new)
        for key in keys:
            changed.setdefault(key, (old.get(key, "<unset>"), new.get(key, "<unset>")))
        if keys and not stale:
            stale = PHASES[PHASES.index(phase):]
    if not stale:
        return ()
    if overwrite:
        return stale
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise SettingsChangedError(
        f"The results in {model_dir} were made with other settings ({shown}{more}). Use a new "
        f"--model_dir, or --overwrite (overwrite=True) to redo {', '.join(stale)}. "
        f"Received: model_dir={model_dir!r}")


def clear(model_dir: str, phases) -> list:
    """Removes the results of ``phases`` (done and settings files, checkpoints, logs,
    models, ``summary.json``); returns the removed paths."""
    removed = []
    paths = []
    for phase in phases:
        paths += [f"{phase}.done", f"{phase}.settings.json", os.path.join("ckpt", phase),
                  os.path.join("logs", phase), *_OUTPUTS[phase]]
    if phases:
        paths.append("summary.json")
    for name in paths:
        path = os.path.join(model_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(path)
    return removed


def record(config: config_lib.ExperimentConfig, phase: str, model_dir: str | None = None) -> None:
    """Writes the settings ``phase`` is about to be run with."""
    path = _settings_path(model_dir or config.model_dir, phase)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings(config, phase), f, indent=1, sort_keys=True)
    os.replace(tmp, path)
