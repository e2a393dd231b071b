"""The inference graph of a MetaMix model: BatchNorm folded, weights on per-channel integer
grids, every activation quantizer as a fake quant the TFLite converter understands.

Two steps. :func:`plan` reads a wrapped Keras model (quantizers in ``"selected"`` mode,
weight quantization on) and decides, for every tensor an int8 model has to store, its int8
grid; :func:`build` turns the plan into a new functional Keras model, either
converter-native (``native=True``: the int8-ready graph) or in plain float math
(``native=False``: the fake-quantized network for float32 / float16 TFLite).

Where the fake quants go. A quantized layer's input quantizer moves onto the tensor that
produces its input (looking through zero padding, max pooling, flatten and reshape, which
commute with rounding), right after the op that computes it, so the converter fuses it:
``conv + bias + ReLU6 -> 8-bit fake quant (scale = learned step) -> clamp to the b-bit
range``. The clamp costs no op where the graph already does it (``clamps="saturate"``, the
default): the zero point puts the int8 saturation of the op that writes the tensor on the
b-bit top (:func:`grids.activation_grid`), and a ReLU / ReLU6 computing an unsigned tensor
(fused into its conv) is the bottom. A signed b-bit input of a 1x1 conv read through a
requantization is stored shifted by ``2^(b-1)`` steps (:class:`grids.Shift`: the identity
conv's bias, a fused ReLU at the bottom, int8 saturation at the top; the conv's bias
subtracts the shift) where that provably moves no rounding. Other bottoms keep a MAXIMUM op.
``clamps="ops"`` gives the earlier graph (zero points 0 / -128, a MINIMUM / MAXIMUM op at
each b-bit bound inside the int8 range). Tensors are of these kinds:

* ``"grid"``: read only by quantizers with one and the same grid: int8 scale = step, clamp
  to the b-bit range; exact.
* ``"quantized"``: quantized in the Keras model by an output quantizer of its own
  (``QuantConfig.output_bits``: residual-add inputs, pooling inputs, logits): int8 scale =
  that quantizer's step; readers with other grids requantize from it, as the Keras model
  rounds twice; exact.
* ``"calibrated"``: read only by float ops (residual adds, average pooling, the logits) and
  not quantized in the Keras model (``output_bits=None``): an 8-bit range from calibration
  data (int8 model only).
* ``"shared"``: read by a quantizer and by float ops (a block output that feeds both the
  next block's expand conv and the next residual add), or by quantizers with different
  grids: an int8 grid ``step / k`` with the largest odd ``k`` whose range still covers the
  calibrated values, requantized to each reader's grid behind a clamp (through an identity
  1x1 depthwise conv, see :class:`~metamix_tf.export.layers.FakeQuant`). With ``k`` odd the
  double rounding is exact for the first reader (see :func:`grids.shared_grid`).

* ``"member"``: an input of a concatenation that nothing else reads: the concatenation's
  output grid (TFLite concatenates int8 tensors of one scale; the Keras model rounds it
  there with the concatenation's output quantizer); exact. Concatenation inputs stored on
  other grids are requantized to it (identity depthwise conv); exact.

Which tensors are stored, and which layers fold, fuse or pass through, comes from
:mod:`metamix_tf.quant.graph_rules`, the table ``apply()`` uses to place its output quantizers;
the Keras graph is read by :mod:`metamix_tf.export.reader`. A BatchNorm that does not fold
(pre-activation, after a concatenation) runs as an int8 1x1 depthwise conv (8-bit weights
``+-127`` times a per-channel scale: exact), an average pooling as depthwise convs with
weights ``1 / count`` (a 'same' one cut into crops of equal window counts,
:mod:`metamix_tf.export.pooling`), so that its output has its own scale; input
preprocessing (``Rescaling``, ``Normalization``) runs in float before the input
quantization (:attr:`ExportPlan.float_prefix`).

What stays inexact, and is measured by the verification: the calibrated 8-bit grids
themselves (Keras keeps those tensors in float) and the conv biases, which an int8 TFLite
conv stores as int32 multiples of ``input_step * weight_step`` (:func:`with_int32_biases`
builds the Keras twin that rounds them the same way).

About 720 lines: the plan (each stored tensor's grid and how its b-bit range is clamped),
the int32 biases on that plan's grid and the rebuilt int8-ready graph are three readings of
one node table; the biases (about 100 lines) are the first part to move out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from metamix_tf.config import WEIGHT_STORAGES, check_weight_storage
from metamix_tf.export import grids, pooling
from metamix_tf.export.grids import Grid
from metamix_tf.export.layers import FOLDED_LAYERS, FakeQuant
from metamix_tf.export.reader import (
    OUTPUT,
    Node,
    UnsupportedModelError,
    effective_readers,
    node_readers,
    read_graph,
    stored,
    unsupported,
)
from metamix_tf.quant import graph_rules as rules
from metamix_tf.quant.layers import QuantAdd
from metamix_tf.quant.quantizers import ActivationQuantizer, MinimumStep

__all__ = [
    "UnsupportedModelError",
    "EXACT_KINDS",
    "TensorPlan",
    "InputPlan",
    "WeightPlan",
    "ExportPlan",
    "WEIGHT_STORAGE",
    "CLAMPS",
    "plan",
    "with_int32_biases",
    "int8_bias_plan",
    "bias_target",
    "on_grid_tolerance",
    "snap_biases",
    "stored_source",
    "build",
    "image_batches",
]

# Tensors the int8 model rounds exactly as the Keras model does (module docstring).
EXACT_KINDS = ("grid", "quantized", "member")


@dataclasses.dataclass
class TensorPlan:
    """The int8 grid of one tensor of the inference graph (see the module docstring)."""

    name: str  # the node that computes it (the quantized layer for a folded conv + BN)
    kind: str  # "grid" | "quantized" | "calibrated" | "shared"
    grid: Grid
    fake_quant: str  # name of its FakeQuant layer in the inference graph
    quant_readers: list
    float_readers: list
    calibrated_range: tuple | None = None
    k: int = 1


@dataclasses.dataclass
class InputPlan:
    """The input activation of one quantized layer."""

    layer: str
    bits: int
    signed: bool
    step: float
    grid: Grid
    source: str  # the tensor it reads (after zero padding and other pass-through layers)
    requantized: bool  # read through a requantization from a shared tensor
    exact: bool  # the int8 model rounds it as the Keras model does
    shift: grids.Shift | None = None  # stored as q + shift.steps (module docstring)

    @property
    def shift_steps(self) -> int:
        return self.shift.steps if self.shift is not None else 0

    @property
    def stored_grid(self) -> Grid:
        """The grid the int8 model stores it on (``grid``, or shifted)."""
        return self.shift.grid(self.grid) if self.shift is not None else self.grid


@dataclasses.dataclass
class WeightPlan:
    """The folded kernel of one quantized layer."""

    layer: str
    layer_type: str
    bits: int
    folded: grids.FoldedWeights
    batch_norm: str | None
    clipped: int  # integers outside [-127, 127] (8-bit weights only), clipped for int8
    input_scale: float | None = None  # the int8 input scale (None: the input plan's)


@dataclasses.dataclass
class ExportPlan:
    """Everything :func:`build` and the encodings need."""

    model_name: str
    nodes: list
    outputs: list
    tensors: dict  # node name -> TensorPlan
    inputs: dict  # quantized layer name -> InputPlan
    weights: dict  # quantized layer name -> WeightPlan
    int8: bool  # whether every grid fits an int8 (the native graph can be built)
    affine: dict = dataclasses.field(default_factory=dict)  # unfolded BatchNorm -> WeightPlan
    clamps: str = "saturate"  # how b-bit bounds are clamped (module docstring)

    @property
    def float_prefix(self) -> list:
        """Input preprocessing layers that run in float before the input quantization."""
        return [n.name for n in self.nodes if n.kind == "prefix"]

    @property
    def float_islands(self) -> list:
        """Layers the int8 model runs in float between int8 tensors (LayerNormalization,
        GELU: :data:`graph_rules.FLOAT_ISLANDS`)."""
        return [n.name for n in self.nodes if n.kind == "island"]

    @property
    def calibrated(self) -> list:
        """Tensors whose int8 grid the Keras model does not have (calibrated or shared)."""
        return [t for t in self.tensors.values() if t.kind not in EXACT_KINDS]

    @property
    def output_quantized(self) -> list:
        """Tensors with an output quantizer in the Keras model."""
        return [t for t in self.tensors.values() if t.kind == "quantized"]


# -- planning --------------------------------------------------------------------------------


def _grid(q: ActivationQuantizer, clamps: str) -> Grid:
    return grids.activation_grid(q.selected_bits, q.signed, q.selected_step,
                                 saturate=clamps == "saturate")


def _weight_plan(node: Node, weight_storage: str, input_scale: float) -> WeightPlan:
    layer = node.layer
    wq = layer.kernel_quantizer
    step = keras.ops.convert_to_numpy(wq.step_size)
    quantized = keras.ops.convert_to_numpy(wq(layer.kernel))
    integers = grids.kernel_integers(quantized, step)
    clipped = int(np.sum(np.abs(integers) > grids.WEIGHT_QMAX))
    integers = np.clip(integers, -grids.WEIGHT_QMAX, grids.WEIGHT_QMAX)
    bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
    bn = node.bn
    stats = {}
    if bn is not None:
        stats = dict(
            gamma=keras.ops.convert_to_numpy(bn.gamma) if bn.scale else None,
            beta=keras.ops.convert_to_numpy(bn.beta) if bn.center else None,
            mean=keras.ops.convert_to_numpy(bn.moving_mean),
            variance=keras.ops.convert_to_numpy(bn.moving_variance), epsilon=bn.epsilon)
    folded = grids.fold_batch_norm(integers, step.reshape(-1), bias, **stats)
    if weight_storage == "spread":
        folded = grids.spread_to_int8(folded, input_scale)
    return WeightPlan(layer=layer.name, layer_type=type(layer).__name__, bits=wq.bits,
                      folded=folded, batch_norm=bn.name if bn is not None else None,
                      clipped=clipped)


def image_batches(data, batch_size: int = 64, limit: int | None = None) -> Iterable:
    """Yields float32 image batches from an array, a list of arrays, or a dataset / iterable
    of ``images`` or ``(images, labels)`` batches, up to ``limit`` images in all."""
    if isinstance(data, np.ndarray) or tf.is_tensor(data):
        data = np.asarray(data)
        data = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    seen = 0
    for batch in data:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = np.asarray(images, np.float32)
        if limit is not None:
            images = images[:max(0, limit - seen)]
        if len(images) == 0:
            break
        seen += len(images)
        yield images


def _calibrate(model, nodes: list, data, limit: int | None) -> dict:
    """``{node name: (min, max)}`` of the reference model's float tensors over ``data``."""
    if not nodes:
        return {}
    if data is None:
        raise ValueError("The int8 export needs calibration images for the tensors the Keras "
                         "model keeps in float (residual adds, pooling, logits): pass "
                         "`calibration_data`. Received: calibration_data=None")
    probe = keras.Model(model.inputs, [n.keras_output for n in nodes])
    run = tf.function(lambda x: probe(x, training=False), autograph=False)
    lows = np.full(len(nodes), np.inf)
    highs = np.full(len(nodes), -np.inf)
    count = 0
    for images in image_batches(data, limit=limit):
        outs = run(tf.convert_to_tensor(images))
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, out in enumerate(outs):
            out = out.numpy()
            lows[i] = min(lows[i], float(out.min()))
            highs[i] = max(highs[i], float(out.max()))
        count += len(images)
    if count == 0:
        raise ValueError("The calibration data holds no images. "
                         f"Received: calibration_data={type(data).__name__}")
    return {n.name: (float(lo), float(hi)) for n, lo, hi in zip(nodes, lows, highs, strict=True)}


