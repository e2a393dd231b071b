"""Optimizers and learning-rate schedules of the phases.

:func:`make_optimizer`: Adam or SGD with momentum, with decoupled weight decay (AdamW) or a
coupled L2 term (PyTorch's ``weight_decay``, the paper's alpha optimizer), and LSQ step sizes
whose updates are bounded relative to their value; :func:`cosine_schedule`: cosine decay
after an optional linear warm-up.

Each update runs on TensorFlow's fused training kernels (``ResourceApplyAdam``,
``ResourceApplyKerasMomentum``, ``ResourceApplyGradientDescent``: one op per variable where
Keras' ``update_step`` builds about a dozen, each a pass over the variable), where they
compute Keras' update: dense gradients and a scalar learning rate (not the LSQ step sizes'
element-wise one), no AMSGrad. The scalars those updates share (the scheduled learning
rate, Adam's ``b^t``, the dtype casts, the weight decay's factors) are built once per step
and device (:class:`_StepScalars`) where Keras builds them once per variable.
``METAMIX_TF_FUSED_OPTIMIZER=0`` (read while a step traces) keeps Keras' ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from metamix_tf.config import switched_on

__all__ = ["OPTIMIZERS", "cosine_schedule", "make_optimizer"]


def cosine_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                    final_fraction: float = 0.0):
    """Cosine decay from ``learning_rate`` to ``final_fraction * learning_rate`` over
    ``total_steps`` optimizer steps (``lr_t = lr * (f + (1 - f) * (1 + cos(pi * t / T)) / 2)``),
    after an optional linear warm-up; ``final_fraction=1`` holds ``learning_rate`` (SWA)."""
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"`final_fraction` must be in [0, 1]. "
                         f"Received: final_fraction={final_fraction!r}")
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    if warmup_steps:
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total_steps - warmup_steps, alpha=final_fraction,
            warmup_target=learning_rate, warmup_steps=warmup_steps)
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps,
                                                  alpha=final_fraction)


class _CoupledL2:
    """Adds ``l2 * v`` to the (replica-summed) gradient of every decayed variable before the
    optimizer's own update: PyTorch's ``weight_decay`` (an L2 term in the loss, so it passes
    through momentum and Adam's moments), unlike Keras' decoupled ``weight_decay``."""

    l2 = 0.0
    _l2_keys: frozenset = frozenset()

    def _set_l2(self, l2: float, variables: Sequence) -> None:
        self.l2 = float(l2)
        self._l2_keys = {self._var_key(v) for v in variables}

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) in self._l2_keys:
            gradient = gradient + tf.cast(self.l2, gradient.dtype) * variable
        return super().update_step(gradient, variable, learning_rate)


class _RelativeSteps:
    """Learning rate ``min(lr, max_relative * s)`` (element-wise) for the LSQ step sizes ``s``.

    Adam moves every variable by about ``lr`` per update whatever its gradient's scale, so a
    step size smaller than the learning rate (a squeeze-and-excitation pooling output, a
    tensor whose values are ~1e-3) crossed zero in one update and sat at the
    :class:`~metamix_tf.quant.quantizers.MinimumStep` floor: a tensor quantized to zero, and
    a 1e-8 scale that XNNPACK refuses in the int8 file. Bounded, a step moves by about
    ``max_relative`` of itself at most (Adam's normalised update is ~1), so it can shrink
    geometrically when its gradient says so, and never collapses in one update. Steps above
    ``lr / max_relative`` train exactly as before."""

    _relative_keys: frozenset = frozenset()

    def _set_relative(self, max_relative: float, variables: Sequence) -> None:
        self.max_relative = float(max_relative)
        self._relative_keys = {self._var_key(v) for v in variables}

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) in self._relative_keys:
            bound = tf.cast(self.max_relative, variable.dtype) * tf.convert_to_tensor(variable)
            learning_rate = tf.minimum(tf.cast(learning_rate, variable.dtype), bound)
        return super().update_step(gradient, variable, learning_rate)


def _fusable(gradient, variable, learning_rate) -> bool:
    """Whether a fused kernel computes Keras' update of ``variable`` here."""
    return (switched_on("METAMIX_TF_FUSED_OPTIMIZER")
            and not isinstance(gradient, tf.IndexedSlices)
            and tf.as_dtype(variable.dtype).is_floating
            and tf.convert_to_tensor(learning_rate).shape.rank == 0)


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras or TensorFlow variable (inside tf.distribute's
    ``update``: the current device's copy)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


class _StepScalars:
    """One optimizer step's shared scalars built once per device, not once per variable.

    Keras builds, for every variable, the learning rate (its whole schedule again for each
    decayed variable), the casts of its constants and Adam's ``b1^t``, ``b2^t``: with 287
    variables (MobileNetV2) about 4,000 ops that Python traces and Grappler then merges.
    :meth:`_once` keeps them for the rest of the step, keyed by the learning-rate tensor
    the update receives (one per device under ``tf.distribute``) and the dtype. The decoupled
    weight decay reads the learning rate once (as the update step does) and computes Keras'
    ``v -= v * wd * lr`` in Keras' order: the same values."""

    _scalars: dict | None = None

    def _backend_apply_gradients(self, grads, trainable_variables):
        self._scalars = {}
        try:
            super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            self._scalars = None

    def _once(self, name: str, learning_rate, dtype, make):
        """``make()``, built once per step for (``name``, ``learning_rate``, ``dtype``)."""
        if self._scalars is None:
            return make()
        key = (name, id(learning_rate), tf.as_dtype(dtype).name)
        if key not in self._scalars:  # the tensor is kept so that its id is not reused
            self._scalars[key] = (learning_rate, make())
        return self._scalars[key][1]

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None or not switched_on("METAMIX_TF_FUSED_OPTIMIZER"):
            return super()._apply_weight_decay(variables)

        def decay(variable, learning_rate):
            if self._use_weight_decay(variable):
                wd, lr = self._once("decay", learning_rate, variable.dtype, lambda: (
                    tf.cast(self.weight_decay, variable.dtype),
                    tf.cast(learning_rate, variable.dtype)))
                variable.assign_sub(variable * wd * lr)

        def distributed(distribution, variables, learning_rate):
            for variable in variables:
                distribution.extended.update(
                    variable.value if isinstance(variable, keras.Variable) else variable,
                    decay, args=(learning_rate,), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            distributed, self._distribution_strategy, variables, self.learning_rate)


class _FusedAdam(_StepScalars, keras.optimizers.Adam):
    """Keras' Adam update as ``ResourceApplyAdam``: ``m += (g - m) * (1 - b1)``, ``v += (g^2
    - v) * (1 - b2)``, ``w -= m * a / (sqrt(v) + eps)`` with ``a = lr * sqrt(1 - b2^t) / (1 -
    b1^t)``, the same operations in the same order, except that ``1 - b1`` and ``1 - b2``
    are taken in the variable's precision (as tf.keras 2's Adam did) where Keras rounds them
    from Python floats: ``1 - 0.999f`` is 1.3e-5 off 0.001, so the second moment moves by
    that fraction differently (the first by 2.2e-7)."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not _fusable(gradient, variable, learning_rate):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)

        def scalars():
            local_step = tf.cast(self.iterations + 1, dtype)
            beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            return dict(beta1_power=tf.pow(beta_1, local_step),
                        beta2_power=tf.pow(beta_2, local_step),
                        lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                        epsilon=tf.cast(self.epsilon, dtype))

        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]), grad=tf.cast(gradient, dtype),
            **self._once("adam", learning_rate, dtype, scalars))


class _FusedSGD(_StepScalars, keras.optimizers.SGD):
    """Keras' SGD update as ``ResourceApplyKerasMomentum`` (``m = m * mu - g * lr``, then ``w
    += m * mu - g * lr`` with Nesterov, ``w += m`` without) or, without momentum,
    ``ResourceApplyGradientDescent`` (``w -= g * lr``): Keras' operations, values bit for
    bit."""

    def update_step(self, gradient, variable, learning_rate):
        if not _fusable(gradient, variable, learning_rate):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        lr = self._once("lr", learning_rate, dtype, lambda: tf.cast(learning_rate, dtype))
        gradient = tf.cast(gradient, dtype)
        if self.momentum == 0:
            tf.raw_ops.ResourceApplyGradientDescent(var=_handle(variable), alpha=lr,
                                                    delta=gradient)
            return
        accum = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(accum), lr=lr, grad=gradient,
            momentum=self._once("momentum", learning_rate, dtype,
                                lambda: tf.cast(self.momentum, dtype)),
            use_nesterov=self.nesterov)


class _Adam(_CoupledL2, _RelativeSteps, _FusedAdam):
    pass


class _SGD(_CoupledL2, _RelativeSteps, _FusedSGD):
    pass


OPTIMIZERS = ("adam", "sgd")
MAX_RELATIVE_STEP_UPDATE = 0.1


def make_optimizer(learning_rate, variables: Sequence, *, weight_decay: float = 0.0,
                   beta_1: float = 0.9, beta_2: float = 0.999,
                   no_decay: Sequence = (), l2: float = 0.0, kind: str = "adam",
                   momentum: float = 0.9, nesterov: bool = True, step_sizes: Sequence = (),
                   max_relative_step_update: float = MAX_RELATIVE_STEP_UPDATE,
                   ) -> keras.optimizers.Optimizer:
    """Adam (``kind="adam"``, ``beta_1``/``beta_2``) or SGD with momentum (``kind="sgd"``,
    ``momentum``, ``nesterov``), built for ``variables`` (call it under the strategy's scope).

    Two kinds of decay, both skipping the ``no_decay`` variables (BatchNorm parameters,
    biases, LSQ step sizes):

    * ``weight_decay``: decoupled, ``v -= lr * weight_decay * v`` each step (AdamW);
    * ``l2``: coupled, ``l2 * v`` added to the gradient before the update, as PyTorch's
      ``Adam(weight_decay=...)`` / ``SGD(weight_decay=...)`` (Adam then normalises it with
      the gradient: the paper's alpha setting ``Adam(lr=1e-4, weight_decay=1e-3)`` is
      ``l2=1e-3``).

    ``step_sizes`` (LSQ step sizes among ``variables``) get the learning rate
    ``min(lr, max_relative_step_update * s)`` element-wise (see :class:`_RelativeSteps`).
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"`kind` must be one of {OPTIMIZERS}. Received: kind={kind!r}")
    for name, value in (("weight_decay", weight_decay), ("l2", l2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}")
    if not max_relative_step_update > 0:
        raise ValueError("`max_relative_step_update` must be > 0. "
                         f"Received: max_relative_step_update={max_relative_step_update!r}")
    variables = list(variables)
    if kind == "adam":
        optimizer = _Adam(learning_rate, beta_1=beta_1, beta_2=beta_2,
                          weight_decay=weight_decay or None, name=kind)
    else:
        optimizer = _SGD(learning_rate, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay or None, name=kind)
    if weight_decay and no_decay:
        optimizer.exclude_from_weight_decay(var_list=list(no_decay))
    optimizer._set_relative(max_relative_step_update, step_sizes)
    if l2:
        skip = {id(v) for v in no_decay}
        optimizer._set_l2(l2, [v for v in variables if id(v) not in skip])
    optimizer.build(variables)
    return optimizer
