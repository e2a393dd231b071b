"""The phases of a MetaMix run, in sequence, with a run directory that lets them resume.

``run(config, phase)`` with ``phase`` one of ``"pretrain"``, ``"search"``, ``"finetune"``,
``"all"``. The run directory (``config.model_dir``) holds:

* ``config.yaml``: the resolved config;
* ``float.keras``: the float model (after pre-training, or built from ``model.weights``);
* ``ckpt/<phase>/``: ``tf.train.CheckpointManager`` checkpoints, one per epoch, and
  ``history.json``;
* ``search.keras``: the wrapped model after bit selection, quantizers in ``"selected"`` mode
  at the chosen bits, weight quantization off;
* ``bits.json``: ``{"searcher", "bits": {layer: a_bits}, "gbops", "target_gbops",
  "avg_activation_bits", "report"}`` (the report is :meth:`CostModel.report`);
* ``bits.png``: the selected activation bits per layer beside each layer's MACs;
* ``final.keras``: the wrapped model after weight training, ``"selected"`` mode, weight
  quantization on (what the exporter loads);
* ``summary.json``: accuracy per phase, GBOPs, average bits, wall time per phase, machine.
  ``float_val_acc``: the float model; ``search_val_acc``: the searched bits with float
  weights and the BatchNorm statistics bit-meta training left (an average over the
  candidate bit-widths, so below what weight training reaches); ``final_val_acc``: after
  weight training with quantized weights. ``wall_time_s`` per phase sums its epochs
  (tracing included) over every process that ran them;
* ``<phase>.done``: the phase's results; ``"all"`` skips phases that have one;
* ``<phase>.settings.json``: the settings the phase was run with (``metamix_tf.run_state``:
  a rerun with other settings refuses, or with ``overwrite=True`` redoes the changed phases
  and those after them);
* ``logs/<phase>/{train,validation}/``: TensorBoard scalars (:class:`trainer._Board`).

Searchers (``config.search.searcher``): ``"metamix"`` (per iteration a bit-meta step then a
bit-search step, bit-meta only during the warm-up epochs), ``"joint"`` (EdMIPS/DNAS: weights
and alphas stepped together on the mixture) and ``"none"`` (uniform LSQ: every searchable
layer at ``search.uniform_bits``, weights and step sizes trained for the same epochs).

About 460 lines: the three phases and the run they make up (checks in
:mod:`metamix_tf.run_checks`, files in :mod:`metamix_tf.run_files`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from metamix_tf import api, models, run_checks, run_files, run_state
from metamix_tf import config as config_lib
from metamix_tf import data as data_lib
from metamix_tf.cli import default_model_dir
from metamix_tf.config import ExperimentConfig
from metamix_tf.quant import wrap
from metamix_tf.quant.cost import CostModel
from metamix_tf.training import distribute, optimizers, searchers, steps, trainer
from metamix_tf.training import loop as loop_lib

__all__ = [
    "PHASES",
    "format_profile",
    "run",
    "default_model_dir",
    "RunContext",
]

PHASES = run_checks.PHASES
_ALL = run_checks.ALL


@dataclasses.dataclass
class RunContext:
    """What every phase of one run shares."""

    config: ExperimentConfig
    strategy: tf.distribute.Strategy
    data: data_lib.Datasets
    model_dir: str
    iterators: trainer.EpochIterators
    eval_dataset: object
    steps_per_epoch: int
    jit_compile: bool
    model_fn: Callable | None
    verbose: bool
    on_epoch_end: Callable | None
    # file name -> the model this process saved there, handed to the phase that reads it
    saved: dict = dataclasses.field(default_factory=dict)

    def path(self, *parts) -> str:
        return os.path.join(self.model_dir, *parts)

    def save_model(self, model, name: str) -> None:
        """Saves ``model`` as ``name`` in the run directory and keeps it for :meth:`load_model`."""
        run_files.save_model(model, self.path(name))
        self.saved[name] = model

    def load_model(self, name: str, what: str, hint: str):
        """The model saved as ``name``: the one this process saved there (a phase run after
        the one that saved it: what loading its file would give, without the seconds of
        deserialization), else read from the file."""
        model = self.saved.pop(name, None)
        return model if model is not None else run_files.load_model(self.path(name), what, hint)

    def say(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _build_float(config, input_shape, num_classes, model_fn=None, weights=None):
    if model_fn is not None:
        model = model_fn(input_shape, num_classes)
        if weights:
            model.load_weights(weights)
        if config.model.bn_momentum is not None:
            models.set_bn_momentum(model, config.model.bn_momentum)
        return model
    m = config.model
    return models.build(m.name, input_shape, num_classes, weights=weights,
                        bn_momentum=m.bn_momentum, dropout=m.dropout)


def _teacher(ctx: RunContext, teacher: str | None):
    if teacher is None:
        return None
    path = ctx.path("float.keras") if teacher == "self" else teacher
    model = run_files.load_model(path, "Teacher model",
                                 "run the pretrain phase first or pass a .keras file")
    out = model.output_shape[-1]
    if out != ctx.data.num_classes:
        raise ValueError(f"The teacher {path} has {out} outputs but the data has "
                         f"{ctx.data.num_classes} classes. Received: teacher={teacher!r}")
    return model


def _no_decay(variables) -> list:
    return [v for v in variables if len(v.shape) <= 1]


# ---------------------------------------------------------------------------------------------
# Run-directory bookkeeping
# ---------------------------------------------------------------------------------------------


def _done_path(ctx: RunContext, phase: str) -> str:
    return ctx.path(f"{phase}.done")


def _slot_offsets(config: ExperimentConfig) -> dict:
    """Iterator slots per phase (1 calibration slot + one per epoch), fixed by the config so
    a phase sees the same batches whether or not the earlier phases ran in this process."""
    pretrain = 0
    search = pretrain + 1 + config.pretrain.epochs
    finetune = search + 1 + config.search.epochs
    return {"pretrain": pretrain, "search": search, "finetune": finetune}


def _hook(ctx: RunContext, phase: str):
    if ctx.on_epoch_end is None:
        return None
    return lambda epoch, record: ctx.on_epoch_end(phase, epoch, record)


def _evaluate(ctx: RunContext, model, configure=None) -> dict:
    fn = steps.make_eval_step(ctx.strategy, model, configure=configure, jit_compile=ctx.jit_compile)
    return trainer.evaluate(ctx.strategy, fn, ctx.eval_dataset)


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def _pretrain(ctx: RunContext) -> dict:
    config, strategy = ctx.config, ctx.strategy
    p = config.pretrain
    shape, classes = ctx.data.image_shape, ctx.data.num_classes
    if config.model.weights:
        with strategy.scope():
            model = _build_float(config, shape, classes, ctx.model_fn, config.model.weights)
        metrics = _evaluate(ctx, model)
        ctx.say(f"[pretrain] skipped: float weights from {config.model.weights}, "
                f"val_acc {metrics['val_acc']:.4f}")
        ctx.save_model(model, "float.keras")
        return {"skipped": True, "weights": config.model.weights, **metrics,
                "wall_time_s": 0.0, "epochs": 0}
    with strategy.scope():
        model = _build_float(config, shape, classes, ctx.model_fn)
        distribute.sync_batch_norm(model, strategy.num_replicas_in_sync > 1)
        variables = list(model.trainable_variables)
        optimizer = optimizers.make_optimizer(
            optimizers.cosine_schedule(p.learning_rate, p.epochs * ctx.steps_per_epoch),
            variables, weight_decay=p.weight_decay, no_decay=_no_decay(variables))
    step = steps.make_train_step(strategy, model, optimizer, variables,
                                 label_smoothing=p.label_smoothing, jit_compile=ctx.jit_compile)
    eval_fn = steps.make_eval_step(strategy, model, jit_compile=ctx.jit_compile)
    ctx.say(f"[pretrain] float training: {p.epochs} epoch(s) x {ctx.steps_per_epoch} steps")
    phase = trainer.Phase("pretrain", p.epochs, epoch_step=lambda epoch: step, eval_fn=eval_fn,
                          checkpoint=tf.train.Checkpoint(model=model, optimizer=optimizer))
    result = trainer.run_epochs(phase, _loop(ctx, "pretrain"))
    metrics = result.last if result.history else _evaluate(ctx, model)
    ctx.save_model(model, "float.keras")
    return {"skipped": False, "val_acc": metrics["val_acc"], "val_loss": metrics["val_loss"],
            "wall_time_s": result.wall_time_s, "epochs": p.epochs, "history": result.history}


def _loop(ctx: RunContext, phase: str) -> trainer.Loop:
    """The run's loop for ``phase``: its iterator slots, checkpoints and logs."""
    return trainer.Loop(strategy=ctx.strategy, iterators=ctx.iterators,
                        steps_per_epoch=ctx.steps_per_epoch, eval_dataset=ctx.eval_dataset,
                        slot_offset=_slot_offsets(ctx.config)[phase],
                        checkpoint_dir=ctx.path("ckpt", phase), log_dir=ctx.path("logs", phase),
                        jit_compile=ctx.jit_compile, verbose=ctx.verbose,
                        on_epoch_end=_hook(ctx, phase))


