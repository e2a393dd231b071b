"""Loading a ``.weights.h5`` / ``.keras`` file into a built model, with a clear error that
names the first layer whose stored shapes differ."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile

import h5py
import keras

__all__ = ["check_weights_path", "load_weights_file"]


def _h5_arrays(h5file) -> dict:
    """``{path: shape}`` of the layer variables stored in a Keras 3 weights file."""
    arrays = {}

    def visit(path, obj):
        if isinstance(obj, h5py.Dataset) and path.startswith("layers/"):
            arrays[path] = tuple(obj.shape)

    if "layers" in h5file:
        h5file["layers"].visititems(lambda p, o: visit(f"layers/{p}", o))
    return arrays


def _file_arrays(path: str) -> dict:
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            data = io.BytesIO(archive.read("model.weights.h5"))
        with h5py.File(data, "r") as f:
            return _h5_arrays(f)
    with h5py.File(path, "r") as f:
        return _h5_arrays(f)


def _model_arrays(model: keras.Model) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.weights.h5")
        model.save_weights(path)
        return _file_arrays(path)


def check_weights_path(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Weights file not found. Received: weights={path!r}")
    if not (path.endswith(".keras") or path.endswith(".weights.h5")):
        raise ValueError("`weights` must be None, 'imagenet', or a path ending in '.keras' or "
                         f"'.weights.h5'. Received: weights={path!r}")


def _describe_mismatch(stored: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(stored))
    unused = sorted(set(stored) - set(expected))
    reshaped = sorted(p for p in set(expected) & set(stored) if expected[p] != stored[p])
    parts = []
    if missing:
        parts.append(f"{len(missing)} array(s) missing from the file, e.g. {missing[0]}")
    if unused:
        parts.append(f"{len(unused)} array(s) the model does not have, e.g. {unused[0]}")
    if reshaped:
        p = reshaped[0]
        parts.append(f"{len(reshaped)} shape mismatch(es), e.g. {p}: "
                     f"file {stored[p]} vs model {expected[p]}")
    return "; ".join(parts)


def load_weights_file(model: keras.Model, path: str) -> None:
    """Loads a ``.keras`` / ``.weights.h5`` file into ``model``; ValueError when it does not fit.

    Keras alone ignores arrays a file has beyond the model's, so the stored layout is first
    compared with the layout ``model`` itself saves.
    """
    check_weights_path(path)
    try:
        stored = _file_arrays(path)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"Could not read weights from {path} ({e}). Received: weights={path!r}") \
            from None
    expected = _model_arrays(model)
    if stored and stored != expected:  # empty for files in pre-Keras-3 layouts: Keras decides
        raise ValueError(f"The weights in {path} do not fit model '{model.name}': "
                         f"{_describe_mismatch(stored, expected)}. Received: weights={path!r}")
    try:
        model.load_weights(path)
    except ValueError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"The weights in {path} do not fit model '{model.name}': {first} "
                         f"Received: weights={path!r}") from e