WEIGHT_STORAGE = WEIGHT_STORAGES  # "int4" plans as "bits", then packs (export.int4)
CLAMPS = ("saturate", "ops")


def plan(model: keras.Model, calibration_data=None, int8: bool = True,
         max_calibration_examples: int | None = 1024,
         weight_storage: str = "spread", clamps: str = "saturate") -> ExportPlan:
    """Reads a wrapped MetaMix model and decides every tensor's grid (module docstring).

    Args:
      model: functional model from :func:`metamix_tf.apply`, its quantizers selected (their
        ``bit_index``) and its weight quantizers enabled.
      calibration_data: images (array, dataset or iterable of batches) for the ranges of the
        tensors the Keras model keeps in float; needed when ``int8``.
      int8: plan the int8 model (raises if a quantizer has more than 8 bits); False plans
        only what the float exports need (no calibration).
      max_calibration_examples: images used for calibration at most.
      weight_storage: ``"spread"`` (default): the int8 weights hold the b-bit integers
        multiplied per channel to fill ``[-127, 127]`` (:func:`grids.spread_to_int8`; the
        same real weights, with the multiplier in the encodings), which rounds the int32
        biases more finely; ``"bits"``: the b-bit integers with the learned per-channel
        steps (BatchNorm folded); ``"int4"``: planned as ``"bits"`` (same bias grid), the
        <= 4-bit kernels then packed as INT4 (:mod:`metamix_tf.export.int4`).
      clamps: ``"saturate"`` (default): b-bit bounds clamped by int8 saturation and ReLUs
        where the graph has them, ops elsewhere; ``"ops"``: a MINIMUM / MAXIMUM op at every
        b-bit bound inside the int8 range (module docstring).
    """
    check_weight_storage(weight_storage)
    if clamps not in CLAMPS:
        raise ValueError(f"`clamps` must be one of {CLAMPS}. Received: clamps={clamps!r}")
    nodes, outputs = read_graph(model)
    by_name = {n.name: n for n in nodes}
    readers = node_readers(nodes, outputs)
    quant_nodes = [n for n in nodes if n.kind == "quant"]
    if not quant_nodes:
        raise UnsupportedModelError(
            f"Model '{model.name}' has no quantized layers; wrap it with metamix_tf.apply and "
            f"train it first. Received: model={model.name!r}")
    input_grids = {n.name: _grid(n.layer.input_quantizer, clamps) for n in quant_nodes}
    output_grids = {n.name: _grid(n.output_quantizer, clamps) for n in nodes
                    if n.output_quantizer}
    wide = {name: g.bits for name, g in {**input_grids, **output_grids}.items()
            if not g.fits_int8}
    if int8 and wide:
        name, bits = next(iter(wide.items()))
        raise UnsupportedModelError(
            f"Layer '{name}' has a {bits}-bit activation quantizer; int8 TFLite kernels hold at "
            "most 8 bits. Export float16 / float32 only (--format=float16,float32) or search "
            f"with candidate bits <= 8. Received: bits={bits}")

    every_grid = {**input_grids, **output_grids}
    floor = MinimumStep().minimum
    collapsed = sorted(name for name, g in every_grid.items() if g.scale <= 2 * floor)
    if int8 and collapsed:
        raise UnsupportedModelError(
            f"{len(collapsed)} activation step size(s) sit at the {floor:g} "
            f"floor (collapsed in training: the tensor quantizes to ~0), at {collapsed[:4]}; "
            "int8 kernels cannot requantize at that scale. Recalibrate them "
            "(metamix_tf.calibrate) and fine-tune again, or train with a lower "
            f"learning rate. Received: step={min(g.scale for g in every_grid.values())}")
    stored_nodes = [n for n in nodes if stored(n, readers, by_name)]
    fused = [n.name for n in nodes if n.output_quantizer and n not in stored_nodes]
    if fused:
        raise unsupported(by_name[fused[0]].output_quantizer, "it quantizes a tensor that "
                           "TFLite fuses into the next op (a conv followed by its ReLU); "
                           "quantize the ReLU's output instead.")
    structure = {}
    for n in stored_nodes:
        eff = effective_readers(n.name, readers, by_name)
        quant = [r for r in eff if r != OUTPUT and by_name[r].kind == "quant"]
        floats = [r for r in eff if r not in quant]
        distinct = {input_grids[r] for r in quant}
        concats = [r for r in eff if r != OUTPUT and isinstance(by_name[r].layer,
                                                                 keras.layers.Concatenate)]
        if n.output_quantizer is not None:
            kind = "quantized"
        elif len(eff) == 1 and concats and by_name[concats[0]].output_quantizer is not None:
            kind = "member"  # rounded by the concatenation's output quantizer
        elif quant and not floats and len(distinct) == 1:
            kind = "grid"
        elif not quant:
            kind = "calibrated"
        else:
            kind = "shared"
        structure[n.name] = (kind, quant, floats)

    needs_range = [n for n in stored_nodes if structure[n.name][0] != "grid"] if int8 else []
    ranges = _calibrate(model, needs_range, calibration_data, max_calibration_examples)

    tensors = {}
    for n in stored_nodes:
        kind, quant, floats = structure[n.name]
        rng = ranges.get(n.name)
        k = 1
        if kind == "grid":
            grid = input_grids[quant[0]]
            fq_name = f"{quant[0]}_input_quant" if len(quant) == 1 else f"{n.name}_quant"
        elif kind == "quantized":
            grid, fq_name = output_grids[n.name], n.output_quantizer.name
        elif kind == "member":
            grid, fq_name = output_grids[floats[0]], f"{n.name}_quant"
        elif not int8:
            continue  # float exports keep these tensors in float, as the Keras model does
        elif kind == "calibrated":
            grid = grids.calibrated_grid(*rng)
            fq_name = f"{n.name}_quant"
        else:
            first, others = input_grids[quant[0]], [input_grids[r] for r in quant[1:]]
            max_abs = max(abs(rng[0]), abs(rng[1])) if floats else None
            grid, k = grids.shared_grid(first, tuple(others), max_abs=max_abs,
                                        signed=rng[0] < 0)
            fq_name = f"{n.name}_quant"
        tensors[n.name] = TensorPlan(name=n.name, kind=kind, grid=grid, fake_quant=fq_name,
                                     quant_readers=quant, float_readers=floats,
                                     calibrated_range=rng, k=k)

    inputs = {}
    for n in quant_nodes:
        source = stored_source(n.inputs[0], by_name)
        q = n.layer.input_quantizer
        tensor = tensors.get(source)
        requantized = tensor is None or not (tensor.kind == "grid" or (
            tensor.kind == "quantized" and tensor.grid == input_grids[n.name]))
        exact = tensor is None or tensor.kind in EXACT_KINDS or grids.is_exact_requantization(
            tensor.grid, input_grids[n.name])
        shift = None
        if int8 and clamps == "saturate" and requantized and tensor is not None and \
                _reads_pointwise(n.layer) and input_grids[n.name].qmin > \
                input_grids[n.name].int8_min:
            shift = grids.shifted_requantization(tensor.grid, input_grids[n.name])
        inputs[n.name] = InputPlan(
            layer=n.name, bits=q.selected_bits, signed=q.signed, step=q.selected_step,
            grid=input_grids[n.name], source=source, requantized=requantized, exact=exact,
            shift=shift)
    weights = {n.name: _weight_plan(n, weight_storage, input_grids[n.name].scale)
               for n in quant_nodes}
    affine = {}
    for n in nodes:
        if n.kind == "affine":
            tensor = tensors.get(stored_source(n.inputs[0], by_name))
            affine[n.name] = _affine_plan(n.layer, weight_storage,
                                          tensor.grid.scale if tensor is not None else None)
    return ExportPlan(model_name=model.name, nodes=nodes, outputs=outputs, tensors=tensors,
                      inputs=inputs, weights=weights, int8=int8, affine=affine, clamps=clamps)