def _searcher(config: ExperimentConfig) -> searchers.Searcher:
    s = config.search
    name = "uniform" if s.searcher == "none" else s.searcher
    return searchers.get_searcher(name, warmup_epochs=s.warmup_epochs,
                                  uniform_bits=s.uniform_bits, meta_batch=s.meta_batch,
                                  meta_candidates=s.meta_candidates, seed=config.seed)


def _search(ctx: RunContext) -> dict:
    config, strategy = ctx.config, ctx.strategy
    s = config.search
    float_model = ctx.load_model("float.keras", "Float model",
                                 "run --phase=pretrain first, or pass --weights")
    with strategy.scope():
        model = wrap.apply(float_model, run_checks.quant_config(config))
        teacher = _teacher(ctx, s.teacher)
    del float_model
    searched = s.searcher != "none"
    result = api.run_search(
        model, _loop(ctx, "search"), _searcher(config), epochs=s.epochs, options=s,
        target_gbops=s.target_gbops if searched else None,
        target_avg_bits=s.target_avg_bits if searched and s.target_gbops is None else None,
        teacher=teacher)
    record = {**result.record(), "searcher": s.searcher}
    run_files.write_json(ctx.path("bits.json"), record)
    report = result.report
    run_files.plot_bits(report, ctx.path("bits.png"),
              title=f"{config.model.name} {s.searcher}: {report['gbops']:.4f} GBOPs "
                    f"(target {result.target_gbops:.4f}), "
                    f"avg {report['avg_activation_bits']:.2f} bits")
    ctx.say(CostModel(model).format_report(result.bits))
    ctx.save_model(model, "search.keras")
    return {"searcher": s.searcher, "val_acc": result.val_acc, "val_loss": result.val_loss,
            "gbops": result.gbops, "target_gbops": result.target_gbops,
            "avg_activation_bits": result.avg_activation_bits,
            "mac_weighted_activation_bits": result.mac_weighted_activation_bits,
            "wall_time_s": result.wall_time_s, "epochs": s.epochs, "history": result.history}


