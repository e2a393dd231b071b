"""The loop a library phase runs on: user data as ``tf.data``, the distributed iterators,
and Keras callbacks around :func:`metamix_tf.training.trainer.run_epochs`.

``train_data`` / ``validation_data``: a ``tf.data.Dataset`` of ``(images, labels)`` batches
(integer labels), or an ``(x, y)`` tuple of arrays (batched by ``batch_size``, the training
data reshuffled each epoch); each epoch and evaluation iterates a new iterator, with
tf.data's autotuning off unless the dataset's options set it
(:func:`~metamix_tf.training.trainer.distribute_dataset`). Callbacks get ``on_train_begin``,
``on_epoch_begin``, ``on_epoch_end(epoch, logs)`` with the epoch's scalars (Keras' ``accuracy`` /
``val_accuracy`` names added) and ``on_train_end``; ``model.stop_training`` ends the phase
after the epoch; ``BackupAndRestore`` is refused (resume is ``checkpoint_dir``).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.training import trainer

__all__ = ["LOOP_SETTINGS", "as_dataset", "make_loop", "run_phase"]

# Settings of the loop itself (the others are SearchConfig / FinetuneConfig fields).
LOOP_SETTINGS = {"batch_size": 32, "steps_per_epoch": None, "shuffle_seed": 0,
                  "jit_compile": False, "verbose": True, "checkpoint_dir": None,
                  "log_dir": None, "eval_batch_size": 256}

def as_dataset(data, name: str, *, batch_size: int, shuffle: bool, seed: int = 0):
    """A ``tf.data.Dataset`` of ``(images, labels)`` batches from a dataset or ``(x, y)``."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        ok = (isinstance(spec, tuple) and len(spec) == 2
              and all(isinstance(s, tf.TensorSpec) for s in spec)
              and spec[0].shape.rank == 4 and spec[1].shape.rank == 1
              and (spec[1].dtype.is_integer))
        if not ok:
            raise ValueError(f"`{name}` must yield (images, labels) batches: images "
                             "[batch, height, width, channels], integer labels [batch]. "
                             f"Received: element_spec={spec}")
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0], np.float32), np.asarray(data[1])
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or not np.issubdtype(
                y.dtype, np.integer):
            raise ValueError(f"`{name}` as (x, y) needs images [n, height, width, channels] "
                             f"and n integer labels. Received: x.shape={x.shape}, "
                             f"y.shape={y.shape}, y.dtype={y.dtype}")
        dataset = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
        if shuffle:
            dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return dataset.batch(batch_size)
    raise ValueError(f"`{name}` must be a tf.data.Dataset of (images, labels) batches or an "
                     f"(x, y) tuple of arrays. Received: {name}={type(data).__name__}")


def make_loop(train_data, validation_data=None, *, strategy=None, batch_size: int = 32,
              eval_batch_size: int = 256, steps_per_epoch: int | None = None,
              shuffle_seed: int = 0, jit_compile: bool = False, verbose: bool = True,
              checkpoint_dir: str | None = None, log_dir: str | None = None) -> trainer.Loop:
    """A :class:`trainer.Loop` on user data (see the module docstring for the data forms)."""
    strategy = strategy or tf.distribute.get_strategy()
    train = as_dataset(train_data, "train_data", batch_size=batch_size, shuffle=True,
                       seed=shuffle_seed)
    if steps_per_epoch is None:
        cardinality = int(train.cardinality())
        if cardinality <= 0:  # infinite or unknown
            raise ValueError("`train_data` has no known length; give the steps_per_epoch "
                             f"setting. Received: cardinality={cardinality}")
        steps_per_epoch = cardinality
    evaluation = None
    if validation_data is not None:
        evaluation = trainer.distribute_dataset(strategy, as_dataset(
            validation_data, "validation_data", batch_size=eval_batch_size, shuffle=False))
    return trainer.Loop(strategy=strategy, iterators=trainer.EpochIterators(strategy, train),
                steps_per_epoch=int(steps_per_epoch), eval_dataset=evaluation,
                checkpoint_dir=checkpoint_dir, log_dir=log_dir, jit_compile=bool(jit_compile),
                verbose=bool(verbose))


def _callback_list(callbacks, model):
    callbacks = list(callbacks or [])
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            raise ValueError("BackupAndRestore is for Keras' fit; the MetaMix phases resume "
                             "from the checkpoint_dir setting. Received: "
                             "callbacks=[BackupAndRestore]")
    return keras.callbacks.CallbackList(callbacks, model=model) if callbacks else None


def _scalars(record: dict) -> dict:
    logs = {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
    if "acc" in logs:  # Keras' names, so that callbacks monitor what fit would log
        logs["accuracy"] = logs["acc"]
    if "val_acc" in logs:
        logs["val_accuracy"] = logs["val_acc"]
    return logs


def run_phase(loop: trainer.Loop, model, callbacks, phase: trainer.Phase) -> trainer.PhaseResult:
    """:func:`trainer.run_epochs` with Keras ``callbacks`` (``on_epoch_begin``,
    ``on_epoch_end`` with the epoch's scalars, ``model.stop_training``) added to its hooks."""
    cbs = _callback_list(callbacks, model)
    model.stop_training = False
    hooks = trainer.Hooks(should_stop=lambda: bool(model.stop_training))
    if cbs is not None:
        hooks.before_epoch = cbs.on_epoch_begin
        hooks.on_epoch_end = lambda epoch, record: cbs.on_epoch_end(epoch, _scalars(record))
        cbs.on_train_begin()
    result = trainer.run_epochs(dataclasses.replace(phase, hooks=[*phase.hooks, hooks]), loop)
    if cbs is not None:
        cbs.on_train_end(_scalars(result.last))
    return result