def _reads_pointwise(layer) -> bool:
    """Whether each output of ``layer`` reads its input at in-bounds positions only (a 1x1
    conv or a dense layer: no zero padding, which a shifted input would get wrong)."""
    if isinstance(layer, keras.layers.Dense):
        return True
    return all(int(k) == 1 for k in getattr(layer, "kernel_size", (0,)))


def stored_source(name: str, by_name: dict) -> str:
    """The stored tensor a node reads, looking through pass-through layers."""
    while by_name[name].kind == "pass":
        name = by_name[name].inputs[0]
    return name


def _affine_plan(bn, weight_storage: str, input_scale: float | None) -> WeightPlan:
    """A BatchNorm that does not fold, as a 1x1 depthwise conv: per-channel weights
    ``gamma / sqrt(var + eps)`` stored exactly as int8 ``+-127`` times a per-channel scale,
    bias ``beta - mean * gamma / sqrt(var + eps)``."""
    channels = int(bn.moving_mean.shape[0])
    num = keras.ops.convert_to_numpy
    folded = grids.fold_batch_norm(
        np.ones((1, 1, channels, 1)), np.ones(channels),
        gamma=num(bn.gamma) if bn.scale else None, beta=num(bn.beta) if bn.center else None,
        mean=num(bn.moving_mean), variance=num(bn.moving_variance), epsilon=bn.epsilon)
    # 8-bit weights: +-127 with either storage; "spread" picks the scale whose int32 bias
    # is closest to the real one
    folded = grids.spread_to_int8(folded, input_scale if weight_storage == "spread" else None)
    return WeightPlan(layer=bn.name, layer_type="BatchNormalization", bits=8, folded=folded,
                      batch_norm=bn.name, clipped=0, input_scale=input_scale)


