"""Step functions of the training loop, each a ``tf.function`` running ``strategy.run``
(but the one-off calibration step, which runs eagerly).

Every builder returns ``step(images, labels) -> dict`` of scalar tensors already reduced over
replicas (``strategy.reduce(SUM)``): ``loss_sum`` (summed per-example task loss),
``correct`` and ``count``, plus ``penalty`` and ``gbops`` for the steps that see the cost.
The inputs are the per-replica values of a distributed dataset (or plain tensors under the
default strategy).

Quantizer modes are Python attributes read while tracing, so each builder sets the modes it
needs inside the traced function (``configure``): a step function traces once per phase and
always runs the modes it was built for, whatever the model's modes are when it is called.
Such Python state is only changed outside ``strategy.run`` (MirroredStrategy traces the
replicas in threads that take turns at each cross-replica call, so a change made inside one
replica's function would leak into another's trace); the bit-meta step therefore runs one
``strategy.run`` per candidate bit-width. Every step traces the model with the quantizers'
native kernels (:mod:`metamix_tf.quant.native`) and BatchNorm's fused kernel
(:mod:`metamix_tf.training.batch_norm`).

``loss_fn`` (every training builder): ``(labels, logits) -> [batch]`` per-example losses
instead of cross-entropy (ignored with a ``teacher``: the KD loss).

Losses are scaled by the global batch size (:func:`metamix_tf.training.losses.scale_loss`, with the
global size all-reduced from the replicas, so a short last batch is weighted right) and the
Keras optimizers sum the gradients over replicas; the results do not depend on the replica
count except through floating-point order (and BatchNorm, which the trainer synchronises
across replicas).

The steps (``w``: weights, BatchNorm parameters and LSQ step sizes; ``a``: bit logits):

* :func:`make_train_step`: ``w -= grad L(w)`` at the model's current modes (float pre-training,
  uniform LSQ, weight training at the selected bits).
* :func:`make_meta_step` (bit-meta): ``L_meta = mean_b L(w; every layer at b)`` over the
  candidate bits, one step of ``w``; ``a`` untouched.
* :func:`make_search_step` (bit-search): mixture forward with ``w`` fixed,
  ``L = L_task + lambda |GBOPs(a) - target| / target``, one step of ``a`` only.
* :func:`make_joint_step` (EdMIPS/DNAS baseline): the same loss on the mixture, one tape, ``w``
  and ``a`` both stepped by their own optimizers.
* :func:`make_eval_step`: inference forward, no state change.

About 425 lines: the builders are one family over three private pieces (``_distributed``,
``_task_forward``, ``_reduce``) that fix how a step is traced and reduced; split across
modules, those would become public for no caller outside this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import tensorflow as tf

from metamix_tf.quant import native, wrap
from metamix_tf.training import losses
from metamix_tf.training.batch_norm import batch_norm_layers, fused_batch_norm

__all__ = [
    "make_train_step",
    "make_meta_step",
    "META_BATCH",
    "make_search_step",
    "make_joint_step",
    "make_eval_step",
    "make_calibrate_step",
    "fixed_bits",
    "apply_gradients",
    "frozen_batch_norm_statistics",
]

SUM = tf.distribute.ReduceOp.SUM
META_PREFIX = "meta"  # make_meta_step's per-candidate outputs: meta<bits>_loss_sum, ...


def _global_count(labels: tf.Tensor) -> tf.Tensor:
    """The number of examples in the global batch (an all-reduce of the replica counts)."""
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return count
    return context.all_reduce(SUM, count)


def _correct(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_sum(tf.cast(tf.equal(predictions, tf.cast(labels, tf.int32)), tf.float32))


def apply_gradients(optimizer, grads: Sequence, variables: Sequence) -> None:
    """Applies the gradients that exist (a variable with no path to the loss, e.g. a
    disabled weight quantizer's step size, is left out rather than given a zero step that
    would still decay it)."""
    pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
    if pairs:
        optimizer.apply_gradients(pairs)


@contextlib.contextmanager
def frozen_batch_norm_statistics(model):
    """While tracing: BatchNorm uses batch statistics but keeps its moving statistics
    (momentum 1, so ``moving = moving * 1 + batch * 0``). Restores the momenta on exit."""
    layers = batch_norm_layers(model)
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 1.0
        yield
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum


def fixed_bits(model, bits: dict) -> Callable:
    """A ``configure`` callable that runs every activation quantizer at ``bits`` (layer name
    -> bits) as a static branch.

    Same outputs and gradients as ``"selected"`` mode at these bits, but each quantizer's
    branch is fixed while tracing (mode ``"uniform"`` with a per-layer ``uniform_index``)
    instead of read from the ``bit_index`` variable at run time, for a phase whose bits do
    not change (weight training). Measured on MobileNetV2, 2 CPU cores: first call 16 s
    against 23 s in ``"selected"`` mode, the same time per step.
    """
    indices = []
    for layer in wrap.quant_layers(model):
        q = layer.input_quantizer
        if q is None:
            continue
        if layer.name not in bits:
            raise ValueError(f"`bits` has no entry for quantized layer '{layer.name}'. "
                             f"Received: bits keys={sorted(bits)}")
        indices.append((q, q.index_of(int(bits[layer.name]))))
    indices += [(q, 0) for q in wrap.output_quantizers(model)]  # one branch each

    def configure():
        for q, index in indices:
            q.mode = "uniform"
            q.uniform_index = index

    return configure


def _teacher_logits(teacher, images):
    return None if teacher is None else tf.stop_gradient(teacher(images, training=False))


def _reduce(strategy, per_replica: dict) -> dict:
    return {key: strategy.reduce(SUM, value, axis=None) for key, value in per_replica.items()}


def _compiled(fn: Callable, jit_compile: bool) -> Callable:
    return tf.function(fn, jit_compile=True, autograph=False) if jit_compile else fn


def _distributed(strategy: tf.distribute.Strategy, model, replica_fn: Callable,
                 configure: Callable | None, jit_compile: bool, name: str,
                 context: Callable | None = None) -> Callable:
    """``tf.function`` that runs ``configure()`` (at trace time), then ``replica_fn`` on
    every replica inside ``context()`` (a trace-time context manager), and sums each
    returned scalar over replicas. ``model`` is traced with the native quantizer kernels
    (:func:`metamix_tf.quant.native.enabled_in`) and fused BatchNorm
    (:func:`metamix_tf.training.batch_norm.fused_batch_norm`).

    Python state (quantizer modes, BatchNorm momenta) changes only here, outside
    ``strategy.run``: MirroredStrategy traces its replicas in threads that take turns at
    every cross-replica call (synchronized BatchNorm, variable aggregation), so a change
    made inside one replica's function would leak into the other's trace.
    """
    inner = _compiled(replica_fn, jit_compile)

    def step(images, labels):
        if configure is not None:
            configure()
        with native.enabled_in(), fused_batch_norm(model), (
                context() if context is not None else contextlib.nullcontext()):
            per_replica = strategy.run(inner, args=(images, labels))
        return _reduce(strategy, per_replica)

    step.__name__ = name
    return tf.function(step, reduce_retracing=True, autograph=False)


def _task_forward(model, images, labels, teacher_logits, kd_temperature, label_smoothing,
                  loss_fn=None):
    """``model(images, training=True)`` and its per-example task loss (cross-entropy, or KD
    from ``teacher_logits``, or ``loss_fn(labels, logits)`` of shape ``[batch]``)."""
    logits = model(images, training=True)
    if loss_fn is not None and teacher_logits is None:
        per_example = loss_fn(labels, logits)
        if per_example.shape.rank != 1:
            raise ValueError("`loss_fn` must return one loss per example. "
                             f"Received: shape={per_example.shape}")
        return logits, tf.cast(per_example, tf.float32)
    return logits, losses.task_loss(labels, logits, teacher_logits, kd_temperature,
                                    label_smoothing)


def make_train_step(strategy, model, optimizer, variables: Sequence, *,
                    configure: Callable | None = None, teacher=None, kd_temperature: float = 1.0,
                    label_smoothing: float = 0.0, loss_fn: Callable | None = None,
                    jit_compile: bool = False) -> Callable:
    """One optimizer step on ``variables`` at the model's modes (set by ``configure``).

    Forward: ``model(x, training=True)``; loss: cross-entropy, or KD from ``teacher``.
    Gradient: ``dL/dv`` for ``v`` in ``variables`` (global-batch mean, summed over
    replicas by the optimizer).
    """
    variables = list(variables)

    def replica_fn(images, labels):
        n = _global_count(labels)
        teacher_logits = _teacher_logits(teacher, images)
        with tf.GradientTape() as tape:
            logits, per_example = _task_forward(model, images, labels, teacher_logits,
                                                kd_temperature, label_smoothing, loss_fn)
            loss = losses.scale_loss(per_example, n)
        apply_gradients(optimizer, tape.gradient(loss, variables), variables)
        return {"loss_sum": tf.reduce_sum(per_example), "correct": _correct(labels, logits),
                "count": tf.cast(tf.shape(labels)[0], tf.float32)}

    return _distributed(strategy, model, replica_fn, configure, jit_compile, "train_step")


META_BATCH = ("full", "split")


def _draw(candidates: int, passes: int, seed: int, optimizer) -> tf.Tensor:
    """``passes`` distinct candidate indices in ``[0, candidates)``, uniformly drawn from a
    stateless generator keyed by ``seed`` and ``optimizer.iterations``."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(optimizer.iterations, tf.int64)])
    return tf.argsort(tf.random.stateless_uniform([candidates], seed=key))[:passes]