def _finetune(ctx: RunContext) -> dict:
    config, strategy = ctx.config, ctx.strategy
    f = config.finetune
    bits_path = ctx.path("bits.json")
    if not os.path.exists(bits_path):
        raise FileNotFoundError(f"Selected bits not found: {bits_path}; run --phase=search "
                                "first.")
    bits = run_files.read_json(bits_path)["bits"]
    with strategy.scope():
        model = ctx.load_model("search.keras", "Searched model", "run --phase=search first")
        teacher = _teacher(ctx, f.teacher)
    final = ctx.path("final.keras")
    # The trained weights first: a failure in the post-processing (bias snap) must not
    # cost them; saved again after it.
    result = api.run_finetune(model, _loop(ctx, "finetune"), epochs=f.epochs, options=f,
                              bits=bits, teacher=teacher,
                              on_trained=lambda trained: run_files.save_model(trained, final))
    run_files.save_model(model, final)
    return {"val_acc": result.val_acc, "val_loss": result.val_loss,
            "bias_snap": result.bias_snap, "gbops": result.gbops,
            "avg_activation_bits": result.avg_activation_bits,
            "wall_time_s": result.wall_time_s, "epochs": f.epochs, "history": result.history}


_PHASE_FNS = {"pretrain": _pretrain, "search": _search, "finetune": _finetune}


