"""``apply()``: wrap a Keras functional model with MetaMix quantizers, and helpers that act
on every quantizer of a wrapped model at once (modes, bits, variable groups)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable

import keras

from metamix_tf.config import QuantConfig
from metamix_tf.quant import canonical
from metamix_tf.quant import graph_rules as rules
from metamix_tf.quant.flatten import flatten, is_graph_model
from metamix_tf.quant.layers import QUANT_LAYERS, QuantAdd, QuantLayerMixin
from metamix_tf.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = [
    "apply",
    "quant_layers",
    "activation_quantizers",
    "output_quantizers",
    "weight_quantizers",
    "set_mode",
    "set_uniform",
    "select_bits",
    "get_bits",
    "enable_weight_quantization",
    "calibrate",
    "VariableGroups",
    "variable_groups",
    "unsupported_layers",
]

_OUTPUT = rules.OUTPUT
_NORMALIZATION = (
    keras.layers.BatchNormalization, keras.layers.LayerNormalization,
    keras.layers.GroupNormalization, keras.layers.Normalization,
)
# Weighted layers that apply() does not quantize: they stay float and are reported.
_UNSUPPORTED = (
    keras.layers.SeparableConv2D, keras.layers.Conv1D, keras.layers.Conv3D,
    keras.layers.Conv2DTranspose, keras.layers.Conv1DTranspose, keras.layers.Conv3DTranspose,
    keras.layers.EinsumDense, keras.layers.Embedding, keras.layers.LSTM, keras.layers.GRU,
)


def _quant_class(layer):
    for stock, quant in QUANT_LAYERS:
        if type(layer) is stock:
            return quant
    return None


_producer = rules.producer


def _input_sign(layer, hswish_range: str) -> bool:
    """True when the layer's input can be negative (walks back through shape-only layers)."""
    return _output_sign(_producer(layer.input), hswish_range)


def _output_sign(producer, hswish_range: str) -> bool:
    """True when the output of operation ``producer`` can be negative."""
    while isinstance(producer, rules.SIGN_PRESERVING):
        producer = _producer(producer.input)
    if producer is None or isinstance(producer, keras.layers.InputLayer):
        return True
    if isinstance(producer, keras.layers.ReLU):
        return bool(producer.negative_slope) or float(producer.threshold) < 0
    if isinstance(producer, canonical.SigmoidGrid):
        return False
    if canonical.is_hard_swish_product(producer):
        return hswish_range == "signed"
    name = rules.activation_name(producer)
    if name in rules.HARD_SWISH:
        return hswish_range == "signed"
    return name not in rules.NON_NEGATIVE_ACTIVATIONS


def _stored_outputs(model) -> list[str]:
    """Operations whose output an integer model stores although no quantized layer reads
    it (:func:`graph_rules.stores`: read by a weightless op, an unfolded BatchNorm or the
    model's caller), looking through shape-only layers and identities."""
    readers = rules.readers(model)

    def effective(op) -> list:  # readers, looking through shape-only layers and identities
        out = []
        for r in readers.get(op.name, []):
            if r is not _OUTPUT and (rules.is_shape_only(r) or rules.is_identity(r)):
                out.extend(effective(r))
            else:
                out.append(r)
        return out

    def stores(op) -> bool:
        mine = readers.get(op.name, [])
        eff = effective(op)
        if rules.shared_by_quantized(sum(isinstance(r, rules.WEIGHTED) for r in eff)):
            return True
        for r in mine:
            if r is not _OUTPUT and (rules.is_shape_only(r) or rules.is_identity(r)):
                if stores(r):
                    return True
            elif rules.stores(op, r, len(mine)):
                return True
        return False

    return [op.name for op in model.operations
            if not isinstance(op, keras.layers.InputLayer) and not rules.is_shape_only(op)
            and not rules.is_identity(op) and not isinstance(op, canonical.SigmoidGrid)
            and (stores(op) or rules.quantizes_output(op))]