def make_meta_step(strategy, model, optimizer, variables: Sequence, candidate_bits: Sequence[int],
                   *, teacher=None, kd_temperature: float = 1.0, label_smoothing: float = 0.0,
                   loss_fn: Callable | None = None, jit_compile: bool = False,
                   meta_batch: str = "full", meta_candidates: int | None = None,
                   seed: int = 0) -> Callable:
    """Bit-meta training: the same batch once per candidate bit-width, every searchable
    layer at that width (the values of :func:`metamix_tf.quant.wrap.set_uniform`, set through
    each quantizer's ``bit_index``), losses averaged.

    Forward: ``L_meta = (1/K) sum_b L(model_b(x))``. Gradient: ``dL_meta/dv`` for ``v`` in
    ``variables`` (weights, BatchNorm parameters, every branch's step size), accumulated
    pass by pass, then one optimizer step; the bit logits get no step. BatchNorm moving
    statistics are updated once per candidate pass.

    Outputs: the averaged ``loss_sum`` / ``correct`` / ``count``, and each candidate's own
    as ``meta<b>_loss_sum`` / ``meta<b>_correct`` / ``meta<b>_count`` (per epoch:
    ``record["meta_losses"]``), so a pass that dominates the average shows.

    Each candidate's forward and backward is its own ``strategy.run``, so only one pass's
    activations are alive at a time. The passes share one traced function: the quantizers
    run in ``"selected"`` mode and each pass first sets every searchable quantizer's
    ``bit_index`` to its candidate (restored after the last pass), so tracing costs one
    pass, not ``K`` (the same values as ``"uniform"`` mode at those bits). Graph
    optimization still sees ``K`` inlined copies: run as a ``tf.while_loop`` body or as
    separate calls the step optimized once but every step ran slower (the executor overlaps
    one pass's backward with the next pass's forward only in one graph).

    ``meta_candidates=n < K`` (a shortcut, not the paper's): each step runs ``n`` of the
    ``K`` candidates, drawn without replacement (stateless, from ``seed`` and the optimizer's
    step counter: the same draws after a resume), and averages over them: an unbiased
    estimate of the ``K``-candidate average at ``n/K`` of its passes. ``meta<b>_count`` is 0
    for a candidate not drawn in a step.

    ``meta_batch="split"`` (a shortcut, not the paper's): each replica's batch is cut into
    ``K`` contiguous parts and part ``i`` runs at ``candidate_bits[i]``, so the step costs
    one forward/backward instead of ``K``. Forward: ``L_meta = (1/N) sum_i sum_{x in part i}
    l(model_{b_i}(x))`` (every example counted once, ``N`` the global batch); gradient as
    above. ``meta<b>_*`` then report part ``i`` alone, and BatchNorm sees ``B/K`` examples
    (with ``meta_candidates=n``: ``n`` parts, part ``i`` at the ``i``-th drawn candidate).
    """
    if meta_batch not in META_BATCH:
        raise ValueError(f"`meta_batch` must be one of {META_BATCH}. "
                         f"Received: meta_batch={meta_batch!r}")
    variables = list(variables)
    candidate_bits = tuple(int(b) for b in candidate_bits)
    if not candidate_bits:
        raise ValueError(f"`candidate_bits` must not be empty. Received: {candidate_bits}")
    passes = len(candidate_bits) if meta_candidates is None else meta_candidates
    if isinstance(passes, bool) or not isinstance(passes, int) or not (
            1 <= passes <= len(candidate_bits)):
        raise ValueError(f"`meta_candidates` must be an integer in [1, {len(candidate_bits)}] "
                         f"(the number of candidate bit-widths) or None (all). "
                         f"Received: meta_candidates={meta_candidates!r}")
    sampled = passes < len(candidate_bits)
    split = meta_batch == "split"
    k = float(passes)
    has_grad = [False] * len(variables)  # filled while tracing the passes

    def grad_pass(part, images, labels, teacher_logits, *accumulated):
        n = _global_count(labels)
        if split:  # this candidate's rows of the replica's batch
            size = tf.shape(labels)[0]
            begin = size * part // passes
            end = size * (part + 1) // passes
            images, labels = images[begin:end], labels[begin:end]
            if teacher_logits is not None:
                teacher_logits = teacher_logits[begin:end]
        with tf.GradientTape() as tape:
            logits, per_example = _task_forward(model, images, labels, teacher_logits,
                                                kd_temperature, label_smoothing, loss_fn)
            loss = losses.scale_loss(per_example, n) / (1.0 if split else k)
        grads = tape.gradient(loss, variables)
        out = []
        for index, (grad, var) in enumerate(zip(grads, variables, strict=True)):
            if grad is None:
                grad = tf.zeros(var.shape, var.dtype)
            else:
                has_grad[index] = True
                grad = tf.convert_to_tensor(grad)
            out.append(grad + accumulated[index])
        metrics = {"loss_sum": tf.reduce_sum(per_example), "correct": _correct(labels, logits),
                   "count": tf.cast(tf.shape(labels)[0], tf.float32)}
        return out, metrics

    def apply(*grads):
        apply_gradients(optimizer, [g if used else None for g, used in
                                    zip(grads, has_grad, strict=True)], variables)
        return tf.constant(0.0)

    # One traced pass for all candidates: a tf.function even without XLA, so that the K calls
    # reuse its graph, and passed to strategy.run itself (a tf.function nested inside the
    # replica function could not trace synchronized BatchNorm's cross-replica calls).
    grad_pass_fn = tf.function(grad_pass, jit_compile=jit_compile or None, autograph=False)
    apply_fn = _compiled(apply, jit_compile)
    teacher_fn = _compiled(lambda images: _teacher_logits(teacher, images), jit_compile)
    searchable = wrap.activation_quantizers(model, searchable_only=True)
    # Each searchable quantizer's branch index per candidate (indexed by a drawn candidate).
    branches = [[q.index_of(b) for b in candidate_bits] for q in searchable]

    def step(images, labels):
        wrap.set_mode(model, "selected")  # read while tracing the pass
        teacher_logits = None if teacher is None else strategy.run(teacher_fn, args=(images,))
        accumulated = tuple(tf.zeros(v.shape, v.dtype) for v in variables)
        totals = {}
        share = 1.0 if split else 1.0 / k  # parts add up; full passes average
        selected = [tf.identity(q.bit_index) for q in searchable]
        drawn = _draw(len(candidate_bits), passes, seed, optimizer) if sampled else None
        with native.enabled_in(), fused_batch_norm(model):  # read while grad_pass traces
            for part in range(passes):
                for q, indices in zip(searchable, branches, strict=True):
                    q.bit_index.assign(tf.gather(indices, drawn[part]) if sampled
                                       else indices[part])  # candidate drawn[part] or part
                accumulated, metrics = strategy.run(
                    grad_pass_fn, args=(tf.constant(part), images, labels, teacher_logits,
                                        *accumulated))
                for key, value in _reduce(strategy, metrics).items():
                    if sampled:  # to the drawn candidate's own, zeros to the others'
                        for index, bits in enumerate(candidate_bits):
                            own = tf.where(tf.equal(drawn[part], index), value,
                                           tf.zeros_like(value))
                            name = f"{META_PREFIX}{bits}_{key}"
                            totals[name] = own if part == 0 else totals[name] + own
                    else:  # this candidate's own
                        totals[f"{META_PREFIX}{candidate_bits[part]}_{key}"] = value
                    if key != "count":
                        totals[key] = totals.get(key, 0.0) + value * share
        for q, index in zip(searchable, selected, strict=True):
            q.bit_index.assign(index)
        strategy.run(apply_fn, args=tuple(accumulated))
        count = strategy.run(lambda y: tf.cast(tf.shape(y)[0], tf.float32), args=(labels,))
        totals["count"] = strategy.reduce(SUM, count, axis=None)
        return totals

    step.__name__ = "meta_step"
    return tf.function(step, reduce_retracing=True, autograph=False)


