"""The int32 bias grid of the int8 export, inside weight training.

An int8 TFLite conv adds its folded bias (BatchNorm folded as the export folds it,
:func:`metamix_tf.export.grids.fold_batch_norm`) as an int32 in units of
``u_c = input_step * weight_scale_c``. Rounding the biases onto that grid only after training
(:func:`metamix_tf.export.graph.snap_biases`) costs accuracy the network never saw;
:class:`BiasGrid` puts the rounding into training instead:

* forward: every folded bias ``b_c`` is replaced by ``round(b_c / u_c) * u_c``
  (:func:`round_to_grid`), i.e. the variable that adds to it (BatchNorm ``beta``, else the
  layer's bias: :func:`~metamix_tf.export.graph.bias_target`) is shifted by
  ``delta_c = round(b_c / u_c) * u_c - b_c`` for the step and shifted back after it;
* gradient: straight through: the loss gradient at the rounded bias is applied to the
  unrounded (latent) variable.

After training, :func:`~metamix_tf.export.graph.snap_biases` writes the rounded biases the
last steps computed with into the variables: the model's outputs do not change, and a second
snap moves nothing.

The weight scale depends on the export's weight storage (:data:`STORAGE_GRIDS`): ``"spread"``
stores the b-bit integers times a multiplier ``m_c`` that keeps them in ``[-127, 127]``, the
one whose bias grid ``u_c / m_c`` lies closest to the bias
(:func:`~metamix_tf.export.grids.spread_multiplier_for_bias`): a finer grid; ``"bits"``
stores the b-bit integers, ``u_c = input_step * folded_step_c``.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import keras
import tensorflow as tf

from metamix_tf.config import check_weight_storage
from metamix_tf.export import grids
from metamix_tf.quant import native, ops

__all__ = ["STORAGE_GRIDS", "TF_NUMPY", "check_storage", "round_to_grid", "bias_unit",
           "BiasGrid"]

# Export weight storage -> the bias grid it implies. A storage whose bias grid equals another's
# maps to that one (e.g. "int4": "bits").
STORAGE_GRIDS = {"spread": "spread", "bits": "bits", "int4": "bits"}

# The numpy functions the export's grid formulas use (metamix_tf.export.grids, ``xp=``), as
# TensorFlow ops: the same formulas inside a training step.
TF_NUMPY = types.SimpleNamespace(
    abs=tf.abs, sqrt=tf.sqrt, floor=tf.floor, round=tf.round, maximum=tf.maximum,
    where=tf.where, reshape=tf.reshape, ones_like=tf.ones_like, take=tf.gather,
    argmin=lambda x, axis: tf.argmin(x, axis=axis),
    asarray=lambda values, dtype: tf.constant(list(values), dtype),
    full_like=lambda x, value: tf.fill(tf.shape(x), tf.constant(value, x.dtype)))


check_storage = check_weight_storage  # the export's storages (metamix_tf.config)


def round_to_grid(x: tf.Tensor, unit: tf.Tensor) -> tf.Tensor:
    """``x`` rounded to the nearest multiple of ``unit`` (broadcast per channel).

    Forward: ``unit * round(x / unit)``. Gradient (straight-through estimator on ``round``
    only): ``dy`` to ``x``, ``dy * (round(x / unit) - x / unit)`` to ``unit``.
    """
    ratio = x / unit
    return unit * ops.straight_through(tf.round(ratio), ratio)


def bias_unit(input_step: tf.Tensor, folded_scale: tf.Tensor, largest: tf.Tensor,
              bias: tf.Tensor, weight_storage: str) -> tf.Tensor:
    """Per output channel, the int32 bias unit of an int8 conv with ``weight_storage``:
    ``input_step * folded_scale_c``, for the ``"spread"`` grid divided by the multiplier the
    export picks for ``bias_c`` (:func:`~metamix_tf.export.grids.spread_multiplier_for_bias`,
    ``largest_c`` the channel's largest absolute weight integer)."""
    unit = input_step * folded_scale
    if STORAGE_GRIDS[check_storage(weight_storage)] == "spread":
        unit = unit / grids.spread_multiplier_for_bias(bias, unit, largest, xp=TF_NUMPY)
    return unit


def _read(variable) -> tf.Tensor:
    return tf.convert_to_tensor(variable)


def _num(variable) -> tf.Tensor:
    return tf.reshape(tf.convert_to_tensor(variable), [-1])


class BiasGrid:
    """Fake-quantizes the folded biases of ``model`` (quantized layers in ``"selected"``
    mode, weight quantization on) onto the int32 grids of its int8 export with
    ``weight_storage`` (module docstring).

    Built from :func:`metamix_tf.export.graph.int8_bias_plan` (raises
    :class:`~metamix_tf.export.reader.UnsupportedModelError` where the model has no int8
    export); the grids are recomputed from the variables at every step, so they follow the
    learned steps, kernels and BatchNorm statistics. ``skipped``: folded layers whose bias
    stays float in training (an unfolded BatchNorm's, or one without a variable).
    """

    def __init__(self, model: keras.Model, weight_storage: str = "spread"):
        from metamix_tf.export import graph

        self.weight_storage = check_storage(weight_storage)
        export_plan = graph.int8_bias_plan(model, weight_storage)
        self._entries, self.skipped = [], sorted(export_plan.affine)
        for name, weights in export_plan.weights.items():
            target = graph.bias_target(model, weights)
            if target is None:
                self.skipped.append(name)
                continue
            bn = model.get_layer(weights.batch_norm) if weights.batch_norm else None
            self._entries.append((model.get_layer(name), bn, target))
        # the deltas as one function, traced once for every step :meth:`around` wraps
        self._deltas = tf.function(lambda: [delta for _, delta in self.shifts()],
                                   autograph=False)

    @property
    def layers(self) -> list:
        """Names of the layers whose folded bias is on the grid in training."""
        return [layer.name for layer, _, _ in self._entries]

    def _channels(self, layer, bn) -> tuple:
        """Per output channel of ``layer`` (each a flat float32 ``[C]``): the input step, the
        weight step, the largest absolute weight integer (the export's
        ``grids.kernel_integers``), the BatchNorm factor (1 without one) and the folded bias."""
        iq, wq = layer.input_quantizer, layer.kernel_quantizer
        input_step = tf.gather(tf.convert_to_tensor(iq.step_size),
                               tf.convert_to_tensor(iq.bit_index))
        step = tf.convert_to_tensor(wq.step_size)
        integers = tf.round(wq(layer.kernel) / step)
        axes = list(range(len(integers.shape) - wq.channel_axes))
        largest = tf.reshape(tf.reduce_max(tf.abs(integers), axis=axes), [-1])
        largest = tf.minimum(largest, float(grids.WEIGHT_QMAX))
        step = tf.reshape(step, [-1])
        bias = _num(layer.bias) if layer.use_bias else tf.zeros_like(step)
        if bn is None:
            factor, folded = tf.ones_like(step), bias
        else:
            gamma = _num(bn.gamma) if bn.scale else tf.ones_like(step)
            factor = grids.batch_norm_factor(gamma, _num(bn.moving_variance), bn.epsilon,
                                             xp=TF_NUMPY)
            beta = _num(bn.beta) if bn.center else tf.zeros_like(step)
            folded = (bias - _num(bn.moving_mean)) * factor + beta
        return tf.fill(tf.shape(step), input_step), step, largest, factor, folded

    def shifts(self) -> list:
        """``[(variable, delta)]``: what moves each folded bias onto its grid now,
        ``delta_c = round(b_c / u_c) * u_c - b_c``. The grid formulas run once on every
        layer's channels concatenated (element for element the same float32 operations as
        layer by layer, in a graph a fraction of the size); the weight quantizers on the
        native kernels where the step functions use them (no XLA compilation per kernel
        shape)."""
        if not self._entries:
            return []
        with native.enabled_in():
            parts = [self._channels(layer, bn) for layer, bn, _ in self._entries]
        input_step, step, largest, factor, folded = (tf.concat(column, axis=0)
                                                     for column in zip(*parts, strict=True))
        largest = tf.where(step * factor == 0, tf.zeros_like(largest), largest)
        unit = bias_unit(input_step, grids.folded_scale(step, factor, xp=TF_NUMPY), largest,
                         folded, self.weight_storage)
        delta = tf.stop_gradient(round_to_grid(folded, unit) - folded)
        sizes = [int(part[1].shape[0]) for part in parts]
        return [(target, tf.reshape(d, tf.shape(target)))
                for (_, _, target), d in zip(self._entries, tf.split(delta, sizes),
                                             strict=True)]

    def around(self, step_fn: Callable) -> Callable:
        """``step_fn(images, labels)`` run with every folded bias on its grid: the bias
        variables are shifted by :meth:`shifts` before it and back after it (so an optimizer
        step inside it updates the latent biases with the gradient at the rounded ones)."""

        def step(images, labels):
            moves = list(zip((target for _, _, target in self._entries), self._deltas(),
                             strict=True))
            latent = [tf.identity(_read(variable)) for variable, _ in moves]
            with tf.control_dependencies(latent):
                ops_ = [variable.assign_add(delta) for variable, delta in moves]
            with tf.control_dependencies(ops_):
                shifted = [tf.identity(_read(variable)) for variable, _ in moves]
            with tf.control_dependencies(shifted):
                out = step_fn(images, labels)
            with tf.control_dependencies(tf.nest.flatten(out)):
                # latent + the step's update: exactly the latent value when nothing updated
                # it (evaluation changes no state)
                undone = [variable.assign(old + (_read(variable) - new))
                          for (variable, _), old, new in zip(moves, latent, shifted,
                                                              strict=True)]
            with tf.control_dependencies(undone):
                return tf.nest.map_structure(tf.identity, out)

        step.__name__ = f"on_bias_grid_{getattr(step_fn, '__name__', 'step')}"
        return tf.function(step, reduce_retracing=True, autograph=False)