# ---------------------------------------------------------------------------------------------
# Summary and plot
# ---------------------------------------------------------------------------------------------


def _profile(result: dict) -> dict:
    """Where a phase's time went: its epochs' parts (``trainer.profile_seconds``) and
    ``outside_epochs``, the rest of the phase in this process (model loading, wrapping,
    tracing outside the loop, saving, plots, the bias snap)."""
    profile = trainer.profile_seconds(result.get("history", []))
    if "phase_seconds_this_process" in result:  # the parts add up to the epochs
        profile["outside_epochs"] = round(
            max(result["phase_seconds_this_process"] - sum(profile.values()), 0.0), 2)
    return profile


def format_profile(summary: dict) -> str:
    """One line per phase of ``summary["phases"]``: its seconds per part (see
    :func:`_profile`)."""
    lines = []
    for phase, r in summary.get("phases", {}).items():
        parts = "  ".join(f"{part} {seconds:.0f}" for part, seconds in
                          r.get("profile_s", {}).items())
        lines.append(f"[{phase}] {r.get('phase_seconds_this_process', 0.0):.0f} s in this "
                     f"process: {parts or '-'}")
    return "\n".join(lines)


def _summary(ctx: RunContext, results: dict) -> dict:
    config = ctx.config
    summary = {
        "model": config.model.name,
        "dataset": ctx.data.name,
        "searcher": config.search.searcher,
        "train_size": ctx.data.train_size,
        "eval_size": ctx.data.eval_size,
        "image_shape": list(ctx.data.image_shape),
        "machine": run_files.machine(ctx.strategy),
        "phases": {},
    }
    total = 0.0
    for phase in PHASES:
        r = results.get(phase)
        if r is None:
            continue
        summary["phases"][phase] = {k: v for k, v in r.items() if k != "history"}
        summary["phases"][phase]["profile_s"] = _profile(r)
        total += r.get("wall_time_s", 0.0)
    summary["wall_time_s"] = {p: r.get("wall_time_s", 0.0) for p, r in results.items()}
    summary["total_wall_time_s"] = total
    if "pretrain" in results:
        summary["float_val_acc"] = results["pretrain"]["val_acc"]
    if "search" in results:
        summary["search_val_acc"] = results["search"]["val_acc"]
        summary["target_gbops"] = results["search"]["target_gbops"]
        summary["gbops"] = results["search"]["gbops"]
        summary["avg_activation_bits"] = results["search"]["avg_activation_bits"]
        summary["mac_weighted_activation_bits"] = results["search"].get(
            "mac_weighted_activation_bits")
    if "finetune" in results:
        summary["final_val_acc"] = results["finetune"]["val_acc"]
        summary["gbops"] = results["finetune"]["gbops"]
        summary["avg_activation_bits"] = results["finetune"]["avg_activation_bits"]
        if "float_val_acc" in summary:
            summary["accuracy_drop"] = summary["float_val_acc"] - summary["final_val_acc"]
    return summary


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _check_target_early(config: ExperimentConfig, model_fn, image_shape, num_classes) -> None:
    """Builds the wrapped model once (outside any strategy) to check the GBOPs target before
    spending time on pre-training."""
    s = config.search
    if s.searcher == "none":
        return
    if s.target_gbops is None:  # uniform GBOPs at bits within the candidates' range are
        run_checks.check_avg_bits(config)  # always within the GBOPs bounds: no model needed
        return
    model = wrap.apply(_build_float(config, image_shape, num_classes, model_fn),
                       run_checks.quant_config(config))
    run_checks.resolve_target(config, CostModel(model))