def _mixture(model):
    def configure():
        wrap.set_mode(model, "mixture")
    return configure


def make_search_step(strategy, model, optimizer, alphas: Sequence, cost_model, target_gbops: float,
                     cost_weight: float, *, teacher=None, kd_temperature: float = 1.0,
                     label_smoothing: float = 0.0, loss_fn: Callable | None = None,
               jit_compile: bool = False) -> Callable:
    """Bit-search training: mixture forward with the weights fixed, only ``alphas`` stepped.

    Forward: every quantizer outputs ``sum_b softmax(a)_b q_b(x)``; BatchNorm normalises
    with the batch statistics but its moving statistics stay as they are.
    Loss: ``L_task + lambda * |GBOPs(a) - target| / target`` (GBOPs with the straight-through
    argmax of :meth:`metamix_tf.quant.cost.CostModel.argmax_gbops_ste`).
    Gradient: ``dL/da`` only (the tape watches the alphas alone).
    """
    alphas = list(alphas)
    target_gbops, cost_weight = float(target_gbops), float(cost_weight)

    def replica_fn(images, labels):
        n = _global_count(labels)
        teacher_logits = _teacher_logits(teacher, images)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([getattr(a, "value", a) for a in alphas])
            # BN momenta frozen by the context
            logits, per_example = _task_forward(model, images, labels, teacher_logits,
                                                kd_temperature, label_smoothing, loss_fn)
            gbops = cost_model.argmax_gbops_ste()
            penalty = losses.cost_penalty(gbops, target_gbops, cost_weight)
            loss = losses.scale_loss(per_example, n) + losses.scale_replica_term(penalty)
        apply_gradients(optimizer, tape.gradient(loss, alphas), alphas)
        return {"loss_sum": tf.reduce_sum(per_example), "correct": _correct(labels, logits),
                "count": tf.cast(tf.shape(labels)[0], tf.float32),
                "penalty": losses.scale_replica_term(penalty),
                "gbops": losses.scale_replica_term(gbops)}

    return _distributed(strategy, model, replica_fn, _mixture(model), jit_compile, "search_step",
                        context=lambda: frozen_batch_norm_statistics(model))


