"""The same Keras model computing in float64: the reference that rounds where the int8
model rounds.

The int8 model accumulates integers exactly and requantizes once per stored tensor; the
wrapped Keras model computes the same quantized network in float32 (conv, then the unfolded
BatchNorm), whose rounding moves a value lying within about 1e-6 of a rounding boundary to
the other side now and then, and a random-weight network with 2-bit layers carries that one
step on to the logits. :func:`float64_copy` rebuilds the model from its config with every
layer's dtype policy at float64 and copies its variables (step sizes, bit indices and modes
included): its pre-rounding values are exact to about 1e-15, so where it and the int8
model still round a value differently, the cause is in the int8 file's own float32 numbers
(the BatchNorm-folded per-channel scales, XNNPACK's float32 requantization multiply), not in
the Keras model's arithmetic. Agreement with it separates what the export computes from the
float32 arithmetic of the Keras model itself.
"""

from __future__ import annotations

import keras
import numpy as np

from metamix_tf.export import verify

__all__ = ["float64_copy", "float64_logits"]

_POLICIES = ("DTypePolicy", "FloatDTypePolicy")


def _to_float64(config):
    """``config`` with every float32 dtype policy (and the input layers' ``"float32"``
    dtype) at float64; other values unchanged."""
    if isinstance(config, dict):
        if config.get("class_name") in _POLICIES:
            inner = config.get("config", {})
            if inner.get("name") == "float32":
                return {**config, "config": {**inner, "name": "float64"}}
            return config
        return {key: ("float64" if key == "dtype" and value == "float32"
                      else _to_float64(value)) for key, value in config.items()}
    if isinstance(config, list):
        return [_to_float64(value) for value in config]
    return config


def float64_copy(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose layers compute in float64, with ``model``'s variables
    (float32 ones cast to float64, exactly; integer ones as they are). Feed it float64
    inputs. Raises ``ValueError`` if the rebuilt model's variables do not match."""
    try:
        copy = keras.saving.deserialize_keras_object(
            _to_float64(keras.saving.serialize_keras_object(model)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"'{model.name}' cannot be rebuilt from its config in float64 (a "
                         f"custom layer not registered with "
                         f"keras.saving.register_keras_serializable?): {error}") from error
    sources, targets = model.weights, copy.weights
    if len(sources) != len(targets) or any(
            tuple(s.shape) != tuple(t.shape) for s, t in zip(sources, targets, strict=True)):
        raise ValueError(f"The float64 copy of '{model.name}' has other variables than the "
                         f"model ({len(targets)} vs {len(sources)}): a layer's config does not "
                         f"rebuild it. Save and load the model with keras to check.")
    for source, target in zip(sources, targets, strict=True):
        target.assign(keras.ops.convert_to_numpy(source).astype(target.dtype))
    if any(v.dtype == "float32" for v in copy.weights):
        raise ValueError(f"The float64 copy of '{model.name}' still holds float32 variables "
                         f"({sorted({v.path for v in copy.weights if v.dtype == 'float32'})[:3]}"
                         f"...): a layer fixes its dtype.")
    return copy


def float64_logits(model: keras.Model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits of :func:`float64_copy` of ``model`` on ``images`` (eager calls, inference)."""
    return verify.keras_logits(float64_copy(model), np.asarray(images, np.float64), batch_size)
