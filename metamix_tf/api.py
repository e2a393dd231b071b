"""The library entry points: :func:`search`, :func:`finetune` and :func:`export_tflite` on
a user's own wrapped model and data.

    qmodel = metamix_tf.apply(model)
    result = metamix_tf.search(qmodel, (x, y), target_avg_bits=4, epochs=2)
    metamix_tf.finetune(qmodel, (x, y), epochs=3)
    metamix_tf.export_tflite(qmodel, "out", representative_data=x[:256])

``train_data`` / ``validation_data`` and ``callbacks``: see :mod:`metamix_tf.training.loop`. Each
phase runs the project's own loop (:mod:`metamix_tf.training.trainer`) on ``tf.distribute``
(``strategy=None``: the current strategy; build and wrap the model under
``strategy.scope()``). The pipeline's search and weight-training phases run the same
functions (:func:`run_search`, :func:`run_finetune`) on its run directory's loop.

About 530 lines: the three entry points, their result types and the helpers they share
(settings, targets, loss, optimizers, the bias grid).
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from metamix_tf import config as config_lib
from metamix_tf.export import bias_grid
from metamix_tf.export import graph as export_graph
from metamix_tf.quant import wrap
from metamix_tf.quant.cost import CostModel
from metamix_tf.training import distribute, optimizers, search_rules, searchers, steps, trainer
from metamix_tf.training import loop as loop_lib

__all__ = [
    "SearchResult",
    "FinetuneResult",
    "search",
    "finetune",
    "export_tflite",
    "run_search",
    "run_finetune",
]

# SearchConfig / FinetuneConfig fields that are arguments of search() / finetune().
_ARGUMENTS = {"searcher", "epochs", "warmup_epochs", "target_gbops", "target_avg_bits",
              "teacher"}


@dataclasses.dataclass
class SearchResult:
    """What :func:`search` found. ``bits``: layer name -> activation bits."""

    searcher: str
    bits: dict
    gbops: float
    target_gbops: float
    avg_activation_bits: float
    mac_weighted_activation_bits: float
    argmax_gbops: float
    lowered_to_target: list
    candidate_bits: list
    report: dict
    history: list
    val_acc: float | None
    val_loss: float | None
    wall_time_s: float
    epochs: int
    settings: dict = dataclasses.field(default_factory=dict)  # the search rules as applied

    def record(self) -> dict:
        """The pipeline's ``bits.json`` content."""
        return {"searcher": self.searcher, "bits": self.bits, "gbops": self.gbops,
                "settings": self.settings,
                "target_gbops": self.target_gbops, "argmax_gbops": self.argmax_gbops,
                "lowered_to_target": self.lowered_to_target,
                "avg_activation_bits": self.avg_activation_bits,
                "mac_weighted_activation_bits": self.mac_weighted_activation_bits,
                "candidate_bits": self.candidate_bits, "report": self.report}


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` left: metrics after training (and after the bias snap)."""

    bits: dict
    gbops: float
    avg_activation_bits: float
    history: list
    val_acc: float | None
    val_loss: float | None
    bias_snap: dict | None
    wall_time_s: float
    epochs: int


# ---------------------------------------------------------------------------------------------
# Checks and data
# ---------------------------------------------------------------------------------------------


def _check_model(model) -> None:
    if not isinstance(model, keras.Model) or not wrap.quant_layers(model):
        raise ValueError("`qmodel` must be a model wrapped by metamix_tf.apply. "
                         f"Received: qmodel={type(model).__name__}")
    inputs, outputs = len(model.inputs or []), len(model.outputs or [])
    if inputs != 1 or outputs != 1:
        raise ValueError("`qmodel` must have one input and one output (images -> logits). "
                         f"Received: inputs={inputs}, outputs={outputs}")


def _split_settings(settings: dict, section) -> tuple:
    """``settings`` -> (the phase config with them, the loop settings); unknown keys are
    errors."""
    fields = {f.name for f in dataclasses.fields(section)} - _ARGUMENTS
    unknown = sorted(set(settings) - fields - set(loop_lib.LOOP_SETTINGS))
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown}; known: "
                         f"{sorted(fields | set(loop_lib.LOOP_SETTINGS))}. "
                         f"Received: {unknown[0]}={settings[unknown[0]]!r}")
    phase = dataclasses.replace(section(), **{k: v for k, v in settings.items() if k in fields})
    defaults = loop_lib.LOOP_SETTINGS
    loop = {**defaults, **{k: v for k, v in settings.items() if k in defaults}}
    return phase, loop


def _weight_optimizer(groups: wrap.VariableGroups, options, total_steps: int):
    """AdamW on weights and step sizes, cosine-decayed over the phase; no decay on step
    sizes, biases and BatchNorm parameters; step-size updates bounded relative to the step."""
    no_decay = groups.steps + [v for v in groups.weights if len(v.shape) <= 1]
    return optimizers.make_optimizer(
        optimizers.cosine_schedule(options.learning_rate, total_steps), groups.weights_and_steps,
        weight_decay=options.weight_decay, no_decay=no_decay, step_sizes=groups.steps)


def _step_kwargs(teacher, loss, model, loop: trainer.Loop, kd_temperature: float) -> dict:
    if teacher is not None and not isinstance(teacher, keras.Model):
        raise ValueError("`teacher` must be a keras.Model (logits) or None. "
                         f"Received: teacher={type(teacher).__name__}")
    if teacher is not None and teacher.output_shape[-1] != model.output_shape[-1]:
        raise ValueError(f"The teacher has {teacher.output_shape[-1]} outputs, the model "
                         f"{model.output_shape[-1]}. Received: teacher={teacher.name!r}")
    return dict(teacher=teacher, kd_temperature=kd_temperature, jit_compile=loop.jit_compile,
                loss_fn=_loss_fn(loss, teacher))


def _requested_target(cost: CostModel, candidates, target_gbops, target_avg_bits):
    if target_gbops is not None:
        if not target_gbops > 0:
            raise ValueError(f"`target_gbops` must be > 0. Received: target_gbops={target_gbops}")
        return cost.check_target(float(target_gbops))
    if target_avg_bits is None:
        return None
    low, high = min(candidates), max(candidates)
    if not low <= target_avg_bits <= high:
        raise ValueError(f"The average activation bit-width target {target_avg_bits} is outside "
                         f"the candidate bits [{low}, {high}]. "
                         f"Received: target_avg_bits={target_avg_bits}")
    return cost.check_target(cost.uniform_gbops(float(target_avg_bits)))


def _searchable(model) -> dict:
    return {layer.name: layer.input_quantizer for layer in wrap.quant_layers(model)
            if layer.input_quantizer is not None and layer.input_quantizer.searchable}


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def search(qmodel, train_data, *, target_gbops: float | None = None,
           target_avg_bits: float | None = None, searcher="metamix", epochs: int = 2,
           warmup_epochs: int = 1, validation_data=None, loss=None, teacher=None,
           callbacks=None, strategy=None, **settings) -> SearchResult:
    """Searches the activation bits of ``qmodel`` (from :func:`metamix_tf.apply`).

    Calibrates the step sizes on the first batch (BatchNorm on that batch's statistics, as
    the search steps compute; moving statistics untouched), runs ``epochs`` epochs of ``searcher``
    (``"metamix"``, ``"joint"``, ``"uniform"`` or a :class:`metamix_tf.training.searchers.Searcher`)
    and leaves ``qmodel`` in ``"selected"`` mode at the found bits (weights trained by the
    search, weight quantization off).

    Args:
      target_gbops / target_avg_bits: the GBOPs budget, given once: in GBOPs, or as the
        GBOPs of every searchable layer at that average bit-width. ``"uniform"`` takes none.
      loss: a Keras loss (its reduction is dropped) or a callable ``(labels, logits) ->
        [batch]`` per-example losses; default: sparse categorical cross-entropy on logits,
        or KD from ``teacher`` (a Keras model giving logits). ``val_loss`` stays the
        cross-entropy.
      settings: :class:`metamix_tf.config.SearchConfig` fields (``learning_rate``,
        ``alpha_learning_rate``, ``cost_weight``, ``uniform_bits``, ...) and loop settings
        (``batch_size``, ``steps_per_epoch``, ``checkpoint_dir``, ``log_dir``,
        ``verbose``, ``jit_compile``, ``shuffle_seed``, ``eval_batch_size``).
    Returns a :class:`SearchResult` (``.bits``, ``.gbops``, ``.history``, ...).
    """
    _check_model(qmodel)
    options, loop_settings = _split_settings(settings, config_lib.SearchConfig)
    chosen = searchers.get_searcher(searcher, warmup_epochs=warmup_epochs,
                                    uniform_bits=options.uniform_bits,
                                    meta_batch=options.meta_batch,
                                    meta_candidates=options.meta_candidates)
    given = [(name, value) for name, value in (("target_gbops", target_gbops),
                                               ("target_avg_bits", target_avg_bits))
             if value is not None]
    if isinstance(chosen, searchers.Uniform):
        if given:
            raise ValueError("The 'uniform' searcher has no GBOPs target (its cost is that of "
                             f"uniform_bits). Received: {given[0][0]}={given[0][1]}")
    elif len(given) != 1:
        raise ValueError("Give the GBOPs target once: target_gbops or target_avg_bits. "
                         f"Received: target_gbops={target_gbops}, "
                         f"target_avg_bits={target_avg_bits}")
    loop = loop_lib.make_loop(train_data, validation_data, strategy=strategy, **loop_settings)
    return run_search(qmodel, loop, chosen, epochs=epochs, options=options,
                      target_gbops=target_gbops, target_avg_bits=target_avg_bits,
                      teacher=teacher, loss=loss, callbacks=callbacks)


def _loss_fn(loss, teacher):
    """``loss`` as ``(labels, logits) -> [batch]`` per-example losses (a Keras ``Loss`` is
    rebuilt without reduction), or None for the default."""
    if loss is None:
        return None
    if teacher is not None:
        raise ValueError("Give `loss` or `teacher` (the KD loss), not both. "
                         f"Received: loss={loss!r}, teacher={teacher.name!r}")
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.__class__.from_config({**loss.get_config(), "reduction": None})
    if callable(loss):
        return loss
    raise ValueError(f"`loss` must be a Keras loss or a callable (labels, logits) -> per-example "
                     f"losses. Received: loss={loss!r}")


def run_search(model, loop: trainer.Loop, searcher: searchers.Searcher, *, epochs: int,
               options: config_lib.SearchConfig, target_gbops=None, target_avg_bits=None,
               teacher=None, loss=None, callbacks=None) -> SearchResult:
    """The search on a prepared :class:`Loop` (what :func:`search` and the pipeline run)."""
    if not isinstance(epochs, int) or epochs < (0 if isinstance(searcher, searchers.Uniform)
                                                else 1):
        raise ValueError(f"The '{searcher.name}' searcher needs `epochs` >= 1 to learn the bit "
                         f"logits. Received: epochs={epochs!r}")
    strategy = loop.strategy
    with strategy.scope():
        distribute.sync_batch_norm(model, strategy.num_replicas_in_sync > 1)
        groups = wrap.variable_groups(model)
        weight_opt = _weight_optimizer(groups, options, epochs * loop.steps_per_epoch)
        alpha_lr = _alpha_learning_rate(searcher, options, epochs, loop.steps_per_epoch) \
            if groups.alphas else None
        alpha_opt = optimizers.make_optimizer(
            alpha_lr, groups.alphas, weight_decay=options.alpha_weight_decay,
            l2=options.alpha_l2, beta_1=options.alpha_beta_1,
            beta_2=options.alpha_beta_2) if groups.alphas else None
    cost = CostModel(model)
    candidates = tuple(sorted({b for q in _searchable(model).values()
                               for b in q.candidate_bits}))
    target = searcher.target(cost, _requested_target(cost, candidates or (0,), target_gbops,
                                                     target_avg_bits))
    if isinstance(searcher, searchers.MetaMix):
        shortened = searcher.fit_warmup(epochs)
        if shortened is not None:
            loop.say(f"[search] warm-up shortened to {shortened} epoch(s) to leave one "
                     f"bit-search epoch (epochs={epochs})")
    search_weight_opt = None
    search_weight_steps = searcher.search_weight_steps(epochs, loop.steps_per_epoch)
    if search_weight_steps:
        with strategy.scope():
            search_weight_opt = _weight_optimizer(groups, options, search_weight_steps)
    uniform = searcher.uniform_bits(cost, candidates, target)
    # the steps' penalty is relative (w |G - T| / T): the weight that gives the configured form
    cost_weight = search_rules.relative_cost_weight(options.cost_weight, target,
                                                    options.cost_normalization)
    settings = {"cost_normalization": options.cost_normalization,
                "cost_weight": options.cost_weight, "relative_cost_weight": cost_weight,
                "alpha_learning_rate": alpha_lr, "alpha_lr_rule": options.alpha_lr_rule,
                "alpha_l2": options.alpha_l2, "alpha_init_bias": options.alpha_init_bias,
                "alpha_init_bits": uniform}
    setup = searchers.SearchSetup(
        strategy=strategy, model=model, groups=groups, cost=cost, target=target,
        candidate_bits=candidates, uniform_bits=uniform, weight_optimizer=weight_opt,
        alpha_optimizer=alpha_opt, cost_weight=cost_weight,
        step_kwargs=_step_kwargs(teacher, loss, model, loop, options.kd_temperature),
        search_weight_optimizer=search_weight_opt)
    epoch_step = searcher.make_epoch_step(setup)

    def select(epoch):
        if not searcher.searched(epoch):
            return wrap.select_bits(model, dict.fromkeys(_searchable(model), uniform))
        bits = wrap.select_bits(model)
        if options.enforce_target:
            alphas = {name: keras.ops.convert_to_numpy(q.alpha)
                      for name, q in _searchable(model).items()}
            fitted = cost.fit_to_target(bits, target, alphas)
            if fitted != bits:
                bits = wrap.select_bits(model, fitted)
        return bits

    def epoch_info(epoch):
        bits = wrap.get_bits(model)
        report = cost.report(bits)
        return {"sel_gbops": report["gbops"], "avg_bits": report["avg_activation_bits"],
                "bits": bits}

    eval_fn = steps.make_eval_step(strategy, model,
                                   configure=lambda: wrap.set_mode(model, "selected"),
                                   jit_compile=loop.jit_compile)
    calibrate = steps.make_calibrate_step(strategy, model)

    def on_fresh_start(iterator):
        if options.alpha_init_bias and groups.alphas:  # a restored checkpoint has its own
            search_rules.set_initial_alphas(model, uniform, options.alpha_init_bias)
        images, labels = next(iterator)
        calibrate(images, labels)

    objects = dict(model=model, optimizer=weight_opt)
    if alpha_opt is not None:
        objects["alpha_optimizer"] = alpha_opt
    if search_weight_opt is not None:
        objects["search_weight_optimizer"] = search_weight_opt
    low, high = cost.bounds()
    loop.say(f"[search] searcher={searcher.describe()}, {epochs} epoch(s) x "
             f"{loop.steps_per_epoch} steps, candidates {candidates}, target {target:.4f} "
             f"GBOPs (range {low:.4f}..{high:.4f}; uniform {uniform}-bit = "
             f"{cost.uniform_gbops(uniform):.4f}), lambda {options.cost_weight} "
             f"({options.cost_normalization}), alpha lr {alpha_lr}")
    hooks = trainer.Hooks(on_fresh_start=on_fresh_start, before_eval=select,
                          epoch_info=epoch_info)
    result = loop_lib.run_phase(loop, model, callbacks, trainer.Phase(
        "search", epochs, epoch_step=epoch_step, eval_fn=eval_fn,
        checkpoint=tf.train.Checkpoint(**objects), hooks=[hooks]))

    argmax_bits = {layer: q.argmax_bits for layer, q in _searchable(model).items()} \
        if searcher.searched(epochs) else {}
    bits = select(epochs)
    metrics = result.last if result.history else (
        trainer.evaluate(strategy, eval_fn, loop.eval_dataset) if loop.eval_dataset else {})
    report = cost.report(bits)
    wrap.set_mode(model, "selected")
    return SearchResult(
        searcher=searcher.name, bits=bits, gbops=report["gbops"], target_gbops=target,
        avg_activation_bits=report["avg_activation_bits"],
        mac_weighted_activation_bits=report["mac_weighted_activation_bits"],
        argmax_gbops=cost.gbops({**bits, **argmax_bits}),
        lowered_to_target=sorted(k for k, b in argmax_bits.items() if bits[k] != b),
        candidate_bits=list(candidates), report=report, history=result.history,
        val_acc=metrics.get("val_acc"), val_loss=metrics.get("val_loss"),
        wall_time_s=result.wall_time_s, epochs=epochs, settings=settings)


def _alpha_learning_rate(searcher: searchers.Searcher, options: config_lib.SearchConfig,
                         epochs: int, steps_per_epoch: int) -> float:
    """``options.alpha_learning_rate``, or with ``alpha_lr_rule="displacement"`` the lr
    that moves a logit by ``alpha_displacement`` over this searcher's alpha steps
    (:mod:`metamix_tf.training.search_rules`), the same rule for every searcher."""
    if isinstance(searcher, searchers.Uniform):  # its logits are never stepped
        return float(options.alpha_learning_rate)
    warmup = getattr(searcher, "warmup_epochs", 0)
    kind = "metamix" if isinstance(searcher, searchers.MetaMix) else "joint"
    steps_count = search_rules.alpha_steps(kind, epochs, warmup, steps_per_epoch)
    return search_rules.alpha_learning_rate(options.alpha_lr_rule, options.alpha_learning_rate,
                                            options.alpha_displacement, steps_count)


# ---------------------------------------------------------------------------------------------
# Weight training
# ---------------------------------------------------------------------------------------------


def finetune(qmodel, train_data, *, epochs: int, validation_data=None, loss=None,
             teacher=None, callbacks=None, strategy=None, **settings) -> FinetuneResult:
    """Weight training of ``qmodel`` at its selected bits with quantized weights.

    Turns weight quantization on (LSQ steps initialised from the kernels), trains weights,
    BatchNorm and step sizes for ``epochs`` epochs with the folded biases rounded onto the
    int8 export's int32 grid (:mod:`metamix_tf.export.bias_grid`; setting ``bias_grid_epochs``,
    default every epoch), then (setting ``snap_biases``, default on) writes the rounded
    biases into the model. ``qmodel`` ends in ``"selected"`` mode, ready for
    :func:`export_tflite`.

    Args: as :func:`search`; settings are :class:`metamix_tf.config.FinetuneConfig` fields
    (``learning_rate``, ``weight_decay``, ``kd_temperature``, ``bias_grid_epochs``,
    ``weight_storage``, ``snap_biases``) and the loop settings.
    """
    _check_model(qmodel)
    options, loop_settings = _split_settings(settings, config_lib.FinetuneConfig)
    loop = loop_lib.make_loop(train_data, validation_data, strategy=strategy, **loop_settings)
    return run_finetune(qmodel, loop, epochs=epochs, options=options, teacher=teacher,
                        loss=loss, callbacks=callbacks)


def run_finetune(model, loop: trainer.Loop, *, epochs: int, options: config_lib.FinetuneConfig,
                 bits: dict | None = None, teacher=None, loss=None,
                 callbacks=None, on_trained=None) -> FinetuneResult:
    """Weight training on a prepared :class:`Loop` (what :func:`finetune` and the pipeline
    run); ``bits`` default to the model's selected bits. ``on_trained(model)`` is called
    after training, before any post-processing (the bias snap), e.g. to save the weights."""
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"`epochs` must be an integer >= 0. Received: epochs={epochs!r}")
    strategy = loop.strategy
    bits = dict(wrap.get_bits(model) if bits is None else bits)
    with strategy.scope():
        wrap.select_bits(model, bits)
        wrap.enable_weight_quantization(model, True)
        distribute.sync_batch_norm(model, strategy.num_replicas_in_sync > 1)
        groups = wrap.variable_groups(model)
        variables = groups.weights_and_steps
        optimizer = _weight_optimizer(groups, options, epochs * loop.steps_per_epoch)
    kwargs = _step_kwargs(teacher, loss, model, loop, options.kd_temperature)
    selected = steps.fixed_bits(model, bits)  # the selected bits, as static branches
    step = steps.make_train_step(strategy, model, optimizer, variables, configure=selected,
                                 **kwargs)
    eval_fn = plain_eval = steps.make_eval_step(strategy, model, configure=selected,
                                                jit_compile=loop.jit_compile)
    weight_bits = sorted({wq.bits for wq in wrap.weight_quantizers(model)})
    loop.say(f"[finetune] weight training at the selected bits with {weight_bits}-bit "
             f"weights: {epochs} epoch(s) x {loop.steps_per_epoch} steps"
             + (f", KD from {teacher.name}" if teacher is not None else ""))
    grid = _bias_grid(loop, model, options)
    step_on_grid, first_on_grid = step, epochs
    if grid is not None:
        first_on_grid = max(0, epochs - (epochs if options.bias_grid_epochs is None
                                         else options.bias_grid_epochs))
        loop.say(f"[finetune] {len(grid.layers)} folded biases on the int8 export's int32 "
                 f"grid ('{options.weight_storage}' weights) from epoch {first_on_grid + 1}"
                 + (f"; float in training: {grid.skipped}" if grid.skipped else ""))
        step_on_grid, eval_fn = grid.around(step), grid.around(eval_fn)
    result = loop_lib.run_phase(loop, model, callbacks, trainer.Phase(
        "finetune", epochs,
        epoch_step=lambda epoch: step_on_grid if epoch >= first_on_grid else step,
        eval_fn=eval_fn, checkpoint=tf.train.Checkpoint(model=model, optimizer=optimizer)))

    def evaluate():
        return trainer.evaluate(strategy, plain_eval, loop.eval_dataset) \
            if loop.eval_dataset else {}

    metrics = result.last if result.history else evaluate()
    report = CostModel(model).report()
    wrap.select_bits(model, bits)  # "selected" mode, as the exporter expects
    if on_trained is not None:
        on_trained(model)
    snapped = _export_rule(loop, "biases left as trained", export_graph.snap_biases, model,
                           options.weight_storage) if options.snap_biases else None
    if snapped is not None:
        before = metrics.get("val_acc")
        metrics = evaluate()
        snapped.update(val_acc_before=before, val_acc_after=metrics.get("val_acc"),
                       trained_on_grid=grid is not None and first_on_grid < epochs)
        if before is not None:
            loop.say(f"[finetune] biases moved onto the int8 model's int32 grid (at most "
                     f"{snapped['max_shift_units']:.2f} units, {snapped['moved']} layers): "
                     f"val_acc {100 * before:.2f}% -> {100 * metrics['val_acc']:.2f}%")
    return FinetuneResult(
        bits=bits, gbops=report["gbops"], avg_activation_bits=report["avg_activation_bits"],
        history=result.history, val_acc=metrics.get("val_acc"),
        val_loss=metrics.get("val_loss"), bias_snap=snapped, wall_time_s=result.wall_time_s,
        epochs=epochs)


def _bias_grid(loop: trainer.Loop, model, options: config_lib.FinetuneConfig):
    """The :class:`~metamix_tf.export.bias_grid.BiasGrid` weight training uses, or None: turned
    off (``bias_grid_epochs=0``) or no int8 export (a line says why)."""
    if options.bias_grid_epochs == 0:
        return None
    return _export_rule(loop, "biases trained in float", bias_grid.BiasGrid, model,
                        options.weight_storage)


def _export_rule(loop: trainer.Loop, fallback: str, fn, *args):
    """``fn(*args)`` (a post-processing onto the int8 export's grids), or None and a line
    saying ``fallback`` where the model has no int8 export."""
    try:
        return fn(*args)
    except export_graph.UnsupportedModelError as error:
        loop.say(f"[finetune] {fallback} (no int8 export): {error}")
        return None


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _images_and_labels(data, name: str, limit: int | None = None) -> tuple:
    if isinstance(data, np.ndarray) or (not isinstance(data, (tuple, list, tf.data.Dataset))
                                        and hasattr(data, "shape")):
        x = np.asarray(data, np.float32)
        if x.ndim != 4:
            raise ValueError(f"`{name}` images must be [n, height, width, channels]. "
                             f"Received: {name}.shape={x.shape}")
        return x[:limit], None
    dataset = loop_lib.as_dataset(data, name, batch_size=256, shuffle=False)
    images, labels, count = [], [], 0
    for x, y in dataset:
        images.append(x.numpy())
        labels.append(y.numpy())
        count += len(images[-1])
        if limit is not None and count >= limit:
            break
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def export_tflite(qmodel, output_dir: str, *, representative_data, eval_data=None,
                  formats=("int8", "float16", "float32"), **options) -> dict:
    """Writes ``qmodel`` (after :func:`finetune`) as TFLite files with their encodings and
    returns the export report (also ``output_dir/export_report.json``).

    Args:
      representative_data: images (an array) or ``(x, y)`` / a dataset as for
        :func:`search`; the int8 ranges of the tensors the model keeps in float.
      eval_data: ``(x, y)`` or a dataset; with it, each file is run by LiteRT and compared
        with the Keras model (accuracy, agreement, grid checks, latency).
      options: :func:`metamix_tf.export.run.export_model` keywords (``name``,
        ``weight_storage`` (``"int4"`` also writes INT4 kernels), ``integer_io``
        (``("uint8",)``), ``labels``, ``latency_runs``, ...).
    """
    from metamix_tf.export import run as export_run

    _check_model(qmodel)
    representative, _ = _images_and_labels(representative_data, "representative_data",
                                           limit=options.pop("max_calibration_examples", 1024))
    images = labels = None
    if eval_data is not None:
        images, labels = _images_and_labels(eval_data, "eval_data")
    os.makedirs(output_dir, exist_ok=True)
    bits = wrap.get_bits(qmodel)
    report = CostModel(qmodel).report(bits)
    bits_info = {"bits": bits, "gbops": report["gbops"],
                 "avg_activation_bits": report["avg_activation_bits"]}
    options.setdefault("log", lambda message: None)
    return export_run.export_model(qmodel, output_dir, formats,
                                   calibration_data=representative, eval_images=images,
                                   eval_labels=labels, verify_models=images is not None,
                                   bits_info=bits_info, **options)
