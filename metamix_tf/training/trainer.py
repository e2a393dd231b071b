"""The epoch loop shared by every phase: steps, evaluation, checkpoints, logs, resume.

:func:`run_epochs` drives one :class:`Phase` (what is trained, evaluated and checkpointed,
and its :class:`Hooks`) on a :class:`Loop` (where batches come from, where epochs are
recorded): for each epoch it asks ``phase.epoch_step(epoch)`` for the per-batch function
(so a phase can change what a batch does, e.g. bit-meta only during the warm-up epochs),
runs it over the distributed train dataset with a tqdm bar, evaluates, prints one line,
writes TensorBoard scalars and saves a checkpoint
(``tf.train.CheckpointManager``: the model, the optimizers, the epoch counter and the
accumulated wall time). Run again, it restores the latest checkpoint of the phase and goes on
from the next epoch.

Data order: a ``tf.data`` pipeline that reshuffles each iteration draws new seeds each time
an iterator is created, from a seed generator shared by every iterator of that dataset
object. :class:`EpochIterators` therefore numbers the iterators of a run (slots); epoch
``e`` of a phase always gets slot ``offset + 1 + e`` (slot ``offset`` feeds the phase's
calibration batch), and a resumed run first creates and drops the iterators of the slots it
skips, so it sees exactly the batches an uninterrupted run sees.

Iterator release: every epoch and every evaluation iterates a new iterator, and with
``tf.data``'s model-based autotuning on, dropping an iterator can block for seconds (measured
by ``benchmarks/iterator_release.py``: up to 4.8 s for one iterator of the demo's pipeline, on
most epochs none); :func:`distribute_dataset` therefore turns autotuning off for datasets that
leave it unset (``AUTOTUNE`` parallel calls then stay at tf.data's starting value, one per
core up to 16; ``AUTOTUNE`` prefetch buffers still grow while the consumer waits).

Losses that are not finite stop the phase with :class:`NonFiniteLossError`; the checkpoint
of the last finished epoch stays the latest one.

About 400 lines, one idea (the epoch loop and its resume); the data-order slots stay here
because resume depends on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tqdm.auto import tqdm

__all__ = [
    "NonFiniteLossError",
    "profile_seconds",
    "EpochIterators",
    "distribute_dataset",
    "Hooks",
    "Loop",
    "Phase",
    "PhaseResult",
    "evaluate",
    "run_epochs",
    "write_scalar",
]


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the last good checkpoint is kept."""


