"""Keras layers around :mod:`metamix_tf.quant.ops`: the multi-branch activation quantizer and the
per-channel weight quantizer.

Modes of :class:`ActivationQuantizer` (``quantizer.mode``, a Python attribute read when a
step function is traced, so each training phase traces its function once):

* ``"float"``: identity (bypass).
* ``"uniform"``: branch ``quantizer.uniform_index`` (a Python int; the bit-meta passes set
  every quantizer of the model to the same candidate).
* ``"mixture"``: ``sum_k softmax(alpha / T)_k * q_k(x)`` (the bit-search pass).
* ``"selected"``: the branch in the ``bit_index`` variable (set from argmax(alpha) or by
  hand), with that branch's own learned step size. Changing the bits does not retrace.
* ``"calibrate"``: identity that also sets every branch's step size to the LSQ initial
  value ``2 * mean|x| / sqrt(Qp)`` from this batch (averaged over replicas).

Keras' ``trainable`` flag of each variable follows the mode, so that ``compile`` + ``fit``
trains only what the mode uses: the bit logits in ``"mixture"`` mode (searchable quantizers
only), the step sizes in ``"uniform"``, ``"mixture"`` and ``"selected"`` mode, a weight
quantizer's steps while it is enabled. The flag is Keras' own: the underlying
``tf.Variable`` keeps the trainability it was created with, so ``tf.GradientTape`` watches
these variables as before and the custom step functions do not depend on the mode at call
time.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.config import validate_bits
from metamix_tf.quant import native, ops

__all__ = ["ActivationQuantizer", "WeightQuantizer", "MinimumStep", "MODES"]

MODES = ("float", "uniform", "mixture", "selected", "calibrate")
_STEP_MODES = ("uniform", "mixture", "selected")  # modes that use the learned step sizes
GRAD_SCALES = ("per_sample", "per_batch", "none")


@keras.saving.register_keras_serializable(package="metamix_tf")
class MinimumStep(keras.constraints.Constraint):
    """Keeps LSQ step sizes at or above ``minimum`` after every optimizer update:
    ``s <- max(s, minimum)``. A learned step that crossed zero would flip its grid (and an
    int8 scale must be positive); a large step-size gradient can do that in one update."""

    def __init__(self, minimum: float = 1e-8):
        self.minimum = float(minimum)

    def __call__(self, w):
        return keras.ops.maximum(w, self.minimum)

    def get_config(self):
        return {"minimum": self.minimum}


def _check_grad_scale(grad_scale: str) -> str:
    if grad_scale not in GRAD_SCALES:
        raise ValueError(f"`grad_scale` must be one of {GRAD_SCALES}. "
                         f"Received: grad_scale={grad_scale!r}")
    return grad_scale


@keras.saving.register_keras_serializable(package="metamix_tf")
class ActivationQuantizer(keras.layers.Layer):
    """Multi-branch LSQ activation quantizer with one trainable bit logit per branch.

    Args:
      candidate_bits: bit-widths of the branches (each in [2, 16], no duplicates); one
        branch means a fixed bit-width that the search leaves alone.
      signed: signed grid ``[-2^(b-1), 2^(b-1) - 1]`` for inputs that can be negative,
        unsigned ``[0, 2^b - 1]`` otherwise.
      grad_scale: LSQ gradient scale ``g = 1/sqrt(N*Qp)`` with ``N`` the elements per
        sample (``"per_sample"``), per batch (``"per_batch"``) or ``g = 1`` (``"none"``).
      temperature: softmax temperature of the mixture and the expected bits.
      mode: initial mode, one of :data:`MODES`.
      kernel_rounding: ``{"unit": [...], "scale": [...], "step": s, "offset": z}``,
        ``{"unit": [...], "multiplier": [...], "shift": [...], "step": s}``,
        ``{"reciprocal": r, "step": s}`` or None; see :meth:`set_kernel_rounding`,
        :meth:`set_fixed_point_rounding` and :meth:`set_input_rounding`.
    """

    def __init__(self, candidate_bits: Sequence[int] = (2, 3, 4, 8), signed: bool = False,
                 grad_scale: str = "per_sample", temperature: float = 1.0,
                 mode: str = "float", kernel_rounding: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if candidate_bits is None or len(tuple(candidate_bits)) == 0:
            raise ValueError("`candidate_bits` must list at least one bit-width. "
                             f"Received: candidate_bits={candidate_bits!r}")
        bits = tuple(validate_bits("candidate_bits", b) for b in candidate_bits)
        if len(set(bits)) != len(bits):
            raise ValueError(f"`candidate_bits` has duplicates. Received: candidate_bits={bits}")
        self.candidate_bits = tuple(sorted(bits))
        self.signed = bool(signed)
        self.grad_scale = _check_grad_scale(grad_scale)
        self.temperature = float(temperature)
        self.mode = mode
        self.uniform_index = len(self.candidate_bits) - 1
        ranges = [ops.quant_range(b, self.signed) for b in self.candidate_bits]
        self._qn = np.array([r[0] for r in ranges], np.float32)
        self._qp = np.array([r[1] for r in ranges], np.float32)
        self.kernel_rounding = None
        if kernel_rounding is not None and "reciprocal" in kernel_rounding:
            self.set_input_rounding(1.0 / kernel_rounding["reciprocal"],
                                    kernel_rounding["step"])
        elif kernel_rounding is not None and "multiplier" in kernel_rounding:
            self.set_fixed_point_rounding(kernel_rounding["unit"], kernel_rounding["multiplier"],
                                          kernel_rounding["shift"], kernel_rounding["step"])
        elif kernel_rounding is not None:
            self.set_kernel_rounding(kernel_rounding["unit"], kernel_rounding["scale"],
                                     kernel_rounding["step"], kernel_rounding.get("offset", 0))

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str):
        if value not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: mode={value!r}")
        self._mode = value
        self._sync_trainable()

    def _sync_trainable(self) -> None:
        """Keras' ``trainable`` flags follow the mode (see the module docstring)."""
        if not hasattr(self, "alpha"):  # not built yet; build() calls this again
            return
        self.alpha.trainable = self.searchable and self._mode == "mixture"
        self.step_size.trainable = self._mode in _STEP_MODES

    @property
    def num_branches(self) -> int:
        return len(self.candidate_bits)

    @property
    def searchable(self) -> bool:
        """Whether the bit search has a choice to make here (more than one branch)."""
        return self.num_branches > 1

    def build(self, input_shape):
        k = self.num_branches
        self.step_size = self.add_weight(
            name="step_size", shape=(k,), initializer="ones", trainable=True,
            aggregation="mean", constraint=MinimumStep())
        # A single branch has nothing to search: its logit is not trainable, so that
        # wrap.variable_groups partitions the model's trainable variables.
        self.alpha = self.add_weight(
            name="alpha", shape=(k,), initializer="zeros", trainable=self.searchable)
        self.bit_index = self.add_weight(
            name="bit_index", shape=(), dtype="int32", trainable=False,
            initializer=keras.initializers.Constant(k - 1))
        self.initialized = self.add_weight(
            name="initialized", shape=(), trainable=False, initializer="zeros",
            aggregation="mean")
        self._sync_trainable()

    def _grad_scales(self, x):
        """Per-branch LSQ gradient scales: a numpy array when the shape is known, else a
        tensor in ``x``'s dtype."""
        if self.grad_scale == "none":
            return np.ones([self.num_branches], x.dtype.as_numpy_dtype)
        dims = x.shape[1:] if self.grad_scale == "per_sample" else x.shape
        if dims.is_fully_defined():
            n = float(np.prod(dims.as_list()))
            return (1.0 / np.sqrt(n * self._qp.astype(np.float64))).astype(
                x.dtype.as_numpy_dtype)
        shape = tf.shape(x)
        n = tf.reduce_prod(shape[1:]) if self.grad_scale == "per_sample" else tf.size(x)
        return tf.cast(ops.lsq_grad_scale(n, self._qp), x.dtype)

    def probabilities(self) -> tf.Tensor:
        """``softmax(alpha / T)``, the branch probabilities of the mixture."""
        return tf.nn.softmax(tf.convert_to_tensor(self.alpha) / self.temperature)

    def compute_output_shape(self, input_shape):
        # The output spec from the shape, not from tracing ``call``: Keras marks the product of
        # a tensor and a Python number as sparse (``ops.numpy.Multiply``; MobileNetV3's
        # hard-sigmoid ``relu6(x + 3) * (1 / 6)``), and ``call`` cannot trace a sparse input,
        # so such a wrapped model saved but did not load.
        return input_shape

    def call(self, inputs, training=None):
        mode = self._mode
        if mode == "float":
            return inputs
        x = tf.cast(inputs, ops.quant_dtype(inputs.dtype))
        if mode == "calibrate":
            self.step_size.assign(tf.stack(
                [ops.lsq_init_step(x, qp) for qp in self._qp]))
            self.initialized.assign(1.0)
            return inputs
        if mode == "mixture" and self.searchable:
            y = ops.lsq_mixture(x, tf.cast(self.step_size, x.dtype),
                                tf.cast(self.probabilities(), x.dtype), self._qn, self._qp,
                                self._grad_scales(x))
            return tf.cast(y, inputs.dtype)
        step, qn, qp, scale = self._branch(x)
        y = ops.lsq_quantize(x, step, qn, qp, scale)
        if self.kernel_rounding is not None and mode == "selected" and not training:
            y = self._kernel_rounded(x, y, step, qn, qp)
        return tf.cast(y, inputs.dtype)

    def _branch(self, x) -> tuple:
        """``(step, qn, qp, grad_scale)`` of the one branch that the mode runs (all but a
        searchable quantizer's mixture): the branch in ``bit_index`` for a searchable
        quantizer in ``"selected"`` mode, else one fixed while tracing (one branch:
        ``"selected"`` or ``"mixture"`` is that)."""
        steps, scales = tf.cast(self.step_size, x.dtype), self._grad_scales(x)
        if self._mode == "selected" and self.searchable:  # the branch in a variable
            index = tf.convert_to_tensor(self.bit_index)
            return (tf.gather(steps, index), tf.gather(self._qn, index),
                    tf.gather(self._qp, index), tf.gather(scales, index))
        index = self.uniform_index if self._mode == "uniform" else 0
        return steps[index], self._qn[index], self._qp[index], scales[index]

    def single_branch(self, inputs) -> tuple | None:
        """``(step, qn, qp, grad_scale)`` when this quantizer would run one LSQ branch on
        ``inputs`` on the native kernels (a training or evaluation step of
        :mod:`metamix_tf.training.steps`, float32, no kernel rounding), so that a layer can
        take the quantizer and its linear op together (:func:`metamix_tf.quant.ops.lsq_linear`);
        None otherwise."""
        if (self._mode not in _STEP_MODES or (self._mode == "mixture" and self.searchable)
                or self.kernel_rounding is not None or inputs.dtype != tf.float32
                or native.active(inputs) is None):
            return None
        return self._branch(inputs)

    # -- the int8 kernels' rounding --------------------------------------------------------
    def set_kernel_rounding(self, unit, scale, step: float | None = None,
                            offset: int = 0) -> None:
        """Makes inference (``"selected"`` mode, ``training`` false) round as the int8
        kernel that writes this tensor does: :func:`ops.requantize_accumulator` with
        ``unit = s_in * s_w``, ``scale = unit / s_out`` per output channel (float32) and
        ``offset``, in place of ``round(x / s)``; the two differ only where float32 noise
        puts ``x / s`` on the other side of a rounding boundary (or on an exact tie the
        kernel breaks another way). It applies while the selected step is ``step``
        (default: the selected step now), so new bits or steps turn it off. A Python
        attribute, in the config: functions traced before are not changed.
        ``metamix_tf.export.kernel_rounding.set_kernel_rounding`` sets it from an export
        plan."""
        unit = np.asarray(unit, np.float64).reshape(-1)
        scale = np.asarray(scale, np.float32).reshape(-1)
        if unit.shape != scale.shape or not (np.all(unit > 0) and np.all(scale > 0)):
            raise ValueError(f"Quantizer '{self.name}': `unit` and `scale` must be positive "
                             f"and of one length. Received: {unit.shape}, {scale.shape}")
        step = self.selected_step if step is None else step
        self.kernel_rounding = {"unit": unit.tolist(), "scale": scale.astype(float).tolist(),
                                "step": float(np.float32(step)), "offset": int(offset)}

    def set_fixed_point_rounding(self, unit, multiplier, shift,
                                 step: float | None = None) -> None:
        """As :meth:`set_kernel_rounding`, for a kernel that requantizes in fixed point
        (LiteRT's builtin conv kernels, which run the INT4-filter convs):
        :func:`ops.fixed_point_requantize` with per-channel ``multiplier`` and ``shift``
        (:func:`metamix_tf.export.kernels.builtin_conv_params`)."""
        unit = np.asarray(unit, np.float64).reshape(-1)
        multiplier = np.asarray(multiplier, np.int64).reshape(-1)
        shift = np.asarray(shift, np.int64).reshape(-1)
        if not (unit.shape == multiplier.shape == shift.shape and np.all(unit > 0)
                and np.all((multiplier >= 0) & (multiplier < 2 ** 31))
                and np.all((shift >= -31) & (shift <= 30))):
            raise ValueError(f"Quantizer '{self.name}': `unit` must be positive, "
                             "`multiplier` in [0, 2^31), `shift` in [-31, 30], all of one "
                             f"length. Received: {unit.shape}, {multiplier.shape}, "
                             f"{shift.shape}")
        step = self.selected_step if step is None else step
        self.kernel_rounding = {"unit": unit.tolist(), "multiplier": multiplier.tolist(),
                                "shift": shift.tolist(), "step": float(np.float32(step))}

    def set_input_rounding(self, scale: float, step: float | None = None) -> None:
        """Makes inference round a float model input as the int8 QUANTIZE kernel does:
        ``round(float32(x * float32(1 / scale)))`` (a multiplication by the reciprocal of
        the int8 scale, not a division), clipped; otherwise as :meth:`set_kernel_rounding`."""
        step = self.selected_step if step is None else step
        self.kernel_rounding = {"reciprocal": float(np.float32(1.0) / np.float32(scale)),
                                "step": float(np.float32(step))}

    def clear_kernel_rounding(self) -> None:
        self.kernel_rounding = None

    def _kernel_rounded(self, x, y, step, qn, qp):
        rounding = self.kernel_rounding
        if "reciprocal" in rounding:
            q = tf.stop_gradient(tf.clip_by_value(
                tf.round(x * tf.constant(rounding["reciprocal"], x.dtype)), -qn, qp))
        elif "multiplier" in rounding:
            q = ops.fixed_point_requantize(x, np.asarray(rounding["unit"], np.float64),
                                           rounding["multiplier"], rounding["shift"], qn, qp)
        else:
            q = ops.requantize_accumulator(x, np.asarray(rounding["unit"], np.float64),
                                           np.asarray(rounding["scale"], np.float32), qn, qp,
                                           float(rounding["offset"]))
        current = tf.equal(step, tf.constant(rounding["step"], step.dtype))
        return tf.where(current, q * step, y)

    # -- bits ------------------------------------------------------------------------------
    def index_of(self, bits: int) -> int:
        """Branch index of ``bits``; raises if it is not a candidate."""
        if bits not in self.candidate_bits:
            raise ValueError(f"{bits} bits is not a candidate of quantizer '{self.name}' "
                             f"(candidates {self.candidate_bits}). Received: bits={bits}")
        return self.candidate_bits.index(bits)

    @property
    def selected_bits(self) -> int:
        """Bit-width of the selected branch (``bit_index``)."""
        return self.candidate_bits[int(self.bit_index.numpy())]

    @property
    def argmax_bits(self) -> int:
        """Bit-width with the largest alpha."""
        return self.candidate_bits[int(np.argmax(keras.ops.convert_to_numpy(self.alpha)))]

    def select(self, bits: int | None = None) -> int:
        """Sets ``bit_index`` to ``bits`` (or argmax(alpha) when None); returns the bits."""
        bits = self.argmax_bits if bits is None else int(bits)
        self.bit_index.assign(self.index_of(bits))
        return bits

    @property
    def selected_step(self) -> float:
        """Learned step size of the selected branch."""
        return float(keras.ops.convert_to_numpy(self.step_size)[int(self.bit_index.numpy())])

    def get_config(self):
        config = super().get_config()
        config.update(candidate_bits=list(self.candidate_bits), signed=self.signed,
                      grad_scale=self.grad_scale, temperature=self.temperature,
                      mode=self.mode, kernel_rounding=self.kernel_rounding)
        return config


