"""Loss functions of the training loop, per example so that ``tf.distribute`` can scale them.

Every loss here returns one value per example (shape ``[B]``); :func:`scale_loss` turns a
replica's per-example losses into its share of the global-batch mean, which the optimizers'
cross-replica gradient sum then completes. Terms that do not depend on the batch (the GBOPs
penalty) are divided by the replica count with :func:`scale_replica_term`.
"""

from __future__ import annotations

import tensorflow as tf

from metamix_tf.quant.ops import quant_dtype

__all__ = [
    "cross_entropy",
    "distillation",
    "task_loss",
    "scale_loss",
    "scale_replica_term",
    "cost_penalty",
]


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float = 0.0) -> tf.Tensor:
    """Softmax cross-entropy per example, ``-sum_c y_c log softmax(z)_c`` with
    ``y = (1 - e) onehot + e / C``.

    Gradient in the logits: ``softmax(z) - y``. Computed in float32 (float64 for float64
    logits).
    """
    logits = tf.cast(logits, quant_dtype(logits.dtype))
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    if not label_smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    num_classes = tf.shape(logits)[-1]
    targets = tf.one_hot(labels, num_classes, dtype=logits.dtype)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / tf.cast(num_classes,
                                                                           logits.dtype)
    return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)


def distillation(teacher_logits: tf.Tensor, logits: tf.Tensor,
                 temperature: float = 1.0) -> tf.Tensor:
    """Knowledge distillation per example (Hinton et al., 2015):
    ``T^2 * KL(softmax(t / T) || softmax(z / T))``.

    The teacher is a constant (no gradient). Gradient in the student logits:
    ``T * (softmax(z / T) - softmax(t / T))``.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature}")
    dtype = quant_dtype(logits.dtype)
    t = tf.stop_gradient(tf.cast(teacher_logits, dtype)) / temperature
    z = tf.cast(logits, dtype) / temperature
    p_teacher = tf.nn.softmax(t)
    kl = tf.reduce_sum(p_teacher * (tf.nn.log_softmax(t) - tf.nn.log_softmax(z)), axis=-1)
    return kl * (temperature**2)


def task_loss(labels: tf.Tensor, logits: tf.Tensor, teacher_logits: tf.Tensor | None = None,
              temperature: float = 1.0, label_smoothing: float = 0.0) -> tf.Tensor:
    """The per-example task loss: :func:`distillation` when ``teacher_logits`` are given,
    else :func:`cross_entropy`."""
    if teacher_logits is not None:
        return distillation(teacher_logits, logits, temperature)
    return cross_entropy(labels, logits, label_smoothing)


def scale_loss(per_example: tf.Tensor, global_batch_size) -> tf.Tensor:
    """``sum(per_example) / global_batch_size``: a replica's share of the global mean
    (``tf.nn.compute_average_loss``). Summed over replicas it is the mean over the global
    batch, whatever the number of replicas."""
    per_example = tf.cast(per_example, tf.float32)
    return tf.reduce_sum(per_example) / tf.cast(global_batch_size, tf.float32)


def scale_replica_term(term: tf.Tensor) -> tf.Tensor:
    """Divides a batch-independent loss term by the replica count (it is computed on every
    replica, and the optimizers sum gradients over replicas)."""
    context = tf.distribute.get_replica_context()
    replicas = 1 if context is None else context.num_replicas_in_sync
    return term / float(replicas)


def cost_penalty(gbops: tf.Tensor, target: float, weight: float,
                 normalization: str = "relative") -> tf.Tensor:
    """The bit-search cost term: ``weight * |gbops - target| / target`` (``"relative"``) or
    ``weight * |gbops - target|`` (``"absolute"``, the paper's form, lambda = 4 on ImageNet).

    The relative form makes ``weight`` (lambda) independent of the model's scale:
    lambda = 4 weighs a 10% miss of the target like a task-loss increase of 0.4, on a 0.1
    GBOPs MobileNet at 32 px as on a 5 GBOPs one at 224 px; the absolute one scales with the
    target (at 5.12 GBOPs it is 5.12x the relative one). Gradient in ``gbops``:
    ``weight * sign(gbops - target)``, divided by ``target`` in the relative form.
    """
    if not target > 0:
        raise ValueError(f"The GBOPs target must be > 0. Received: target={target}")
    if normalization == "relative":
        return weight * tf.abs(gbops - target) / target
    if normalization == "absolute":
        return weight * tf.abs(gbops - target)
    raise ValueError("`normalization` must be 'relative' or 'absolute'. "
                     f"Received: normalization={normalization!r}")