def make_joint_step(strategy, model, weight_optimizer, weight_variables: Sequence,
                    alpha_optimizer, alphas: Sequence, cost_model, target_gbops: float,
                    cost_weight: float, *, teacher=None, kd_temperature: float = 1.0,
                    label_smoothing: float = 0.0, loss_fn: Callable | None = None,
                    jit_compile: bool = False, freeze_batch_norm: bool = False) -> Callable:
    """Joint search (EdMIPS/DNAS baseline): one tape on the mixture forward.

    Loss as in :func:`make_search_step`; gradients ``dL/dw`` stepped by ``weight_optimizer`` and
    ``dL/da`` by ``alpha_optimizer`` in the same step. BatchNorm updates its moving
    statistics from the mixture, or with ``freeze_batch_norm`` keeps them as
    :func:`make_search_step` does (MetaMix's bit-search step with the weights also stepped: the
    fixed-meta-state ablation).
    """
    weight_variables, alphas = list(weight_variables), list(alphas)
    target_gbops, cost_weight = float(target_gbops), float(cost_weight)

    def replica_fn(images, labels):
        n = _global_count(labels)
        teacher_logits = _teacher_logits(teacher, images)
        with tf.GradientTape() as tape:
            logits, per_example = _task_forward(model, images, labels, teacher_logits,
                                                kd_temperature, label_smoothing, loss_fn)
            gbops = cost_model.argmax_gbops_ste()
            penalty = losses.cost_penalty(gbops, target_gbops, cost_weight)
            loss = losses.scale_loss(per_example, n) + losses.scale_replica_term(penalty)
        grads = tape.gradient(loss, weight_variables + alphas)
        apply_gradients(weight_optimizer, grads[:len(weight_variables)], weight_variables)
        apply_gradients(alpha_optimizer, grads[len(weight_variables):], alphas)
        return {"loss_sum": tf.reduce_sum(per_example), "correct": _correct(labels, logits),
                "count": tf.cast(tf.shape(labels)[0], tf.float32),
                "penalty": losses.scale_replica_term(penalty),
                "gbops": losses.scale_replica_term(gbops)}

    context = (lambda: frozen_batch_norm_statistics(model)) if freeze_batch_norm else None
    return _distributed(strategy, model, replica_fn, _mixture(model), jit_compile, "joint_step",
                        context=context)