def _model_fn(model: keras.Model) -> Callable:
    """``model_fn`` for a user's float model: a copy with its weights (built under the
    run's strategy scope), checked against the data's classes."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model. Received: model={model!r}")

    def build(input_shape, num_classes):
        if model.output_shape[-1] != num_classes:
            raise ValueError(f"`model` has {model.output_shape[-1]} outputs but the data has "
                             f"{num_classes} classes. Received: model={model.name!r}")
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        return copy

    return build


def _user_datasets(datasets, config: ExperimentConfig, model) -> data_lib.Datasets:
    """``datasets``: a :class:`metamix_tf.data.Datasets`, or ``(train, eval)`` in the forms
    :func:`metamix_tf.search` takes (batched with ``config.data``'s batch sizes)."""
    if isinstance(datasets, data_lib.Datasets):
        return datasets
    if not isinstance(datasets, (tuple, list)) or len(datasets) != 2:
        raise ValueError("`datasets` must be a metamix_tf.data.Datasets or a (train, eval) "
                         f"pair. Received: datasets={type(datasets).__name__}")
    d = config.data
    train = loop_lib.as_dataset(datasets[0], "datasets[0]", batch_size=d.batch_size, shuffle=True,
                           seed=d.seed)
    evaluation = loop_lib.as_dataset(datasets[1], "datasets[1]", batch_size=d.eval_batch_size,
                                shuffle=False)
    train_batches, eval_batches = int(train.cardinality()), int(evaluation.cardinality())
    if train_batches <= 0 or eval_batches <= 0:
        raise ValueError("`datasets` must have a known, finite length. Received: "
                         f"cardinality={train_batches}, {eval_batches}")
    labels = 1 + max(int(tf.reduce_max(y)) for _, y in evaluation.concatenate(train))
    classes = labels if model is None else int(model.output_shape[-1])
    if labels > classes:
        raise ValueError(f"`datasets` has labels up to {labels - 1} but `model` has {classes} "
                         f"outputs. Received: max label={labels - 1}")
    return data_lib.Datasets(
        train=train, eval=evaluation, num_classes=classes,
        train_size=train_batches * d.batch_size, eval_size=eval_batches * d.eval_batch_size,
        image_shape=tuple(int(n) for n in train.element_spec[0].shape[1:]),
        class_names=[str(i) for i in range(classes)], name="user data")


def run(config: ExperimentConfig, phase: str = _ALL, *, model: keras.Model | None = None,
        datasets=None, strategy: tf.distribute.Strategy | None = None,
        model_fn: Callable | None = None, verbose: bool = True,
        on_epoch_end: Callable | None = None, overwrite: bool = False) -> dict:
    """Runs ``phase`` (or all phases in order, skipping finished ones) in
    ``config.model_dir``; returns the summary (also written to ``summary.json``).

    Args:
      config: the resolved experiment config.
      phase: ``"pretrain"``, ``"search"``, ``"finetune"`` or ``"all"``.
      strategy: default :func:`metamix_tf.training.distribute.get_strategy`.
      model: a user's float Keras model (nested backbones allowed) to use instead of
        ``models.build(config.model.name, ...)``; trained by the pretrain phase from its
        current weights (``pretrain.epochs=0`` keeps them). ``config.model.name`` then only
        names the run.
      datasets: a :class:`metamix_tf.data.Datasets` or a ``(train, eval)`` pair of
        ``tf.data`` datasets of ``(images, labels)`` batches or ``(x, y)`` arrays, used
        instead of ``config.data.dataset`` (no preprocessing is added).
      model_fn: ``(input_shape, num_classes) -> keras.Model``, the same as ``model`` for a
        model that is built on demand (tests use a tiny network).
      on_epoch_end: ``(phase, epoch, record) -> None`` after each epoch's checkpoint.
      overwrite: redo the phases whose results were made with other settings (and those
        after them) instead of refusing (:func:`metamix_tf.run_state.stale_phases`).
    """
    if model is not None:
        if model_fn is not None:
            raise ValueError("Give `model` or `model_fn`, not both. "
                             f"Received: model={model.name!r}, model_fn={model_fn!r}")
        model_fn = _model_fn(model)
    run_checks.check(config, phase, model_fn)
    strategy = strategy or distribute.get_strategy()
    # With several workers, only the chief writes config.model_dir; the others a copy.
    with distribute.worker_dir(strategy, config.model_dir) as model_dir:
        return _run(dataclasses.replace(config, model_dir=model_dir), phase, strategy,
                    model_fn, verbose, on_epoch_end, overwrite, model, datasets)


def _run(config, phase, strategy, model_fn, verbose, on_epoch_end, overwrite, model,
         datasets) -> dict:
    """:func:`run` in the directory this process writes (``config.model_dir``)."""
    stale = run_state.stale_phases(config, overwrite=overwrite)
    jit = distribute.has_gpu() if config.jit_compile is None else bool(config.jit_compile)
    keras.utils.set_random_seed(config.seed)
    m = config.model
    if datasets is not None:
        data = _user_datasets(datasets, config, model)
    else:
        preprocess = None if model_fn is not None else models.preprocess_input(m.name)
        data = data_lib.load(config.data, image_size=m.input_size, preprocess=preprocess)
    steps_per_epoch = data.train_size // config.data.batch_size
    if phase in (_ALL, "search") and ("search" in stale or not os.path.exists(
            os.path.join(config.model_dir, "search.done"))):
        _check_target_early(config, model_fn, data.image_shape, data.num_classes)
    os.makedirs(config.model_dir, exist_ok=True)
    run_state.clear(config.model_dir, stale)
    config_lib.save(config, os.path.join(config.model_dir, "config.yaml"))
    ctx = RunContext(
        config=config, strategy=strategy, data=data, model_dir=config.model_dir,
        iterators=trainer.EpochIterators(strategy, data.train),
        eval_dataset=trainer.distribute_dataset(strategy, data.eval),
        steps_per_epoch=steps_per_epoch, jit_compile=jit, model_fn=model_fn,
        verbose=verbose, on_epoch_end=on_epoch_end)
    ctx.say(f"Run directory {config.model_dir}: {m.name} on {data.name}, "
            f"{data.train_size} train / {data.eval_size} eval images "
            f"{'x'.join(map(str, data.image_shape))}, {distribute.describe(strategy)}, "
            f"jit_compile={jit}")
    results = {}
    for name in PHASES:
        if os.path.exists(_done_path(ctx, name)):
            results[name] = run_files.read_json(_done_path(ctx, name))
    todo = PHASES if phase == _ALL else (phase,)
    for name in todo:
        if phase == _ALL and name in results:
            ctx.say(f"[{name}] already done ({_done_path(ctx, name)}); skipped")
            continue
        began = time.time()
        run_state.record(config, name, ctx.model_dir)
        result = _PHASE_FNS[name](ctx)
        result["phase_seconds_this_process"] = round(time.time() - began, 2)
        run_files.write_json(_done_path(ctx, name), result)
        results[name] = result
        run_files.write_json(ctx.path("summary.json"), _summary(ctx, results))
    summary = _summary(ctx, results)
    run_files.write_json(ctx.path("summary.json"), summary)
    return summary
