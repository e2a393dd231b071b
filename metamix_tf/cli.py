"""Console entry points ``metamix-train`` and ``metamix-export`` (see ``setup.py``), and the
configs shipped with the package.

The command-line programs are still the repository's ``train.py`` and ``export_tflite.py``
(absl flags); the entry points run them, so they work from a source checkout installed with
``pip install -e .`` (the documented install). A wheel has no such scripts: the entry points
then say so. Moving the two scripts into the package is part of the package re-layout.
"""

from __future__ import annotations

import importlib.resources
import os
import runpy
import sys

__all__ = ["train", "export", "config_file", "shipped_configs"]

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
