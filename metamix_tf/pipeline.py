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
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
import types
import typing
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from metamix_tf import api, models, run_state
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
    "run",
    "resolve_target",
    "default_model_dir",
    "plot_bits",
    "RunContext",
]

PHASES = ("pretrain", "search", "finetune")
_ALL = "all"


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

    def path(self, *parts) -> str:
        return os.path.join(self.model_dir, *parts)

    def say(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_numbers(section, prefix: str) -> None:
    """Numeric fields must hold numbers (YAML 1.1 reads ``5e-4`` without a dot as a string)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, f"{prefix}{f.name}.")
            continue
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        if origin is None:
            kinds = (hint,)
        elif origin in (typing.Union, types.UnionType):
            kinds = typing.get_args(hint)
        else:  # containers (candidate bits, layer names): left to their own checks
            continue
        numeric = any(k in (int, float) for k in kinds)
        if numeric and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(
                f"`{prefix}{f.name}` must be a number (in YAML write 5.0e-4, not 5e-4, which "
                f"YAML reads as a string). Received: {prefix}{f.name}={value!r}")


def _check(config: ExperimentConfig, phase: str, model_fn) -> None:
    _check_numbers(config, "")
    if phase not in PHASES + (_ALL,):
        raise ValueError(f"`phase` must be one of {PHASES + (_ALL,)}. Received: phase={phase!r}")
    if model_fn is None and config.model.name not in models.MODEL_NAMES:
        raise ValueError(f"Unknown model name; expected one of {models.MODEL_NAMES}. "
                         f"Received: model={config.model.name!r}")
    s = config.search
    for section, name in ((config.pretrain, "pretrain"), (s, "search"),
                          (config.finetune, "finetune")):
        if not isinstance(section.epochs, int) or section.epochs < 0:
            raise ValueError(f"`{name}.epochs` must be an integer >= 0. "
                             f"Received: {name}.epochs={section.epochs!r}")
    if s.searcher != "none" and s.epochs < 1:
        raise ValueError(f"The '{s.searcher}' searcher needs `search.epochs` >= 1 to learn the "
                         f"bit logits. Received: search.epochs={s.epochs}")
    if s.warmup_epochs < 0:
        raise ValueError(f"`search.warmup_epochs` must be >= 0. "
                         f"Received: search.warmup_epochs={s.warmup_epochs}")
    if s.target_gbops is None and s.target_avg_bits is None and s.searcher != "none":
        raise ValueError("Give the GBOPs target as `search.target_gbops` or "
                         "`search.target_avg_bits`. Received: both None")
    if s.target_gbops is not None and not s.target_gbops > 0:
        raise ValueError(f"`search.target_gbops` must be > 0. "
                         f"Received: target_gbops={s.target_gbops}")
    for section, name in ((s, "search"), (config.finetune, "finetune")):
        teacher = section.teacher
        if teacher not in (None, "self") and not os.path.exists(str(teacher)):
            raise FileNotFoundError(f"Teacher model file not found: {teacher}. Use 'self' (the "
                                    f"float model) or a .keras file. "
                                    f"Received: {name}.teacher={teacher!r}")


def _quant_config(config: ExperimentConfig) -> config_lib.QuantConfig:
    """The quantization config; uniform LSQ adds its bit-width to the candidates if needed."""
    quant = config.quant
    if config.search.searcher == "none" and config.search.uniform_bits not in quant.candidate_bits:
        quant = dataclasses.replace(
            quant, candidate_bits=tuple(sorted({*quant.candidate_bits,
                                                config.search.uniform_bits})))
    return quant


def _check_avg_bits(config: ExperimentConfig) -> None:
    bits = config.search.target_avg_bits
    low, high = min(config.quant.candidate_bits), max(config.quant.candidate_bits)
    if not low <= bits <= high:
        raise ValueError(f"The average activation bit-width target {bits} is outside the "
                         f"candidate bits [{low}, {high}]. Received: target_avg_bits={bits}")


def resolve_target(config: ExperimentConfig, cost: CostModel) -> float:
    """The GBOPs target: ``search.target_gbops`` if set, else every searchable layer at
    ``search.target_avg_bits``; checked against what the candidate bits allow."""
    s = config.search
    if s.target_gbops is not None:
        target = float(s.target_gbops)
    elif s.target_avg_bits is not None:
        _check_avg_bits(config)
        target = cost.uniform_gbops(float(s.target_avg_bits))
    else:
        target = cost.uniform_gbops(float(s.uniform_bits))
    return cost.check_target(target)


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


def _load(path: str, what: str, hint: str) -> keras.Model:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}; {hint}.")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # a truncated or foreign file: zip, h5 and Keras errors alike
        raise ValueError(f"{what} {path} is not a readable Keras model "
                         f"({type(error).__name__}); {hint}. Received: path={path!r}") from None


def _save(model, path: str) -> None:
    """Saves ``model`` with BatchNorm un-synchronised (a plain single-device model)."""
    distribute.sync_batch_norm(model, False)
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def _teacher(ctx: RunContext, teacher: str | None):
    if teacher is None:
        return None
    path = ctx.path("float.keras") if teacher == "self" else teacher
    model = _load(path, "Teacher model", "run the pretrain phase first or pass a .keras file")
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


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
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


def _machine(strategy) -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_logical_devices("GPU")],
        "strategy": distribute.describe(strategy),
    }


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
        _save(model, ctx.path("float.keras"))
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
    _save(model, ctx.path("float.keras"))
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
                                  uniform_bits=s.uniform_bits)


def _search(ctx: RunContext) -> dict:
    config, strategy = ctx.config, ctx.strategy
    s = config.search
    float_model = _load(ctx.path("float.keras"), "Float model",
                        "run --phase=pretrain first, or pass --weights")
    with strategy.scope():
        model = wrap.apply(float_model, _quant_config(config))
        teacher = _teacher(ctx, s.teacher)
    del float_model
    searched = s.searcher != "none"
    result = api.run_search(
        model, _loop(ctx, "search"), _searcher(config), epochs=s.epochs, options=s,
        target_gbops=s.target_gbops if searched else None,
        target_avg_bits=s.target_avg_bits if searched and s.target_gbops is None else None,
        teacher=teacher)
    record = {**result.record(), "searcher": s.searcher}
    _write_json(ctx.path("bits.json"), record)
    report = result.report
    plot_bits(report, ctx.path("bits.png"),
              title=f"{config.model.name} {s.searcher}: {report['gbops']:.4f} GBOPs "
                    f"(target {result.target_gbops:.4f}), "
                    f"avg {report['avg_activation_bits']:.2f} bits")
    ctx.say(CostModel(model).format_report(result.bits))
    _save(model, ctx.path("search.keras"))
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
    bits = _read_json(bits_path)["bits"]
    with strategy.scope():
        model = _load(ctx.path("search.keras"), "Searched model", "run --phase=search first")
        teacher = _teacher(ctx, f.teacher)
    final = ctx.path("final.keras")
    # The trained weights first: a failure in the post-processing (bias snap) must not
    # cost them; saved again after it.
    result = api.run_finetune(model, _loop(ctx, "finetune"), epochs=f.epochs, options=f,
                              bits=bits, teacher=teacher,
                              on_trained=lambda trained: _save(trained, final))
    _save(model, final)
    return {"val_acc": result.val_acc, "val_loss": result.val_loss,
            "bias_snap": result.bias_snap, "gbops": result.gbops,
            "avg_activation_bits": result.avg_activation_bits,
            "wall_time_s": result.wall_time_s, "epochs": f.epochs, "history": result.history}


_PHASE_FNS = {"pretrain": _pretrain, "search": _search, "finetune": _finetune}


# ---------------------------------------------------------------------------------------------
# Summary and plot
# ---------------------------------------------------------------------------------------------


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


def _summary(ctx: RunContext, results: dict) -> dict:
    config = ctx.config
    summary = {
        "model": config.model.name,
        "dataset": ctx.data.name,
        "searcher": config.search.searcher,
        "train_size": ctx.data.train_size,
        "eval_size": ctx.data.eval_size,
        "image_shape": list(ctx.data.image_shape),
        "machine": _machine(ctx.strategy),
        "phases": {},
    }
    total = 0.0
    for phase in PHASES:
        r = results.get(phase)
        if r is None:
            continue
        summary["phases"][phase] = {k: v for k, v in r.items() if k != "history"}
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
        _check_avg_bits(config)  # always within the GBOPs bounds: no model needed
        return
    model = wrap.apply(_build_float(config, image_shape, num_classes, model_fn),
                       _quant_config(config))
    resolve_target(config, CostModel(model))


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
    _check(config, phase, model_fn)
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
        eval_dataset=strategy.experimental_distribute_dataset(data.eval),
        steps_per_epoch=steps_per_epoch, jit_compile=jit, model_fn=model_fn,
        verbose=verbose, on_epoch_end=on_epoch_end)
    ctx.say(f"Run directory {config.model_dir}: {m.name} on {data.name}, "
            f"{data.train_size} train / {data.eval_size} eval images "
            f"{'x'.join(map(str, data.image_shape))}, {distribute.describe(strategy)}, "
            f"jit_compile={jit}")
    results = {}
    for name in PHASES:
        if os.path.exists(_done_path(ctx, name)):
            results[name] = _read_json(_done_path(ctx, name))
    todo = PHASES if phase == _ALL else (phase,)
    for name in todo:
        if phase == _ALL and name in results:
            ctx.say(f"[{name}] already done ({_done_path(ctx, name)}); skipped")
            continue
        began = time.time()
        run_state.record(config, name, ctx.model_dir)
        result = _PHASE_FNS[name](ctx)
        result["phase_seconds_this_process"] = round(time.time() - began, 2)
        _write_json(_done_path(ctx, name), result)
        results[name] = result
        _write_json(ctx.path("summary.json"), _summary(ctx, results))
    summary = _summary(ctx, results)
    _write_json(ctx.path("summary.json"), summary)
    return summary