def _bias_unit(export_plan: ExportPlan, name: str) -> np.ndarray:
    """Per output channel of layer ``name``: the unit of its int32 bias in an int8 TFLite
    conv, ``input_scale * weight_scale`` (in float32, as the converter computes it)."""
    w = export_plan.weights.get(name) or export_plan.affine[name]
    scale = w.input_scale if w.input_scale is not None else export_plan.inputs[name].grid.scale
    return (np.float32(scale) * w.folded.scale.astype(np.float32)).astype(np.float64)


def _round_biases(export_plan: ExportPlan, weights: dict) -> dict:
    out = {}
    for name, w in weights.items():
        if w.input_scale is None and name not in export_plan.inputs:
            out[name] = w  # an unfolded BatchNorm on a tensor Keras keeps float
            continue
        unit = _bias_unit(export_plan, name)
        folded = dataclasses.replace(w.folded, bias=np.round(w.folded.bias / unit) * unit)
        out[name] = dataclasses.replace(w, folded=folded)
    return out


def with_int32_biases(export_plan: ExportPlan) -> ExportPlan:
    """A copy of ``export_plan`` whose biases are rounded as an int8 TFLite conv stores them:
    int32 multiples of ``input_scale * weight_scale`` per output channel.

    Built natively, it is a Keras model that computes what the int8 TFLite model computes
    (up to the int8 kernels' own rounding), the link between the two in the verification.
    """
    return dataclasses.replace(export_plan, weights=_round_biases(export_plan, export_plan.weights),
                               affine=_round_biases(export_plan, export_plan.affine))


