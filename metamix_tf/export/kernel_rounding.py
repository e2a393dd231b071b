"""The Keras model rounds what an int8 conv (or MEAN) writes as the int8 kernel does.

A tensor that a conv, depthwise conv or dense layer writes (BatchNorm folded, a ReLU / ReLU6
fused), or a global average pooling, is rounded in Keras as ``round(y / s_out)`` of a
float32 ``y`` and in the int8 model as ``round(float32(A) * scale)`` of the exact integer
accumulator ``A``
(:mod:`metamix_tf.export.kernels`). The two differ where float32 noise puts ``y / s_out``
on the other side of a rounding boundary, and in a network with low-bit layers one such
integer can change a prediction. :func:`set_kernel_rounding` gives each such tensor's
rounding quantizer the kernel's arithmetic
(:meth:`~metamix_tf.quant.quantizers.ActivationQuantizer.set_kernel_rounding`): it recovers
``A = round(y / (s_in * s_w))`` from the float value and rounds ``A`` as the kernel does, so
those tensors hold the int8 model's integers. The export sets it before it verifies.

A tensor an int8 ADD writes gets the kernel's fixed-point sum
(:func:`metamix_tf.export.kernels.add`) from the :class:`~metamix_tf.quant.layers.QuantAdd`
that ``apply()`` puts in place of each ``Add`` (``QuantAdd.kernel_rounding``).

A conv packed as INT4 (:mod:`metamix_tf.export.int4`) runs on LiteRT's builtin kernels,
which XNNPACK does not replace for an INT4 filter, and those requantize in fixed point:
``set_kernel_rounding(model, plan, builtin=packed layers)`` gives its tensor that arithmetic
(:func:`metamix_tf.export.kernels.builtin_conv_requantize`); the export verifies the INT4
file against the model rounded so.

A concatenation's output quantizer rounds each member's channels with that member's
arithmetic, and the model input's quantizer rounds as the int8 QUANTIZE kernel does
(:func:`metamix_tf.export.kernels.quantize`). Not covered (they keep Keras' rounding):
tensors written by MUL, the activation lookup tables, average poolings (depthwise mean
convs), requantizations of a stored tensor, a BatchNorm that does not fold, and an input
after float preprocessing layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np

from metamix_tf.export import kernels
from metamix_tf.export.graph import ExportPlan, stored_source
from metamix_tf.quant import graph_rules as rules
from metamix_tf.quant import wrap
from metamix_tf.quant.layers import QuantAdd

__all__ = ["rounding_quantizers", "kernel_arithmetic", "set_kernel_rounding",
           "clear_kernel_rounding"]


def rounding_quantizers(model: keras.Model, export_plan: ExportPlan) -> list:
    """``[(tensor plan, keras float tensor, quantizer)]``: each tensor the int8 model stores
    on a learned grid (kinds ``"grid"`` and ``"quantized"``) with the Keras tensor and the
    quantizer that rounds it (the reader's input quantizer, or the output quantizer)."""
    nodes = {n.name: n for n in export_plan.nodes}
    out = []
    for name, t in export_plan.tensors.items():
        if t.kind == "grid":
            q = model.get_layer(t.quant_readers[0]).input_quantizer
        elif t.kind == "quantized":
            q = nodes[name].output_quantizer
        else:
            continue
        out.append((t, nodes[name].keras_output, q))
    return out


def _conv_writer(export_plan: ExportPlan, nodes: dict, name: str) -> str | None:
    """The quantized layer whose int8 kernel writes tensor ``name`` (through fused ReLU /
    ReLU6 and identities), or None when another op writes it."""
    node = nodes.get(name)
    while node is not None and node.kind != "quant":
        node = _fused_source(export_plan, nodes, node)
    return node.name if node is not None and node.name in export_plan.weights else None


def _fused_source(export_plan: ExportPlan, nodes: dict, node, identities: bool = True):
    """The node whose int8 op also computes ``node`` (a ReLU / ReLU6 fused into it, or an
    identity), or None: when ``node`` is another op, or reads a tensor the int8 model
    stores (then ``node`` is a requantization of that tensor)."""
    passes = rules.is_fusable_activation(node.layer) or (
        identities and rules.is_identity(node.layer))
    if not (passes and len(node.inputs) == 1) or node.inputs[0] in export_plan.tensors:
        return None
    return nodes.get(node.inputs[0])


def _stored_input_scale(export_plan: ExportPlan, nodes: dict, node,
                        index: int = 0) -> float | None:
    tensor = export_plan.tensors.get(stored_source(node.inputs[index], nodes))
    return None if tensor is None else tensor.grid.scale


def kernel_arithmetic(model: keras.Model, export_plan: ExportPlan,
                      name: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(unit, scale, offset)`` (per output channel) of the int8 op that writes tensor
    ``name`` when it rounds an integer accumulator (module docstring), else None:

    * a conv / depthwise conv / dense (BatchNorm folded, ReLU / ReLU6 fused): ``unit = s_in
      * s_w[c]``, ``scale = unit / s_out`` (:func:`kernels.conv_scale`), offset 0;
    * a global average pooling (int8 MEAN, :func:`kernels.mean_requantize`): the sum of
      the ``n`` input integers, ``unit = s_in / n``, offset the output zero point;
    * a concatenation along channels: its members' (:func:`_concatenated`).
    """
    return _arithmetic(model, export_plan, {n.name: n for n in export_plan.nodes}, name)


def _conv_scales(model: keras.Model, export_plan: ExportPlan,
                 writer: str) -> tuple[float, np.ndarray, np.ndarray] | None:
    """``(s_in, s_w, unit)`` of the int8 conv / dense ``writer`` (per output channel; ``unit
    = s_in * s_w`` in float64 of the float32 scales, the accumulator's), or None when its
    weight scales are not per output channel."""
    weights = export_plan.weights[writer]
    s_in = (export_plan.inputs[writer].stored_grid.scale if weights.input_scale is None
            else weights.input_scale)
    s_w = np.asarray(weights.folded.scale, np.float32)
    if s_w.size != model.get_layer(writer).output.shape[-1]:
        return None
    return s_in, s_w, np.float64(np.float32(s_in)) * s_w.astype(np.float64)


def _arithmetic(model: keras.Model, export_plan: ExportPlan, nodes: dict, name: str,
                builtin=frozenset()) -> tuple[np.ndarray, np.ndarray, int] | None:
    s_out = export_plan.tensors[name].grid.scale
    writer = _conv_writer(export_plan, nodes, name)
    if writer is not None:
        scales = _conv_scales(model, export_plan, writer)
        if scales is None or writer in builtin:  # builtin: fixed point, not this form
            return None
        s_in, s_w, unit = scales
        return unit, kernels.conv_scale(s_in, s_w, s_out), 0
    node = nodes[name]
    if isinstance(node.layer, keras.layers.Concatenate):
        return _concatenated(model, export_plan, nodes, node, s_out, builtin)
    pooled = tuple(node.layer.input.shape[1:3]) if isinstance(
        node.layer, keras.layers.GlobalAveragePooling2D) else None
    s_in = _stored_input_scale(export_plan, nodes, node) if pooled else None
    if s_in is None or pooled == (1, 1):  # over a 1x1 map it is an identity conv
        return None
    count, channels = pooled[0] * pooled[1], node.layer.input.shape[-1]
    return (np.full(channels, np.float64(np.float32(s_in)) / count),
            np.full(channels, kernels.mean_scale(s_in, s_out, count)),
            export_plan.tensors[name].grid.zero_point)


def _concatenated(model: keras.Model, export_plan: ExportPlan, nodes: dict, node,
                  s_out: float, builtin=frozenset()
                  ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """A channel concatenation's arithmetic: each member's (a conv or MEAN writes it onto
    the concatenation's grid), joined; channels whose values arrive already on that grid
    (a :class:`QuantAdd`'s sum, a requantized input) or that no kernel covers get ``unit =
    s_out, scale = 1``, which is ``round(y / s_out)``."""
    axis = node.layer.axis
    if axis not in (-1, len(node.layer.output.shape) - 1):
        return None
    units, scales, offsets = [], [], set()
    for source in (stored_source(name, nodes) for name in node.inputs):
        member = export_plan.tensors.get(source)
        if (member is not None and member.kind == "member"
                and _conv_writer(export_plan, nodes, source) in builtin):
            return None  # one quantizer cannot round members in fixed point and float32
        arithmetic = (_arithmetic(model, export_plan, nodes, source, builtin)
                      if member is not None and member.kind == "member" else None)
        channels = nodes[source].layer.output.shape[-1]
        if arithmetic is None:
            arithmetic = (np.full(channels, np.float64(np.float32(s_out))),
                          np.ones(channels, np.float32), None)
        units.append(arithmetic[0])
        scales.append(arithmetic[1])
        offsets.add(arithmetic[2])
    offsets.discard(None)
    if len(offsets) > 1:  # a MEAN and a conv member round their ties differently
        return None
    return np.concatenate(units), np.concatenate(scales), offsets.pop() if offsets else 0


def _add_writer(model: keras.Model, export_plan: ExportPlan, nodes: dict,
                name: str) -> tuple[QuantAdd, dict] | None:
    """The :class:`QuantAdd` that writes tensor ``name`` (through a fused ReLU / ReLU6) and
    the int8 ADD kernel's parameters for it, or None."""
    node = nodes.get(name)
    while node is not None and not isinstance(node.layer, QuantAdd):
        node = _fused_source(export_plan, nodes, node, identities=False)
    if node is None or len(node.inputs) != 2:
        return None
    steps = [_stored_input_scale(export_plan, nodes, node, i) for i in range(2)]
    if None in steps:
        return None
    s_out = export_plan.tensors[name].grid.scale
    try:
        params = kernels.add_params(steps[0], steps[1], s_out)
    except ValueError:  # scale ratios outside the int8 ADD kernel's range
        return None
    return model.get_layer(node.name), {
        "steps": [float(np.float32(s)) for s in steps],
        "multipliers": [params.multiplier_a, params.multiplier_b], "shift": params.shift,
        "output_step": float(np.float32(s_out))}


def set_kernel_rounding(model: keras.Model, export_plan: ExportPlan,
                        builtin: Iterable[str] = ()) -> list[str]:
    """Sets the int8 kernels' rounding (module docstring) on the quantizer of every tensor
    :func:`kernel_arithmetic` covers in ``export_plan`` (planned from ``model``), and on
    every :class:`~metamix_tf.quant.layers.QuantAdd` whose sum is stored; returns those
    tensors. ``builtin``: conv layers whose op runs on LiteRT's builtin kernels (the INT4
    ones, which XNNPACK does not take): their tensors get the builtin kernels' fixed-point
    requantization (:func:`kernels.builtin_conv_requantize`), and a concatenation with one
    as a member keeps Keras' rounding. Set again after changing the model (the export
    does)."""
    clear_kernel_rounding(model)
    builtin = frozenset(builtin)
    nodes = {n.name: n for n in export_plan.nodes}
    done = []
    members = [(t, None, None) for t in export_plan.tensors.values() if t.kind == "member"]
    for t, _, q in rounding_quantizers(model, export_plan) + members:
        writer = _conv_writer(export_plan, nodes, t.name) if builtin else None  # int8: no walk
        if q is not None and nodes[t.name].kind == "input":  # the int8 QUANTIZE of the input
            q.set_input_rounding(t.grid.scale)
        elif q is not None and writer in builtin and (
                scales := _conv_scales(model, export_plan, writer)):
            s_in, s_w, unit = scales
            q.set_fixed_point_rounding(unit, *kernels.builtin_conv_params(s_in, s_w,
                                                                          t.grid.scale))
        elif q is not None and (arithmetic := _arithmetic(model, export_plan, nodes, t.name,
                                                          builtin)):
            unit, scale, offset = arithmetic
            q.set_kernel_rounding(unit, scale, offset=offset)
        elif add := _add_writer(model, export_plan, nodes, t.name):
            add[0].kernel_rounding = add[1]  # the QuantAdd and its kernel parameters
        else:
            continue
        done.append(t.name)
    return done


def clear_kernel_rounding(model: keras.Model) -> None:
    """Back to Keras' own rounding and sums in ``model``."""
    for q in wrap.activation_quantizers(model):
        q.clear_kernel_rounding()
    for layer in model.layers:
        if isinstance(layer, QuantAdd):
            layer.kernel_rounding = None