def make_eval_step(strategy, model, *, configure: Callable | None = None,
                   jit_compile: bool = False) -> Callable:
    """Inference forward ``model(x, training=False)``: summed cross-entropy, correct count
    and count. Changes no state."""

    def replica_fn(images, labels):
        logits = model(images, training=False)
        return {"loss_sum": tf.reduce_sum(losses.cross_entropy(labels, logits)),
                "correct": _correct(labels, logits),
                "count": tf.cast(tf.shape(labels)[0], tf.float32)}

    return _distributed(strategy, model, replica_fn, configure, jit_compile, "eval_step")


def make_calibrate_step(strategy, model, *, training: bool = True) -> Callable:
    """LSQ step-size initialisation on every replica's shard of a batch: one forward in
    ``"calibrate"`` mode (see :func:`metamix_tf.quant.wrap.calibrate`); the step-size
    variables average over replicas. The modes are switched outside ``strategy.run``.

    ``training=True`` (the default: the steps start a training phase) calibrates on the
    activations the training steps will quantize, BatchNorm on batch statistics, with its
    moving statistics left as they were (:func:`frozen_batch_norm_statistics`). Moving
    statistics that do not describe the data yet (a briefly trained float model; Keras
    applications' momentum 0.999) would otherwise give steps that saturate nearly every
    training activation, and the saturated tensors' small variance makes each BatchNorm
    multiply the backward gradient by ``gamma / std``: ResNet-50 reached 1e10 at its
    first kernel at 2 bits, and a non-finite loss. ``training=False``: inference mode.

    The step runs eagerly, not as a ``tf.function``: a phase calls it once, and tracing and
    optimizing the whole model's forward for that call costs several times the eager
    forward."""

    def replica_fn(images):
        model(images, training=training)
        return tf.cast(tf.shape(images)[0], tf.float32)

    def step(images, labels):
        del labels
        saved = [(q, q.mode) for q in wrap.activation_quantizers(model)]
        wrap.set_mode(model, "calibrate")
        try:
            with (frozen_batch_norm_statistics(model) if training
                  else contextlib.nullcontext()):
                count = strategy.run(replica_fn, args=(images,))
        finally:
            for q, mode in saved:
                q.mode = mode
        return {"count": strategy.reduce(SUM, count, axis=None)}

    return step