def _check_names(argument: str, names: Iterable[str], model) -> None:
    known = {layer.name for layer in model.layers}
    missing = sorted(set(names) - known)
    if missing:
        raise ValueError(f"`{argument}` names layers that are not in model '{model.name}'. "
                         f"Received: {argument}={missing}")


def apply(model: keras.Model, config: QuantConfig | None = None) -> keras.Model:
    """Returns a copy of ``model`` (same weights) with MetaMix quantizers.

    Every ``Conv2D``, ``DepthwiseConv2D`` and ``Dense`` becomes its quantized counterpart:
    a multi-branch activation quantizer on its input (signed unless the input comes from a
    ReLU-like activation) and a per-channel weight quantizer on its kernel. The first and
    last quantized layers get ``config.first_last_bits`` for both. All quantizers start in
    ``"float"`` mode with weight quantization off, so the copy computes exactly what the
    original does. Nested functional / ``Sequential`` models are inlined first
    (:func:`metamix_tf.quant.flatten.flatten`), so a backbone called as one layer is wrapped layer
    by layer. Other weighted layers (e.g. ``SeparableConv2D``) stay float, are listed by
    :func:`unsupported_layers` and in a warning.

    With ``config.output_bits``, every tensor that an integer model stores but no quantized
    layer reads (see :func:`output_quantizers`) gets a one-branch quantizer of that width,
    named ``<producer>_oq``, so that the trained model and its int8 export round the same
    tensors.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ValueError(f"`config` must be a metamix_tf.QuantConfig. Received: config={config!r}")
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model. Received: model={model!r}")
    if not is_graph_model(model):
        raise ValueError(
            "`model` must be a Keras functional or Sequential model (a subclassed model has "
            "no graph to traverse; rebuild it with the functional API). "
            f"Received: model={type(model).__name__}")
    model = flatten(model)  # nested functional / Sequential models become one graph
    if isinstance(model, keras.Sequential):
        # one input and one output: pass the tensors, not 1-lists, so that calling the
        # wrapped model with a tensor matches its input structure
        model = keras.Model(model.inputs[0], model.outputs[0], name=model.name)
    model = canonical.canonicalize(model)  # SeparableConv2D split, activations split out
    _check_names("exclude", config.exclude, model)
    _check_names("include", config.include, model)

    targets = [layer for layer in model.layers if _quant_class(layer) is not None
               and (not config.include or layer.name in config.include)
               and layer.name not in config.exclude]
    for layer in targets:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise ValueError(f"Layer '{layer.name}' uses data_format='channels_first'; only "
                             "channels_last is supported. Received: data_format='channels_first'")
    edge = {targets[0].name, targets[-1].name} if targets and config.first_last_bits else set()
    target_names = {layer.name for layer in targets}

    def clone(layer):
        layer_config = layer.get_config()
        quant_cls = _quant_class(layer) if layer.name in target_names else None
        if type(layer) is keras.layers.Add:  # the same sum; can add as int8 ADD does
            return QuantAdd.from_config(layer_config)
        if quant_cls is None:
            return layer.__class__.from_config(layer_config)
        fixed = config.first_last_bits if layer.name in edge else None
        input_quantizer = ActivationQuantizer(
            candidate_bits=(fixed,) if fixed else config.candidate_bits,
            signed=_input_sign(layer, config.hswish_range), grad_scale=config.grad_scale,
            temperature=config.temperature, name=f"{layer.name}_aq")
        kernel_quantizer = WeightQuantizer(
            bits=fixed or config.weight_bits, channel_axes=quant_cls.channel_axes,
            name=f"{layer.name}_wq")
        return quant_cls(**layer_config, input_quantizer=input_quantizer,
                         kernel_quantizer=kernel_quantizer)

    stored = set(_stored_outputs(model)) if config.output_bits else set()
    operations = {op.name: op for op in model.operations}

    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if layer.name not in stored:
            return outputs
        original = operations[layer.name]
        quantizer = ActivationQuantizer(
            candidate_bits=(config.output_bits,),
            signed=_output_sign(original, config.hswish_range), grad_scale=config.grad_scale,
            temperature=config.temperature, name=f"{layer.name}_oq")
        return quantizer(outputs)

    wrapped = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for old in model.layers:
        weights = old.get_weights()
        if weights:
            new = wrapped.get_layer(old.name)
            new_vars = [v for v in new.weights if not _is_quantizer_variable(new, v)]
            for var, value in zip(new_vars, weights, strict=True):
                var.assign(value)
    float_layers = unsupported_layers(wrapped)
    if float_layers:
        warnings.warn(f"metamix_tf.apply: {len(float_layers)} weighted layer(s) have no "
                      f"quantized form and stay float: {float_layers}", stacklevel=2)
    return wrapped


def _is_quantizer_variable(layer, variable) -> bool:
    if not isinstance(layer, QuantLayerMixin):
        return False
    quantizer_vars = []
    for q in (layer.input_quantizer, layer.kernel_quantizer):
        if q is not None:
            quantizer_vars.extend(q.weights)
    return any(variable is v for v in quantizer_vars)


def quant_layers(model) -> list:
    """The quantized layers of ``model``, in graph order."""
    return [layer for layer in model.layers if isinstance(layer, QuantLayerMixin)]


def output_quantizers(model) -> list[ActivationQuantizer]:
    """The one-branch quantizers that :func:`apply` puts on stored tensors that no quantized
    layer reads (``config.output_bits``), in graph order."""
    return [layer for layer in model.layers if isinstance(layer, ActivationQuantizer)]


def activation_quantizers(model, searchable_only: bool = False) -> list[ActivationQuantizer]:
    """Every activation quantizer, the quantized layers' input quantizers first, then the
    output quantizers (optionally only those with more than one branch)."""
    out = [layer.input_quantizer for layer in quant_layers(model)
           if layer.input_quantizer is not None] + output_quantizers(model)
    return [q for q in out if q.searchable] if searchable_only else out


def weight_quantizers(model) -> list[WeightQuantizer]:
    """Every weight quantizer of ``model``."""
    return [layer.kernel_quantizer for layer in quant_layers(model)
            if layer.kernel_quantizer is not None]


def unsupported_layers(model) -> list[str]:
    """Names of weighted layers that stay float because apply() has no quantized form
    (normalization layers, including the input ``Normalization`` of EfficientNet, are not
    counted: they hold statistics or affine parameters, no multiply-accumulates)."""
    return [layer.name for layer in model.layers
            if isinstance(layer, _UNSUPPORTED) or (
                layer.weights and _quant_class(layer) is None
                and not isinstance(layer, (QuantLayerMixin, ActivationQuantizer) + _NORMALIZATION))]


def _reset_compiled(model) -> None:
    """Drops the model's compiled ``fit`` / ``evaluate`` / ``predict`` functions: they were
    traced at the old modes, and Keras rebuilds them on the next call."""
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def set_mode(model, mode: str) -> None:
    """Puts every activation quantizer in ``mode`` (see :data:`quantizers.MODES`); the
    next ``fit`` / ``evaluate`` / ``predict`` runs in it."""
    for q in activation_quantizers(model):
        q.mode = mode
    _enable_sigmoid_grids(model, mode not in ("float", "calibrate"))
    _reset_compiled(model)


def _enable_sigmoid_grids(model, enabled: bool) -> None:
    """The fixed sigmoid grids of :mod:`canonical` round whenever the quantizers do."""
    for layer in model.layers:
        if isinstance(layer, canonical.SigmoidGrid):
            layer.enabled = enabled


def set_uniform(model, bits: int) -> None:
    """Mode ``"uniform"``: every searchable quantizer at ``bits`` (fixed ones keep theirs).

    Changing ``bits`` changes a Python attribute: call it while tracing (each bit-meta pass
    inside one traced step) or retrace.
    """
    for q in activation_quantizers(model):
        q.mode = "uniform"
        q.uniform_index = q.index_of(bits) if q.searchable else 0
    _enable_sigmoid_grids(model, True)
    _reset_compiled(model)


def select_bits(model, bits: dict | None = None) -> dict:
    """Mode ``"selected"``; ``bits`` maps layer names to bit-widths (None: argmax alpha).

    Layers not named in ``bits`` take their argmax. Returns the bits of every layer.
    """
    bits = dict(bits or {})
    known = {layer.name for layer in quant_layers(model)}
    unknown = sorted(set(bits) - known)
    if unknown:
        raise ValueError("`bits` names layers that are not quantized. "
                         f"Received: bits keys={unknown}")
    selected = {}
    for layer in quant_layers(model):
        q = layer.input_quantizer
        if q is None:
            continue
        q.mode = "selected"
        selected[layer.name] = q.select(bits.get(layer.name))
    for q in output_quantizers(model):  # one branch each
        q.mode = "selected"
    _enable_sigmoid_grids(model, True)
    _reset_compiled(model)
    return selected


def get_bits(model) -> dict:
    """Selected activation bits per quantized layer name."""
    return {layer.name: layer.input_quantizer.selected_bits for layer in quant_layers(model)
            if layer.input_quantizer is not None}


def enable_weight_quantization(model, enabled: bool = True, initialize: bool = True) -> None:
    """Turns weight quantizers on or off. With ``initialize``, a quantizer that this call
    turns on (it was off) gets LSQ initial steps from the current kernel (eagerly, so it is
    also correct under a distribution strategy); one already on keeps its learned steps."""
    for layer in quant_layers(model):
        wq = layer.kernel_quantizer
        if wq is None:
            continue
        if enabled and initialize and not wq.enabled:
            wq.initialize(layer.kernel)
        wq.enabled = enabled
    _reset_compiled(model)


def calibrate(model, images) -> None:
    """LSQ step-size initialisation of every activation quantizer from one batch.

    Runs ``model`` once in ``"calibrate"`` mode (identity quantizers that record
    ``2 * mean|x| / sqrt(Qp)`` for each branch) in inference mode (BatchNorm on its moving
    statistics, as the exported model computes), then restores each quantizer's mode. Call it
    eagerly or inside ``tf.function``. Under a distribution strategy use
    :func:`metamix_tf.training.steps.make_calibrate_step`, which switches the modes outside
    ``strategy.run`` (a mode switched inside one replica's trace leaks into the other
    replicas' traces) and averages the step sizes over replicas; it calibrates on batch
    statistics by default, as the training steps that follow it compute.
    """
    modes = [(q, q.mode) for q in activation_quantizers(model)]
    grids = [(g, g.enabled) for g in model.layers if isinstance(g, canonical.SigmoidGrid)]
    set_mode(model, "calibrate")
    try:
        model(images, training=False)
    finally:
        for q, mode in modes:
            q.mode = mode
        for g, enabled in grids:
            g.enabled = enabled


@dataclasses.dataclass
class VariableGroups:
    """The three variable groups of a wrapped model, defined once for every phase."""

    weights: list  # kernels, biases, BatchNorm gamma/beta
    steps: list  # LSQ step sizes of activation and weight quantizers
    alphas: list  # bit logits of the searchable activation quantizers

    @property
    def weights_and_steps(self) -> list:
        return self.weights + self.steps


def variable_groups(model) -> VariableGroups:
    """Splits ``model.trainable_variables`` into weights, step sizes and bit logits."""
    steps, alphas, excluded = [], [], set()
    for q in activation_quantizers(model):
        steps.append(q.step_size)
        excluded.add(id(q.step_size))
        excluded.add(id(q.alpha))
        if q.searchable:
            alphas.append(q.alpha)
    for wq in weight_quantizers(model):
        steps.append(wq.step_size)
        excluded.add(id(wq.step_size))
    weights = [v for v in model.trainable_variables if id(v) not in excluded]
    return VariableGroups(weights=weights, steps=steps, alphas=alphas)