@keras.saving.register_keras_serializable(package="metamix_tf")
class WeightQuantizer(keras.layers.Layer):
    """Per-output-channel signed LSQ quantizer for a kernel, with a fixed bit-width.

    Forward (when ``enabled``): ``round(clip(w / s_c, -2^(b-1), 2^(b-1) - 1)) * s_c`` with
    one step ``s_c`` per output channel; identity when disabled. Gradients as in
    :func:`metamix_tf.quant.ops.lsq_quantize`, with ``g = 1/sqrt(N * Qp)``, ``N`` the kernel
    elements per output channel.

    Args:
      bits: weight bit-width in [2, 16].
      channel_axes: number of trailing kernel axes that index an output channel (1 for
        Conv2D ``[kh, kw, cin, cout]`` and Dense ``[in, out]``; 2 for DepthwiseConv2D
        ``[kh, kw, cin, multiplier]``).
      enabled: initial on/off state (a Python attribute switched per phase).
    """

    def __init__(self, bits: int = 4, channel_axes: int = 1, enabled: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.bits = validate_bits("bits", bits)
        if channel_axes not in (1, 2):
            raise ValueError("`channel_axes` must be 1 or 2. "
                             f"Received: channel_axes={channel_axes}")
        self.channel_axes = channel_axes
        self._enabled = bool(enabled)
        self.qn, self.qp = ops.quant_range(self.bits, signed=True)

    def build(self, kernel_shape):
        kernel_shape = tuple(kernel_shape)
        self._reduce_axes = tuple(range(len(kernel_shape) - self.channel_axes))
        self.step_size = self.add_weight(
            name="step_size", shape=kernel_shape[-self.channel_axes:], initializer="ones",
            trainable=True, constraint=MinimumStep())
        self._per_channel = int(np.prod([kernel_shape[a] for a in self._reduce_axes]))
        self.step_size.trainable = self._enabled

    @property
    def enabled(self) -> bool:
        """Whether the kernel is quantized; the step sizes are Keras-trainable only then."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool):
        self._enabled = bool(value)
        if hasattr(self, "step_size"):
            self.step_size.trainable = self._enabled

    def initialize(self, kernel) -> None:
        """Sets each channel's step to ``2 * mean|w_c| / sqrt(Qp)`` (call it eagerly)."""
        self.step_size.assign(ops.lsq_init_step(kernel, self.qp, axis=self._reduce_axes))

    def call(self, kernel):
        if not self.enabled:
            return kernel
        dtype = ops.quant_dtype(kernel.dtype)
        g = tf.constant(1.0 / np.sqrt(float(self._per_channel) * self.qp), dtype)
        return tf.cast(ops.lsq_quantize(tf.cast(kernel, dtype), tf.cast(self.step_size, dtype),
                                        float(self.qn), float(self.qp), g), kernel.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, channel_axes=self.channel_axes, enabled=self.enabled)
        return config
