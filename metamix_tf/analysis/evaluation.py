"""Evaluation at fixed bits: BatchNorm re-estimation and per-image predictions.

After a search the BatchNorm moving statistics are those the search left: MetaMix's come
from its bit-meta passes (every layer at one candidate in turn), the joint searcher's from
the mixture, uniform LSQ's from its own bit-width; none is the statistic of the selected
bits. :func:`reestimate_batch_norm` replaces them, for every method alike, by the average
over training batches of each BatchNorm's batch mean and (biased) batch variance with the
model at the selected bits (Keras' training-mode statistics); weights, step sizes and bit
logits are untouched. :func:`predictions` gives the per-image predicted classes, for
paired comparisons of two models on the same images.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.quant import wrap
from metamix_tf.training import steps
from metamix_tf.training.batch_norm import batch_norm_layers

__all__ = ["batch_norm_layers", "reestimate_batch_norm", "predictions"]


def _bits(model, bits: dict | None) -> dict:
    return dict(wrap.get_bits(model) if bits is None else bits)


def reestimate_batch_norm(model, batches, *, bits: dict | None = None,
                          num_batches: int = 50) -> int:
    """Sets every BatchNorm's moving mean / variance to the average over ``num_batches``
    batches of ``(images, labels)`` (an iterable, e.g. the training ``tf.data``) of its
    batch mean / biased batch variance, with ``model(x, training=True)`` at ``bits`` (layer
    name -> activation bits; default: the selected bits). Leaves ``model`` in ``"selected"``
    mode at ``bits``; returns the number of batches used.

    Each pass runs with momentum 0 (moving = this batch's statistics, read back after the
    pass); the batches' values are averaged in float64 and assigned at the end.
    """
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"`num_batches` must be an integer >= 1. "
                         f"Received: num_batches={num_batches!r}")
    norms = batch_norm_layers(model)
    bits = _bits(model, bits)
    configure = steps.fixed_bits(model, bits)
    momenta = [bn.momentum for bn in norms]
    sums = [[np.zeros(bn.moving_mean.shape, np.float64),
             np.zeros(bn.moving_variance.shape, np.float64)] for bn in norms]
    used = 0
    try:
        for bn in norms:
            bn.momentum = 0.0

        @tf.function(autograph=False, reduce_retracing=True)
        def forward(images):
            configure()
            model(images, training=True)
            return tf.constant(0.0)

        for images, _ in batches:
            forward(images)
            for total, bn in zip(sums, norms, strict=True):
                total[0] += keras.ops.convert_to_numpy(bn.moving_mean)
                total[1] += keras.ops.convert_to_numpy(bn.moving_variance)
            used += 1
            if used == num_batches:
                break
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
    if used == 0:
        raise ValueError("`batches` yielded no batch. Received: an empty iterable")
    for (mean, var), bn in zip(sums, norms, strict=True):
        bn.moving_mean.assign((mean / used).astype(np.float32))
        bn.moving_variance.assign((var / used).astype(np.float32))
    wrap.select_bits(model, bits)
    return used


def predictions(model, dataset, *, bits: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted classes, labels)`` of every image of ``dataset`` (batches of ``(images,
    labels)``, in order) with ``model(x, training=False)`` at ``bits`` (default: the selected
    bits); int32 arrays of the dataset's length. Leaves ``model`` in ``"selected"`` mode at
    ``bits``."""
    bits = _bits(model, bits)
    configure = steps.fixed_bits(model, bits)

    @tf.function(autograph=False, reduce_retracing=True)
    def predict(images):
        configure()
        return tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)

    predicted, labels = [], []
    for images, batch_labels in dataset:
        predicted.append(predict(images).numpy())
        labels.append(np.asarray(batch_labels, np.int32))
    wrap.select_bits(model, bits)
    if not predicted:
        raise ValueError("`dataset` yielded no batch. Received: an empty dataset")
    return np.concatenate(predicted), np.concatenate(labels)
