"""Pooled-output steps that keep the int8 mean off rounding ties.

An average pooling over ``n = h * w`` values stored on step ``s_in`` computes, in the int8
model, ``sum / n * s_in / s_out`` in units of its output step ``s_out``: an integer sum
times the ratio ``r = s_in / (n * s_out)``. When ``1 / r`` is an even integer -- as LSQ
calibration makes it for a non-negative input, whose spatial mean has the input's mean
absolute value, so ``s_out == s_in`` and ``1 / r == n`` -- many sums land exactly on a half
step; XNNPACK rounds those to even while the Keras model's float mean lands a few ulps to
either side, and the two models store different integers (seen in MobileNetV3Large's
squeeze-and-excitation pooling). With ``s_out = s_in * k / n`` for an odd ``k``, the value
``sum / k`` is never a half and stays at least ``1 / (2k)`` steps from one. A 'same' padded
pooling divides by several counts ``n_i`` (corners, edges, inside): with ``n`` their least
common multiple, ``sum * (n / n_i) / k`` is an even integer over an odd one, never a half.

:func:`snap_pooled_steps` moves each pooled-output step up to the nearest such ``s_out``
(up, so that nothing newly clips), in place; run it before the bias snap and the final
evaluation.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from metamix_tf.export.graph import plan
from metamix_tf.export.pooling import counts_lcm

__all__ = ["odd_ratio_step", "snap_pooled_steps"]

L = keras.layers


def odd_ratio_step(step_in: float, step_out: float, count: int) -> float:
    """The smallest ``step_in * k / count`` with ``k`` odd that is ``>= step_out``; or
    ``step_out`` itself when it is already finer than ``step_in / count`` (the pooled
    values' own lattice: no systematic ties there)."""
    ratio = step_out * count / step_in
    if ratio < 1.0:
        return float(step_out)
    k = math.ceil(ratio - 1e-9)
    k += 1 - k % 2
    return float(np.float32(step_in * k / count))


def _pool_count(node) -> int | None:
    """The window count of a pooling node (a 'same' one: the lcm of its window counts)."""
    layer = node.layer
    if not isinstance(layer, (L.GlobalAveragePooling2D, L.AveragePooling2D)):
        return None
    shape = node.keras_node.input_tensors[0].shape
    if isinstance(layer, L.GlobalAveragePooling2D):
        return int(shape[1]) * int(shape[2])
    if isinstance(layer, L.AveragePooling2D) and layer.padding == "valid":
        return int(layer.pool_size[0]) * int(layer.pool_size[1])
    return counts_lcm(int(shape[1]), int(shape[2]), tuple(layer.pool_size),
                      tuple(layer.strides))


def snap_pooled_steps(model: keras.Model) -> dict:
    """Sets every pooled-output quantizer's selected step to :func:`odd_ratio_step` of its
    input's stored step, in place (module docstring); returns ``{quantizer name: (old,
    new)}`` for the steps it changed."""
    export_plan = plan(model, int8=False)
    by_name = {n.name: n for n in export_plan.nodes}
    changed = {}
    for node in export_plan.nodes:
        count = _pool_count(node)
        q = node.output_quantizer
        if count is None or count < 2 or q is None or not hasattr(q, "step_size"):
            continue
        source = node.inputs[0]
        while by_name[source].kind == "pass":
            source = by_name[source].inputs[0]
        tensor = export_plan.tensors.get(source)
        if tensor is None:
            continue
        old = q.selected_step
        new = odd_ratio_step(tensor.grid.scale, old, count)
        if new != old:
            steps = keras.ops.convert_to_numpy(q.step_size).copy()
            steps[int(q.bit_index.numpy())] = new
            q.step_size.assign(steps)
            changed[q.name] = (old, new)
    return changed