def int8_bias_plan(model: keras.Model, weight_storage: str = "spread") -> ExportPlan:
    """The float plan whose folded biases an int8 export stores on int32 grids (what
    :func:`snap_biases` and :class:`metamix_tf.export.bias_grid.BiasGrid` read). Raises
    :class:`UnsupportedModelError` where the model has no int8 export."""
    export_plan = plan(model, int8=False, weight_storage=weight_storage)
    wide = [name for name, p in export_plan.inputs.items() if not p.grid.fits_int8]
    if wide:
        raise UnsupportedModelError(
            f"Layer '{wide[0]}' has a {export_plan.inputs[wide[0]].bits}-bit input: no int8 "
            f"model, so no int32 bias grid to snap to. Received: layer={wide[0]!r}")
    return export_plan


def bias_target(model: keras.Model, weights: WeightPlan):
    """The variable a folded bias shift goes into: the BatchNorm's ``beta`` when the layer
    has one, else the layer's bias; None where no variable adds to the folded bias."""
    bn = model.get_layer(weights.batch_norm) if weights.batch_norm else None
    if bn is not None:
        return bn.beta if bn.center else None
    layer = model.get_layer(weights.layer)
    return layer.bias if getattr(layer, "use_bias", False) else None


def on_grid_tolerance(target: np.ndarray, folded_bias: np.ndarray) -> np.ndarray:
    """How far (absolute, per channel) a folded bias may sit from its int32 grid point and
    still count as on it: ``4 ulp(target) + 8 eps32 |b|``, the float32 rounding of the
    variable the snap writes (``target``, see :func:`bias_target`) and of the folding
    arithmetic. A large ``target`` (a BatchNorm beta that cancels a large mean) can make this
    more than 1e-3 of a small unit; the int8 export still stores the same integer."""
    return (4 * np.spacing(np.abs(np.asarray(target, np.float32))).astype(np.float64)
            + 8 * np.finfo(np.float32).eps * np.abs(folded_bias))