def distribute_dataset(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    """``strategy.experimental_distribute_dataset(dataset)`` with ``tf.data``'s autotuning
    off unless ``dataset``'s options set it (module docstring: iterator release)."""
    if dataset.options().autotune.enabled is None:
        options = tf.data.Options()
        options.autotune.enabled = False
        dataset = dataset.with_options(options)
    return strategy.experimental_distribute_dataset(dataset)


class EpochIterators:
    """Numbered iterators of one distributed train dataset (see the module docstring).

    ``iterator(slot)`` creates (and drops) the iterators of the slots before ``slot`` that
    were not created yet, then returns the iterator of ``slot``. Slots only go forward.
    """

    def __init__(self, strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
        self.dataset = dataset
        self.distributed = distribute_dataset(strategy, dataset)
        self.created = 0

    def iterator(self, slot: int):
        if slot < self.created:
            raise ValueError(f"Iterator slot {slot} was already used (the next free slot is "
                             f"{self.created}); slots only go forward. Received: slot={slot}")
        while self.created < slot:
            iter(self.distributed)  # draws (and drops) this slot's shuffle seeds
            self.created += 1
        self.created += 1
        return iter(self.distributed)


@dataclasses.dataclass
class PhaseResult:
    """What one phase left: per-epoch history and the last epoch's metrics."""

    phase: str
    epochs: int
    history: list
    wall_time_s: float
    resumed_from_epoch: int = 0

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def profile_seconds(history: Sequence[dict]) -> dict:
    """Seconds per part of the epochs (see :class:`_Clock`), summed over a phase's history."""
    total: dict = {}
    for record in history:
        for part, seconds in record.get("profile_s", {}).items():
            total[part] = round(total.get(part, 0.0) + seconds, 2)
    return total


class _Clock:
    """Wall seconds of the named parts of one epoch: ``with clock("steps"): ...``.

    Parts: ``input`` (``next`` on the training iterator: what prefetching does not hide),
    ``steps`` (the step functions, tracing included, and reading their results), ``evaluation``
    (the eval pass and the hooks that add metrics), ``checkpoint`` (history file and
    checkpoint); ``other`` is the rest of the epoch (logs, progress bar, hooks)."""

    PARTS = ("input", "steps", "evaluation", "checkpoint")

    def __init__(self):
        self.totals = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def __call__(self, part: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.totals[part] += time.perf_counter() - began

    def seconds(self, elapsed: float) -> dict:
        """The parts and ``other = elapsed - sum(parts)``, rounded to 10 ms."""
        out = {part: round(value, 2) for part, value in self.totals.items()}
        out["other"] = round(max(elapsed - sum(self.totals.values()), 0.0), 2)
        return out


def evaluate(strategy: tf.distribute.Strategy, eval_fn: Callable, dataset) -> dict:
    """Runs ``eval_fn`` over a distributed eval dataset: ``{"val_loss", "val_acc"}``.

    A ``tf.function`` ``eval_fn`` is first traced for the dataset's element spec (batch size
    unknown), so that the last, partial batch does not trace it a second time."""
    spec = getattr(dataset, "element_spec", None)
    if spec is not None and hasattr(eval_fn, "get_concrete_function"):
        eval_fn.get_concrete_function(*spec)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for images, labels in dataset:
        out = eval_fn(images, labels)
        for key in totals:
            totals[key] += float(out[key])
    count = max(totals["count"], 1.0)
    return {"val_loss": totals["loss_sum"] / count, "val_acc": totals["correct"] / count}


def _epoch_metrics(totals: dict, last: dict) -> dict:
    """Per-epoch means from summed step outputs (``*loss_sum``/``*correct`` over counts)."""
    metrics = {}
    for key, value in totals.items():
        prefix = key[: -len("loss_sum")] if key.endswith("loss_sum") else None
        if prefix is not None:
            if prefix and not totals.get(prefix + "count", 0.0):
                continue  # a bit-meta candidate not drawn in this step
            count = max(totals.get(prefix + "count", 0.0), 1.0)
            metrics[prefix + "loss"] = value / count
            metrics[prefix + "acc"] = totals.get(prefix + "correct", 0.0) / count
    for key in ("gbops", "search_gbops", "penalty", "search_penalty"):
        if key in last:
            metrics[key] = last[key]
    # make_meta_step's per-candidate losses, grouped: {"meta_losses": {"2": ..., "4": ...}}
    per_bits = {key[len("meta"):-len("_loss")]: metrics.pop(key) for key in list(metrics)
                if re.fullmatch(r"meta\d+_loss", key)}
    for key in [k for k in metrics if re.fullmatch(r"meta\d+_acc", k)]:
        del metrics[key]
    if per_bits:
        metrics["meta_losses"] = per_bits
    return metrics


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


@dataclasses.dataclass
class Hooks:
    """Callables :func:`run_epochs` calls at fixed points of a phase (each optional).

    * ``on_fresh_start(iterator)``: before the first epoch of a phase that is not resumed,
      with the iterator of the phase's calibration slot (e.g. to calibrate on one batch);
    * ``before_epoch(epoch)``; ``before_eval(epoch)`` (e.g. select the argmax bits);
    * ``epoch_info(epoch) -> dict``: extra values for the epoch line and history (GBOPs, bits);
    * ``on_epoch_end(epoch, record)``: after the checkpoint is written;
    * ``should_stop() -> bool``: asked after each epoch (Keras' ``EarlyStopping``).
    """

    on_fresh_start: Callable | None = None
    before_epoch: Callable | None = None
    before_eval: Callable | None = None
    epoch_info: Callable | None = None
    on_epoch_end: Callable | None = None
    should_stop: Callable | None = None


@dataclasses.dataclass
class Phase:
    """What one phase trains: ``epoch_step(epoch) -> step(images, labels) -> dict`` of reduced
    step outputs (``loss_sum``, ``correct``, ``count``, optionally prefixed, ``gbops``...),
    the evaluation (a :func:`metamix_tf.training.steps.make_eval_step` function), the
    ``tf.train.Checkpoint`` of everything trained, and its :class:`Hooks`."""

    name: str
    epochs: int
    epoch_step: Callable[[int], Callable]
    eval_fn: Callable
    checkpoint: tf.train.Checkpoint
    hooks: Sequence[Hooks] = ()


@dataclasses.dataclass
class Loop:
    """Where a phase's batches come from and where its epochs are recorded.

    Epoch ``e`` uses iterator slot ``slot_offset + 1 + e`` of ``iterators`` (slot
    ``slot_offset`` feeds ``on_fresh_start``). ``eval_dataset=None`` skips the evaluation;
    ``checkpoint_dir=None``: no checkpoints, no history file and no resume (the library API
    without a run directory); ``on_epoch_end(epoch, record)`` is the run's own hook.
    """

    strategy: tf.distribute.Strategy
    iterators: EpochIterators
    steps_per_epoch: int
    eval_dataset: object = None  # a distributed dataset, or None
    slot_offset: int = 0
    checkpoint_dir: str | None = None
    log_dir: str | None = None
    jit_compile: bool = False
    verbose: bool = True
    on_epoch_end: Callable | None = None
    max_to_keep: int = 2

    def say(self, message: str) -> None:
        _say(self.verbose, message)


def _call(hooks: Sequence[Hooks], name: str, *args) -> list:
    return [getattr(h, name)(*args) for h in hooks if getattr(h, name) is not None]


def run_epochs(phase: Phase, loop: Loop) -> PhaseResult:
    """Trains ``phase`` for ``phase.epochs`` epochs on ``loop``, resuming from its latest
    checkpoint; adds the ``epoch`` counter and ``wall_time`` to ``phase.checkpoint``."""
    if tf.distribute.has_strategy():
        raise ValueError("Call run_epochs outside `strategy.scope()` (its counters are plain "
                         "variables). Received: strategy scope active")
    name, epochs, steps_per_epoch = phase.name, phase.epochs, loop.steps_per_epoch
    hooks = [*phase.hooks, Hooks(on_epoch_end=loop.on_epoch_end)]
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    wall_var = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="wall_time")
    checkpoint = phase.checkpoint
    checkpoint.epoch = epoch_var
    checkpoint.wall_time = wall_var
    checkpoint_dir = loop.checkpoint_dir
    manager = None if checkpoint_dir is None else tf.train.CheckpointManager(
        checkpoint, checkpoint_dir, max_to_keep=loop.max_to_keep)
    history_path = None if checkpoint_dir is None else os.path.join(checkpoint_dir,
                                                                     "history.json")
    start, history = 0, []
    if manager is not None and manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        start = int(epoch_var.numpy())
        if os.path.exists(history_path):
            with open(history_path) as f:
                history = json.load(f)[:start]
        loop.say(f"[{name}] resuming from {manager.latest_checkpoint} "
                 f"(epoch {start}/{epochs} done)")
    iterator0 = loop.iterators.iterator(loop.slot_offset)
    if start == 0:
        _call(hooks, "on_fresh_start", iterator0)
    del iterator0
    board = _Board(loop.log_dir, name) if loop.log_dir else None
    for epoch in range(start, epochs):
        began = time.time()
        clock = _Clock()
        _call(hooks, "before_epoch", epoch)
        step = phase.epoch_step(epoch)
        iterator = loop.iterators.iterator(loop.slot_offset + 1 + epoch)
        totals: dict = {}
        last: dict = {}
        bar = tqdm(total=steps_per_epoch, desc=f"{name} {epoch + 1}/{epochs}", leave=False,
                   disable=None if loop.verbose else True, file=sys.stderr, dynamic_ncols=True)
        for index in range(steps_per_epoch):
            with clock("input"):
                try:
                    images, labels = next(iterator)
                except StopIteration:
                    break
            with clock("steps"):
                out = {key: float(value) for key, value in step(images, labels).items()}
            bad = [key for key, value in out.items() if "loss" in key and not math.isfinite(value)]
            if bad:
                bar.close()
                kept = (manager and manager.latest_checkpoint) or "none yet"
                raise NonFiniteLossError(
                    f"Non-finite loss in phase '{name}' at epoch {epoch + 1}, step {index + 1} "
                    f"({', '.join(f'{k}={out[k]}' for k in bad)}); stopped. The last good "
                    f"checkpoint is kept: {kept}. Lower the learning rate or check the data.")
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + value
            if board is not None:
                board.step(epoch * steps_per_epoch + index + 1, _epoch_metrics(out, out))
            last = out
            count = max(out.get("count", 1.0), 1.0)
            bar.set_postfix(loss=f"{out.get('loss_sum', 0.0) / count:.3f}", refresh=False)
            bar.update(1)
        bar.close()
        metrics = _epoch_metrics(totals, last)
        with clock("evaluation"):
            _call(hooks, "before_eval", epoch)
            if loop.eval_dataset is not None:
                metrics.update(evaluate(loop.strategy, phase.eval_fn, loop.eval_dataset))
            for info in _call(hooks, "epoch_info", epoch):
                metrics.update(info)
        elapsed = time.time() - began
        wall_var.assign_add(elapsed)
        record = {"epoch": epoch + 1, **metrics, "time_s": round(elapsed, 2)}
        history.append(record)
        epoch_var.assign(epoch + 1)
        if manager is not None:
            with clock("checkpoint"):
                os.makedirs(checkpoint_dir, exist_ok=True)
                with open(history_path, "w") as f:  # before the checkpoint; resume truncates
                    json.dump(history, f, indent=1)
                manager.save(checkpoint_number=epoch + 1)
        record["profile_s"] = clock.seconds(time.time() - began)
        if board is not None:
            board.epoch(epoch + 1, metrics)
        loop.say(_epoch_line(name, epoch, epochs, record))
        _call(hooks, "on_epoch_end", epoch, record)
        if any(_call(hooks, "should_stop")):
            loop.say(f"[{name}] stopped after epoch {epoch + 1} (a callback asked)")
            break
    if board is not None:
        board.close()
    return PhaseResult(phase=name, epochs=epochs, history=history,
                       wall_time_s=float(wall_var.numpy()), resumed_from_epoch=start)


class _Board:
    """TensorBoard logs of one phase, laid out as Keras' callback lays them out.

    ``<log_dir>/train`` and ``<log_dir>/validation`` hold the same tags, ``<phase>/loss`` and
    ``<phase>/acc`` (``val_loss`` is written as ``loss`` in ``validation``), so the two curves
    overlay in one chart; the other epoch values (GBOPs, penalty, per-candidate bit-meta losses
    under ``<phase>_meta_losses/<bits>``) go to ``train``. Every step also writes its own
    values under ``<phase>_step/...`` in ``train`` (x axis: the phase's global step), so a
    search's GBOPs, penalty and meta losses can be followed within an epoch.
    """

    def __init__(self, log_dir: str, phase: str):
        self.phase = phase
        self.train = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self.validation = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))

    def step(self, step: int, values: dict) -> None:
        with self.train.as_default():
            _write_all(f"{self.phase}_step", values, step)

    def epoch(self, epoch: int, metrics: dict) -> None:
        train = {k: v for k, v in metrics.items() if not k.startswith("val_")}
        validation = {k[len("val_"):]: v for k, v in metrics.items() if k.startswith("val_")}
        for writer, values in ((self.train, train), (self.validation, validation)):
            with writer.as_default():
                _write_all(self.phase, values, epoch)
            writer.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def _write_all(tag: str, values: dict, step: int) -> None:
    """``values``' numbers as ``<tag>/<key>``, a nested dict ``key`` as ``<tag>_<key>/<name>``."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            write_scalar(f"{tag}/{key}", value, step)
        elif isinstance(value, dict):
            for name, v in value.items():
                write_scalar(f"{tag}_{key}/{name}", float(v), step)


def write_scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar through the default summary writer, without needing the
    ``tensorboard`` package (the event has the scalars plugin's metadata, as
    ``tf.summary.scalar`` writes it)."""
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step, metadata=metadata)


def _epoch_line(phase: str, epoch: int, epochs: int, record: dict) -> str:
    parts = [f"[{phase}] epoch {epoch + 1}/{epochs}"]
    for key, value in record.items():
        if key in ("epoch", "bits"):
            continue
        if isinstance(value, dict):
            continue
        parts.append(f"{key} {_format(value)}")
    line = "  ".join(parts)
    if isinstance(record.get("bits"), dict):
        line += "\n    bits: " + " ".join(str(b) for b in record["bits"].values())
    return line


def _say(verbose: bool, message: str) -> None:
    if verbose:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


