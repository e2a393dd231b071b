"""The files of a run directory: Keras models written atomically, JSON records, the
machine a run used, and the bits-per-layer plot."""

from __future__ import annotations

import json
import os
import platform

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.training import distribute

__all__ = ["cpu_model", "load_model", "machine", "plot_bits", "read_json", "save_model",
           "write_json"]


def load_model(path: str, what: str, hint: str) -> keras.Model:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}; {hint}.")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # a truncated or foreign file: zip, h5 and Keras errors alike
        raise ValueError(f"{what} {path} is not a readable Keras model "
                         f"({type(error).__name__}); {hint}. Received: path={path!r}") from None


def save_model(model, path: str) -> None:
    """Saves ``model`` with BatchNorm un-synchronised (a plain single-device model)."""
    distribute.sync_batch_norm(model, False)
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Not JSON serialisable: {type(value).__name__}")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else ``platform.processor()`` or
    the architecture: timings differ between CPUs of one architecture (Intel, AMD)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(strategy) -> dict:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_logical_devices("GPU")],
        "strategy": distribute.describe(strategy),
    }


def plot_bits(report: dict, path: str, title: str = "") -> None:
    """Bars of the selected activation bits per layer, with each layer's MACs (log scale)
    on a second axis; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.22 * len(rows) + 2), 4.5))
    colors = ["tab:blue" if r["searchable"] else "tab:gray" for r in rows]
    ax.bar(x, [r["a_bits"] for r in rows], color=colors, width=0.8)
    ax.set_ylabel("activation bits (gray: fixed)")
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylim(0, max(r["a_bits"] for r in rows) + 1)
    twin = ax.twinx()
    twin.plot(x, [max(r["macs"], 1) for r in rows], color="tab:red", marker=".", lw=1)
    twin.set_yscale("log")
    twin.set_ylabel("MACs", color="tab:red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