def snap_biases(model: keras.Model, weight_storage: str = "spread") -> dict:
    """Moves every quantized layer's folded bias onto the int32 grid an int8 TFLite conv
    stores it on (units of ``input_step * weight_scale`` per output channel), in place.

    The shift ``delta_c = round(b_c / u_c) * u_c - b_c`` (at most half a unit) goes into the
    variable :func:`bias_target` names, so the Keras model then computes what the int8
    model computes (up to float32 rounding). A bias already on its grid up to the float32
    rounding of that variable and of the unit (``|delta_c| <= 4 ulp(target_c) + 8 eps32
    |b_c|``: the int8 export stores the same integer) is left as it is, so a second call
    changes nothing. Run it after weight training, then evaluate; the
    export's bias rounding becomes a no-op. Raises :class:`UnsupportedModelError` where the
    model has no int8 export. Returns ``{"layers", "skipped", "moved", "max_abs_shift",
    "max_shift_units"}`` (``moved``: layers with a bias that changed).
    """
    export_plan = int8_bias_plan(model, weight_storage)
    twin = with_int32_biases(export_plan)
    skipped, moved, max_shift, max_units = [], 0, 0.0, 0.0
    every = {**export_plan.weights, **export_plan.affine}
    snapped = {**twin.weights, **twin.affine}
    for name, w in every.items():
        delta = snapped[name].folded.bias - w.folded.bias
        if not np.any(delta):
            continue
        target = bias_target(model, w)
        if target is None:  # a BatchNorm without beta: no variable adds to the folded bias
            skipped.append(name)
            continue
        unit = _bias_unit(export_plan, name)
        value = keras.ops.convert_to_numpy(target)
        delta = np.where(np.abs(delta) <= on_grid_tolerance(value, w.folded.bias), 0.0, delta)
        if not np.any(delta):
            continue
        target.assign(value + delta.astype(np.float32))
        moved += 1
        max_shift = max(max_shift, float(np.abs(delta).max()))
        max_units = max(max_units, float(np.abs(delta / unit).max()))
    return {"layers": len(every) - len(skipped), "skipped": skipped, "moved": moved,
            "max_abs_shift": max_shift, "max_shift_units": max_units}


# -- building --------------------------------------------------------------------------------

_DROPPED_KEYS = ("input_quantizer", "kernel_quantizer")


def _folded_layer(node: Node, weights: WeightPlan, native: bool,
                  input_shift: float = 0.0) -> keras.layers.Layer:
    """The folded layer of ``node``; ``input_shift``: a constant its input carries (a
    :class:`grids.Shift`, in real units), subtracted through the bias."""
    layer = node.layer
    config = {k: v for k, v in layer.get_config().items() if k not in _DROPPED_KEYS
              and not k.endswith(("_regularizer", "_constraint"))}
    config.update(use_bias=True, weight_bits=weights.bits, native=native)
    folded = FOLDED_LAYERS[type(layer).__name__].from_config(config)
    folded.build(tuple(layer.input.shape))
    bias = weights.folded.bias
    if input_shift:
        f = weights.folded
        kernel_sums = (f.integers.reshape(-1, f.scale.size) * f.scale).sum(axis=0)
        bias = bias - input_shift * kernel_sums
    folded.set_folded(weights.folded.kernel, bias, weights.folded.scale)
    return folded


def _affine_layer(node: Node, weights: WeightPlan, native: bool) -> keras.layers.Layer:
    """An unfolded BatchNorm as a 1x1 depthwise conv (its plan: :func:`_affine_plan`)."""
    layer = FOLDED_LAYERS["QuantDepthwiseConv2D"](kernel_size=1, use_bias=True, weight_bits=8,
                                                  native=native, name=node.name)
    layer.build(tuple(node.keras_output.shape))
    layer.set_folded(weights.folded.kernel, weights.folded.bias, weights.folded.scale)
    return layer


def _concat_inputs(export_plan: ExportPlan, node: Node, new: dict, native: bool,
                   used: dict) -> dict:
    """``new`` with each input of concatenation ``node`` requantized to its output grid
    where it is stored on another grid (TFLite concatenates int8 tensors of one scale)."""
    target = export_plan.tensors.get(node.name)
    if target is None:
        return new
    by_name = {n.name: n for n in export_plan.nodes}
    out = dict(new)
    for j, name in enumerate(node.inputs):
        source = stored_source(name, by_name)
        tensor = export_plan.tensors.get(source)
        if tensor is None or tensor.grid != target.grid:
            out[name] = FakeQuant.from_grid(target.grid, requantize=True, native=native,
                                            relu=_relu_bottom(export_plan, target.grid),
                                            identity_weight=_identity_weight(used, source),
                                            name=f"{node.name}_input{j}_quant")(new[name])
    return out


