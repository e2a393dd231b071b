"""The command line: settings from flags, errors as one line, and the console entry points.

``train.py`` resolves its config with :func:`resolve_config` (defaults, ``--config`` files,
``--set key.sub=value`` overrides, then the dedicated flags of :func:`flag_overrides`) and
both scripts parse flags with :func:`flags_parser` and report bad input with
:func:`error_exit`: one line ``<script>: error: <message>``, exit code 2, no traceback.

Console entry points ``metamix-train`` and ``metamix-export`` (see ``setup.py``) run the
repository's ``train.py`` and ``export_tflite.py``, so they work from a source checkout
installed with ``pip install -e .`` (the documented install); from a wheel they say so.
:func:`config_file` and :func:`shipped_configs` find the configs shipped as package data.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import runpy
import sys
from collections.abc import Sequence

import yaml

from metamix_tf import config as config_lib

__all__ = [
    "USAGE_ERROR",
    "parse_value",
    "set_overrides",
    "flag_overrides",
    "default_model_dir",
    "resolve_config",
    "one_line",
    "error_exit",
    "flags_parser",
    "train",
    "export",
    "config_file",
    "shipped_configs",
]

USAGE_ERROR = 2  # exit code of bad input, as argparse uses


def parse_value(raw: str, key: str = "value"):
    """A ``--set`` value: YAML, with numbers like ``6e-3`` (a string to YAML 1.1) as floats."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(f"--set {key}= takes a YAML value (a number, true/false, a string, "
                         f"or a list like [2, 4, 8]). Received: {key}={raw!r}") from None
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _nested(key: str, value) -> dict:
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def set_overrides(items: Sequence[str]) -> dict:
    """``["search.cost_weight=8", ...]`` -> nested overrides, applied in order."""
    values: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set takes key.sub=value, e.g. --set search.cost_weight=8. "
                             f"Received: --set={item!r}")
        values = config_lib.merge(values, _nested(key, parse_value(raw, key)))
    return values


def flag_overrides(*, model=None, dataset=None, data_dir=None, weights=None, searcher=None,
                   bits=None, batch_size=None, seed=None, target_gbops=None,
                   target_avg_bits=None, epochs=None, pretrain_epochs=None,
                   search_epochs=None, finetune_epochs=None, teacher=None) -> dict:
    """The overrides of ``train.py``'s dedicated flags (``None``: not given).

    ``epochs`` sets every phase unless a phase's own flag is given; ``teacher`` sets both
    search and weight training; ``seed`` seeds the run and the data order; an average
    bit-width target without a GBOPs target clears a config file's GBOPs target.
    """
    direct = {
        "model.name": model, "data.dataset": dataset, "data.data_dir": data_dir,
        "model.weights": weights, "search.searcher": searcher, "search.uniform_bits": bits,
        "data.batch_size": batch_size, "seed": seed, "data.seed": seed,
        "search.target_gbops": target_gbops, "search.target_avg_bits": target_avg_bits,
        "pretrain.epochs": epochs if pretrain_epochs is None else pretrain_epochs,
        "search.epochs": epochs if search_epochs is None else search_epochs,
        "finetune.epochs": epochs if finetune_epochs is None else finetune_epochs,
        "search.teacher": teacher, "finetune.teacher": teacher,
    }
    values: dict = {}
    for key, value in direct.items():
        if value is not None:
            values = config_lib.merge(values, _nested(key, value))
    if target_avg_bits is not None and target_gbops is None:
        values = config_lib.merge(values, _nested("search.target_gbops", None))
    return values


def default_model_dir(model: str, dataset: str) -> str:
    """``runs/<model>-<dataset slug>`` (``folder:/a/b/cifar10`` -> ``cifar10``)."""
    name = dataset.split(":", 1)[1] if dataset.startswith("folder:") else dataset
    name = os.path.basename(os.path.normpath(name)) or "data"
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_") or "data"
    return os.path.join("runs", f"{model}-{slug}")


def resolve_config(config_paths: Sequence[str] = (), sets: Sequence[str] = (),
                   flags: dict | None = None,
                   model_dir: str | None = None) -> config_lib.ExperimentConfig:
    """Defaults, each YAML file, each ``--set``, then the dedicated flags (a dict of
    :func:`flag_overrides` arguments); the run directory is ``model_dir``, else the
    config's, else :func:`default_model_dir`."""
    overrides = config_lib.merge(set_overrides(sets), flag_overrides(**(flags or {})))
    config = config_lib.load(config_paths, overrides)
    if model_dir:
        config.model_dir = model_dir
    elif config.model_dir == config_lib.ExperimentConfig().model_dir:
        config.model_dir = default_model_dir(str(config.model.name), str(config.data.dataset))
    return config


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def error_exit(prog: str, error: BaseException, code: int = USAGE_ERROR):
    """Prints ``<prog>: error: <message>`` as one line to stderr and exits with ``code``."""
    print(f"{os.path.basename(prog)}: error: {one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(code)


def flags_parser(argv: Sequence[str]) -> list:
    """``absl.app.run``'s ``flags_parser`` with a bad flag answered in one line (exit 2)."""
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except flags.Error as error:
        error_exit(argv[0] if argv else "", error)


# -- console entry points and shipped configs --------------------------------------------
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(name: str) -> None:
    path = os.path.join(_ROOT, name)
    if not os.path.isfile(path):
        sys.exit(f"error: {name} is not next to the installed package ({_ROOT}); install "
                 "metamix_tf from a source checkout with `pip install -e .`. "
                 f"Received: script={path}")
    sys.argv[0] = path
    runpy.run_path(path, run_name="__main__")


def train() -> None:
    """``metamix-train``: the flags of ``train.py``."""
    _run_script("train.py")


def export() -> None:
    """``metamix-export``: the flags of ``export_tflite.py``."""
    _run_script("export_tflite.py")


def _configs():
    """The shipped configs: package data ``metamix_tf.configs`` once installed, the
    repository's ``configs/`` in a source checkout run without installing."""
    try:
        return importlib.resources.files("metamix_tf.configs")
    except ModuleNotFoundError:
        return importlib.resources.files("metamix_tf").joinpath("..", "configs")


def shipped_configs() -> list[str]:
    """Names of the YAML configs shipped with the package."""
    return sorted(p.name for p in _configs().iterdir() if p.name.endswith(".yaml"))


def config_file(name: str) -> str:
    """Path of a shipped config (``"demo_mnist"`` or ``"demo_mnist.yaml"``), for
    ``train.py --config``."""
    filename = name if name.endswith(".yaml") else f"{name}.yaml"
    if filename not in shipped_configs():
        raise ValueError(f"No shipped config {filename!r}; shipped: {shipped_configs()}. "
                         f"Received: name={name!r}")
    return os.path.normpath(str(_configs().joinpath(filename)))
