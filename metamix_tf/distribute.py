"""Which ``tf.distribute`` strategy a run uses, and small helpers around it.

:func:`get_strategy` picks ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set,
``MirroredStrategy`` over all local GPUs when there are several, and the default strategy
(one device: the GPU if there is one, else the CPU) otherwise. Tests pass ``devices=`` to
mirror over logical CPUs.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence

import keras
import tensorflow as tf

__all__ = ["get_strategy", "mirrored_strategy", "describe", "sync_batch_norm", "has_gpu"]


def has_gpu() -> bool:
    """Whether TensorFlow sees at least one GPU."""
    return bool(tf.config.list_logical_devices("GPU"))


def get_strategy(devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """The distribution strategy of a run.

    Args:
      devices: explicit device names (e.g. two logical CPUs in tests): one device gives
        ``OneDeviceStrategy``, several give ``MirroredStrategy`` over them. ``None`` picks
        automatically: ``TF_CONFIG`` set -> ``MultiWorkerMirroredStrategy``; more than one
        local GPU -> ``MirroredStrategy`` over all of them; else the default strategy.
    """
    if devices is not None:
        devices = list(devices)
        if not devices:
            raise ValueError("`devices` must name at least one device. "
                             f"Received: devices={devices}")
        if len(devices) == 1:
            return tf.distribute.OneDeviceStrategy(devices[0])
        return mirrored_strategy(devices)
    tf_config = os.environ.get("TF_CONFIG")
    if tf_config:
        try:
            json.loads(tf_config)
        except json.JSONDecodeError:
            raise ValueError("The TF_CONFIG environment variable is not valid JSON. "
                             f"Received: TF_CONFIG={tf_config[:200]!r}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return mirrored_strategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


_KEY_BASE_STRIDE = 10_000
_instances = itertools.count(1)


def mirrored_strategy(devices: Sequence[str] | None = None) -> tf.distribute.MirroredStrategy:
    """``tf.distribute.MirroredStrategy(devices)`` that can live beside other instances.

    Every MirroredStrategy numbers its collective groups from the same start, so two
    instances in one process (``pipeline.run`` called twice, a test suite) reuse collective
    keys, and the second one's all-reduces (synchronized BatchNorm) fail with "Shape
    mismatch in the collective instance". Each instance made here gets its own key range
    (through the class attribute ``_collective_key_base``, which TensorFlow reads in the
    constructor and sets for the same reason in its own tests).
    """
    cls = tf.distribute.MirroredStrategy
    saved = cls._collective_key_base
    cls._collective_key_base = next(_instances) * _KEY_BASE_STRIDE
    try:
        return cls(devices)
    finally:
        cls._collective_key_base = saved


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line naming the strategy and its replica count."""
    return f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)"


def sync_batch_norm(model, synchronized: bool) -> int:
    """Sets ``synchronized`` on every BatchNormalization of ``model``; returns the count.

    With several replicas, synchronized BatchNorm computes batch statistics over the global
    batch (an all-reduce of sums), so training does not depend on how the batch is split.
    Read when a step function is traced.
    """
    count = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = bool(synchronized)
            count += 1
    return count