def _pools_one_element(layer) -> bool:
    """A global average pooling over a 1x1 map (channels last): an identity on the values."""
    if not isinstance(layer, keras.layers.GlobalAveragePooling2D) or \
            layer.data_format != "channels_last":
        return False
    return tuple(layer.input.shape[1:3]) == (1, 1)


def _rescaling_relu_source(export_plan: ExportPlan, node: Node, by_name: dict) -> str | None:
    """The stored tensor that a standalone ReLU (or a ReLU6 whose grid tops out at or below 6)
    reads when its output is stored too: the int8 model would run it as a RELU op that
    rescales. None for any other node."""
    layer = node.layer
    if node.kind != "op" or not rules.is_fusable_activation(layer) or \
            node.name not in export_plan.tensors:
        return None
    source = stored_source(node.inputs[0], by_name)
    grid = export_plan.tensors[node.name].grid
    if source not in export_plan.tensors or grid.qmin != 0 or not grid.fits_int8:
        return None
    six = (isinstance(layer, keras.layers.ReLU) and layer.max_value is not None) or \
        rules.activation_name(layer) == "relu6"
    return None if six and grid.qmax * grid.scale > 6.0 else source


def _requantized(x, grid: Grid, used: dict, source: str, relu: bool, name: str):
    """``x`` (read from the stored tensor ``source``) rescaled onto ``grid`` by a requantizing
    identity conv in the converter-native graph."""
    return FakeQuant.from_grid(grid, requantize=True, native=True, relu=relu,
                               identity_weight=_identity_weight(used, source), name=name)(x)


def _identity_weight(used: dict, source: str) -> int:
    """127, 126, ... for the requantizing identity convs that read ``source`` (``used``
    counts them): the converter merges equal convs on one tensor, which would leave one
    output with two different fake quants (a float op)."""
    used[source] = used.get(source, 0) + 1
    return grids.WEIGHT_QMAX + 1 - used[source]


def _relu_bottom(export_plan: ExportPlan, grid: Grid, node: Node | None = None) -> bool:
    """Whether a ReLU clamps the bottom of ``grid`` (unsigned, its 0 above the int8 range's
    bottom, ``clamps="saturate"``): the ReLU / ReLU6 that computes ``node`` (a layer, or a
    conv's activation: int8 kernels clamp it at the zero point), or without ``node`` (a
    requantization) one fused into the identity convolution."""
    if export_plan.clamps != "saturate" or grid.qmin != 0 or grid.qmin <= grid.int8_min:
        return False
    if node is None:
        return True
    layer = node.layer
    return rules.is_fusable_activation(layer) or (
        isinstance(layer, rules.WEIGHTED)
        and rules.activation_name(layer) in rules.FUSABLE_ACTIVATIONS)


def _pass_quant(export_plan: ExportPlan, node: Node, by_name: dict,
                native: bool) -> FakeQuant:
    """A fake quant on the output of a shape-only layer (max pooling, padding) that several
    ops read, at its stored source's scale over the whole int8 range (a no-op on the values):
    without it the converter gives some of those readers a float copy of the layer (seen
    with InceptionV3's max pooling read by three requantizing convs and a pooling)."""
    grid = export_plan.tensors[stored_source(node.name, by_name)].grid
    grid = dataclasses.replace(grid, qmin=grid.int8_min, qmax=grid.int8_max)
    return FakeQuant.from_grid(grid, native=native, name=f"{node.name}_quant")


def _rebuilt(node: Node):
    """A fresh copy of a weightless layer (or the stateless keras.ops operation itself)."""
    op = node.layer
    if not isinstance(op, keras.layers.Layer):
        return op
    if isinstance(op, QuantAdd):  # the converter adds int8 tensors itself
        config = op.get_config()
        config.pop("kernel_rounding")
        return keras.layers.Add.from_config(config)
    return type(op).from_config(op.get_config())


def _call(node: Node, op, new: dict):
    """Calls ``op`` with ``node``'s original arguments, its input tensors replaced."""
    keras_node = node.keras_node
    tensors = {id(t): new[name] for t, name in zip(keras_node.input_tensors, node.inputs,
                                                    strict=True)}
    args, kwargs = keras_node.arguments.fill_in(tensors)
    out = op(*args, **kwargs)
    if isinstance(op, keras.layers.Layer) and node.layer.weights:  # e.g. an adapted Normalization
        op.set_weights(node.layer.get_weights())
    return out


