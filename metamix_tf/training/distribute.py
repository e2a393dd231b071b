"""Which ``tf.distribute`` strategy a run uses, and small helpers around it.

:func:`get_strategy` picks ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` is set,
``MirroredStrategy`` over all local GPUs when there are several, and the default strategy
(one device: the GPU if there is one, else the CPU) otherwise. Tests pass ``devices=`` to
mirror over logical CPUs.

With several workers only the chief writes to the run directory: :func:`worker_dir` gives
every other worker a temporary copy of it to write to, and removes it afterwards (as the
TensorFlow multi-worker guide prescribes for checkpoints).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import keras
import tensorflow as tf

__all__ = ["get_strategy", "mirrored_strategy", "describe", "sync_batch_norm", "has_gpu",
           "is_chief", "barrier", "worker_dir"]


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


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run directory: always, except for the workers of a
    ``MultiWorkerMirroredStrategy`` other than the chief (task ``chief``, or ``worker`` 0
    when the cluster has no ``chief``)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    return (task_type == "worker" and task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns once every worker has called it (an all-reduce of one number per replica)."""
    ones = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)


_NOT_COPIED = ("logs", "export")


@contextlib.contextmanager
def worker_dir(strategy: tf.distribute.Strategy, model_dir: str) -> Iterator[str]:
    """The directory this process writes a run to: ``model_dir`` for the chief; for another
    worker a temporary copy of ``model_dir`` (checkpoints, models and bookkeeping, so that
    it resumes where the chief does), removed on exit.

    With several workers, everyone waits until each worker has taken its copy, so that the
    chief changes nothing before. ``model_dir`` must be on storage every worker sees.
    """
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if is_chief(strategy):
        if multi_worker:
            barrier(strategy)
        yield model_dir
        return
    work = tempfile.mkdtemp(prefix="metamix_worker_")
    try:
        if os.path.isdir(model_dir):
            shutil.copytree(model_dir, work, dirs_exist_ok=True,
                            ignore=lambda d, names: [n for n in names
                                                     if d == model_dir and n in _NOT_COPIED])
        if multi_worker:
            barrier(strategy)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
