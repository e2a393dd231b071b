"""Optimizers and learning-rate schedules of the phases.

:func:`make_optimizer`: Adam or SGD with momentum, with decoupled weight decay (AdamW) or a
coupled L2 term (PyTorch's ``weight_decay``, the paper's alpha optimizer);
:func:`cosine_schedule`: cosine decay after an optional linear warm-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

__all__ = ["OPTIMIZERS", "cosine_schedule", "make_optimizer"]


def cosine_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0):
    """Cosine decay from ``learning_rate`` to 0 over ``total_steps`` optimizer steps
    (``lr_t = lr * (1 + cos(pi * t / T)) / 2``), after an optional linear warm-up."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    if warmup_steps:
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total_steps - warmup_steps, warmup_target=learning_rate,
            warmup_steps=warmup_steps)
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps)


class _CoupledL2:
    """Adds ``l2 * v`` to the (replica-summed) gradient of every decayed variable before the
    optimizer's own update: PyTorch's ``weight_decay`` (an L2 term in the loss, so it passes
    through momentum and Adam's moments), unlike Keras' decoupled ``weight_decay``."""

    def _set_l2(self, l2: float, variables: Sequence) -> None:
        self.l2 = float(l2)
        self._l2_keys = {self._var_key(v) for v in variables}

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) in self._l2_keys:
            gradient = gradient + tf.cast(self.l2, gradient.dtype) * variable
        return super().update_step(gradient, variable, learning_rate)


class _L2Adam(_CoupledL2, keras.optimizers.Adam):
    pass


class _L2SGD(_CoupledL2, keras.optimizers.SGD):
    pass


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(learning_rate, variables: Sequence, *, weight_decay: float = 0.0,
                   beta_1: float = 0.9, beta_2: float = 0.999,
                   no_decay: Sequence = (), l2: float = 0.0, kind: str = "adam",
                   momentum: float = 0.9, nesterov: bool = True) -> keras.optimizers.Optimizer:
    """Adam (``kind="adam"``, ``beta_1``/``beta_2``) or SGD with momentum (``kind="sgd"``,
    ``momentum``, ``nesterov``), built for ``variables`` (call it under the strategy's scope).

    Two kinds of decay, both skipping the ``no_decay`` variables (BatchNorm parameters,
    biases, LSQ step sizes):

    * ``weight_decay``: decoupled, ``v -= lr * weight_decay * v`` each step (AdamW);
    * ``l2``: coupled, ``l2 * v`` added to the gradient before the update, as PyTorch's
      ``Adam(weight_decay=...)`` / ``SGD(weight_decay=...)`` (Adam then normalises it with
      the gradient: the paper's alpha setting ``Adam(lr=1e-4, weight_decay=1e-3)`` is
      ``l2=1e-3``).
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"`kind` must be one of {OPTIMIZERS}. Received: kind={kind!r}")
    for name, value in (("weight_decay", weight_decay), ("l2", l2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}")
    variables = list(variables)
    if kind == "adam":
        cls = _L2Adam if l2 else keras.optimizers.Adam
        optimizer = cls(learning_rate, beta_1=beta_1, beta_2=beta_2,
                        weight_decay=weight_decay or None, name=kind)
    else:
        cls = _L2SGD if l2 else keras.optimizers.SGD
        optimizer = cls(learning_rate, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay or None, name=kind)
    if weight_decay and no_decay:
        optimizer.exclude_from_weight_decay(var_list=list(no_decay))
    if l2:
        skip = {id(v) for v in no_decay}
        optimizer._set_l2(l2, [v for v in variables if id(v) not in skip])
    optimizer.build(variables)
    return optimizer