def build(export_plan: ExportPlan, native: bool = True, name: str | None = None,
          twin: bool = False) -> keras.Model:
    """The inference graph of ``export_plan`` as a functional Keras model.

    ``native=True``: converter-native fake quants on every stored tensor (the int8-ready
    graph; needs a plan made with ``int8=True``). ``native=False``: float math fake quants
    on the quantizers' inputs only, the network the Keras model computes (for float32 /
    float16 TFLite). ``twin=True`` (with ``native``): the same stored tensors and
    requantizations, rounded in float math (a Keras model of what the int8 kernels compute,
    for verification, not for conversion: TF's FakeQuant kernel rounds ``x - min`` in
    float32, which misses by up to ~1e-5 steps over a wide int8 range such as the
    saturating zero points' ``[-254, 1]`` steps of a signed 2-bit grid).
    """
    if native and not export_plan.int8:
        raise ValueError("The converter-native graph needs a plan made with int8=True. "
                         f"Received: native={native}")
    fq_native = native and not twin  # how the fake quants compute
    used: dict = {}  # source tensor -> requantizing identity convs reading it
    new: dict = {}
    inputs = []
    by_name = {n.name: n for n in export_plan.nodes}
    readers = node_readers(export_plan.nodes, export_plan.outputs)
    for node in export_plan.nodes:
        if node.kind == "input":
            shape = tuple(node.layer.batch_shape[1:])
            t = keras.Input(shape=shape, dtype="float32", name=node.name)
            inputs.append(t)
        elif node.kind == "quant":
            x = new[node.inputs[0]]
            inp = export_plan.inputs[node.name]
            shift = inp.shift if fq_native else None
            if inp.requantized and shift is not None:
                source = export_plan.tensors[inp.source].grid
                x = FakeQuant.from_grid(
                    inp.stored_grid, requantize=True, native=True, relu=True,
                    identity_weight=shift.weight,
                    identity_bias=shift.bias * source.scale / shift.weight,
                    name=f"{node.name}_input_quant")(x)
            elif inp.requantized:
                x = FakeQuant.from_grid(inp.grid, requantize=True, native=fq_native,
                                        relu=_relu_bottom(export_plan, inp.grid),
                                        identity_weight=_identity_weight(used, inp.source),
                                        name=f"{node.name}_input_quant")(x)
            t = _folded_layer(node, export_plan.weights[node.name], native,
                              shift.steps * inp.step if shift is not None else 0.0)(x)
        elif node.kind == "affine":
            t = _affine_layer(node, export_plan.affine[node.name], native)(new[node.inputs[0]])
        elif isinstance(node.layer, keras.layers.AveragePooling2D) and \
                node.layer.padding == "valid":
            t = pooling.valid_pool_as_conv(node.layer, tuple(node.layer.input.shape), native,
                                           node.name)(new[node.inputs[0]])
        elif isinstance(node.layer, keras.layers.AveragePooling2D) and native:
            tensor = export_plan.tensors.get(node.name)
            t = pooling.same_pool_as_convs(new[node.inputs[0]], node.layer,
                                           tensor.grid if tensor is not None else None,
                                           native, node.name)
        elif isinstance(node.layer, keras.layers.Concatenate):
            t = _call(node, _rebuilt(node),
                      _concat_inputs(export_plan, node, new, fq_native, used))
        elif fq_native and (source := _rescaling_relu_source(export_plan, node, by_name)):
            # LiteRT's int8 RELU that changes the scale computes round((q + 1/2) s_in / s_out)
            # (measured: NASNet's ReLU of a stored add, 0.21 steps off); the requantizing
            # identity conv with the ReLU fused into it rounds exactly.
            t = _requantized(new[node.inputs[0]], export_plan.tensors[node.name].grid, used,
                             source, True, f"{node.name}_requant")
        elif fq_native and _pools_one_element(node.layer) and node.name in export_plan.tensors:
            # The converter drops a mean over one element together with the rescaling of
            # its output quantizer (the reader's bias keeps that scale, its input gets the
            # other: MobileNetV3's squeeze-and-excitation at 1x1); rescale before it.
            grid = export_plan.tensors[node.name].grid
            source = node.inputs[0]
            requantized = _requantized(new[source], grid, used, source,
                                       _relu_bottom(export_plan, grid), f"{node.name}_requant")
            t = _call(node, _rebuilt(node), {**new, source: requantized})
        else:
            t = _call(node, _rebuilt(node), new)
            if native and node.kind == "pass" and len(readers[node.name]) > 1 and \
                    stored_source(node.name, by_name) in export_plan.tensors:
                t = _pass_quant(export_plan, node, by_name, fq_native)(t)
        tensor = export_plan.tensors.get(node.name)
        if tensor is not None and (native or tensor.kind in EXACT_KINDS):
            t = FakeQuant.from_grid(tensor.grid, native=fq_native, name=tensor.fake_quant,
                                    relu=_relu_bottom(export_plan, tensor.grid, node))(t)
        new[node.name] = t
    outputs = [new[o] for o in export_plan.outputs]
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                       outputs[0] if len(outputs) == 1 else outputs,
                       name=name or f"{export_plan.model_name}_inference")
