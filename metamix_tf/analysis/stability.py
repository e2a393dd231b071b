"""Activation instability: how activation and BatchNorm statistics move when the bits change.

MetaMix's central argument (Kim et al., AAAI 2024, arXiv 2311.06798) is that changing one
layer's activation bit-width shifts the activation distributions and BatchNorm batch
statistics of the layers after it, even with the weights fixed, and that bit-meta training
gives weights for which they shift less than after a DNAS/EdMIPS-style joint search. The
functions here measure that on any model wrapped by :func:`metamix_tf.apply`, with no
training: each quantizer's ``mode`` and ``uniform_index`` are restored afterwards.

What is measured, per bit-width ``b`` (every searchable quantizer at ``b`` through
:func:`metamix_tf.set_uniform`, or every quantizer in ``"float"`` mode), in one forward pass
with ``training=False`` of a probe model that outputs:

* the *input* of every quantized layer (``layer.input``): the float activation arriving at
  it, before its own quantizer. Its distribution depends on the bits of the layers
  upstream, not on the layer's own bits.
* the input of every ``BatchNormalization`` layer: its per-channel mean and (biased)
  variance over every axis but the BN axis are the batch statistics that BN would compute
  on this batch in training.

Statistics are accumulated in float64 (exactly combinable over ``batch_size`` chunks, since
nothing in an inference pass depends on the batch). Shifts against a reference bit-width:

* quantizer inputs: ``|mean_b - mean_ref| / (std_ref + eps)`` and
  ``|log((var_b + eps) / (var_ref + eps))|``;
* BatchNorm inputs, averaged over channels: ``|mu_b - mu_ref| / sigma_ref`` and
  ``|log(sigma_b^2 + e) - log(sigma_ref^2 + e)|`` with ``sigma_ref = sqrt(var_ref + e)`` and
  ``e`` that BN layer's ``epsilon``, so the mean shift is in units of the normalised output.

About 520 lines, one idea: per-layer activation and BatchNorm statistics at given bits
(the probe, the moments, the shift metric) and the histograms and plot built on the same probe.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from metamix_tf.quant import wrap
from metamix_tf.quant.layers import QuantLayerMixin
from metamix_tf.training import steps

__all__ = [
    "FLOAT",
    "activation_statistics",
    "activation_shift",
    "activation_histograms",
    "plot_histograms",
]

FLOAT = "float"
"""Label of the all-float pass (``bits=None``) in shift and histogram results."""

_INPUT_METRICS = ("input_mean_shift", "input_var_shift")
_BN_METRICS = ("bn_mean_shift", "bn_var_shift")


# -- graph ---------------------------------------------------------------------------------
def _history_key(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None or history.operation is None:
        return None
    return id(history.operation), history.node_index


def _producer_node(tensor):
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def _graph_nodes(model) -> tuple[dict, list]:
    """Nodes reachable from the model's outputs, ``{(id(op), node_index): node}``, and their
    keys in topological order (producers first); iterative, so deep graphs are fine."""
    nodes, order = {}, []
    stack = [(t, False) for t in keras.tree.flatten(model.outputs) if _history_key(t)]
    while stack:
        tensor, expanded = stack.pop()
        key = _history_key(tensor)
        if expanded:
            order.append(key)
            continue
        if key in nodes:
            continue
        nodes[key] = node = _producer_node(tensor)
        stack.append((tensor, True))
        stack.extend((t, False) for t in node.input_tensors
                     if _history_key(t) is not None and _history_key(t) not in nodes)
    return nodes, order


def _is_searchable(op) -> bool:
    return (isinstance(op, QuantLayerMixin) and op.input_quantizer is not None
            and op.input_quantizer.searchable)


class _Probe:
    """A ``keras.Model`` on the wrapped model's graph that outputs the input of every
    quantized and BatchNormalization layer (or of the layers named in ``names``)."""

    def __init__(self, model, names: Sequence[str] | None = None):
        if not isinstance(model, keras.Model) or not hasattr(model, "outputs") or \
                model.outputs is None:
            raise ValueError("`model` must be a functional keras.Model wrapped by "
                             f"metamix_tf.apply(). Received: model={model!r}")
        nodes, order = _graph_nodes(model)
        tainted = {}
        for key in order:
            node = nodes[key]
            tainted[key] = _is_searchable(node.operation) or any(
                tainted.get(_history_key(t), False) for t in node.input_tensors)

        if names is None:
            layers = [layer for layer in model.layers if isinstance(
                layer, (QuantLayerMixin, keras.layers.BatchNormalization))]
        else:
            known = {layer.name: layer for layer in model.layers}
            missing = [n for n in names if n not in known]
            if missing:
                raise ValueError(f"Model '{model.name}' has no layers named {missing}. "
                                 f"Received: layer_name={missing[0]!r}")
            layers = [known[n] for n in names]

        self.entries = []  # (name, kind, output index, channel axis, depends_on_bits, layer)
        tensors, index_of = [], {}
        for layer in layers:
            in_model = [i for i in range(len(layer._inbound_nodes))
                        if (id(layer), i) in nodes]
            if not in_model:
                continue  # not connected to the outputs
            if len(in_model) > 1:
                raise ValueError(
                    f"Layer '{layer.name}' is called {len(in_model)} times in model "
                    f"'{model.name}'; its input statistics are not defined per layer. "
                    f"Received: layer_name={layer.name!r}")
            inputs = nodes[(id(layer), in_model[0])].input_tensors
            if len(inputs) != 1:
                raise ValueError(f"Layer '{layer.name}' takes {len(inputs)} input tensors; "
                                 f"only single-input layers can be probed. "
                                 f"Received: layer_name={layer.name!r}")
            tensor = inputs[0]
            if id(tensor) not in index_of:
                index_of[id(tensor)] = len(tensors)
                tensors.append(tensor)
            rank = len(tensor.shape)
            if isinstance(layer, keras.layers.BatchNormalization):
                kind, axis = "batch_norm", layer.axis % rank
            else:
                kind, axis = ("quantized" if isinstance(layer, QuantLayerMixin) else "layer",
                              rank - 1)
            key = _history_key(tensor)
            depends = bool(key is not None and tainted.get(key, False))
            self.entries.append((layer.name, kind, index_of[id(tensor)], axis, depends, layer))
        self.model = keras.Model(model.input, tensors, name=f"{model.name}_stability_probe")
        self.num_outputs = len(tensors)

    def __call__(self, images):
        outputs = self.model(images, training=False)
        if self.num_outputs == 1 and not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return [keras.ops.convert_to_numpy(o) for o in outputs]


# -- modes ---------------------------------------------------------------------------------
def _label(bits):
    if isinstance(bits, dict):  # per-layer bits (metamix_tf.analysis.stability_layerwise)
        return bits
    return FLOAT if bits is None or bits == FLOAT else int(bits)


def _set_bits(model, bits) -> None:
    """Float mode for ``None``/``"float"``; a dict: each quantized layer at its own bits
    (:func:`metamix_tf.training.steps.fixed_bits`); otherwise every searchable quantizer at
    ``bits``."""
    if isinstance(bits, dict):
        steps.fixed_bits(model, bits)()
    elif _label(bits) == FLOAT:
        wrap.set_mode(model, "float")
        return
    else:
        wrap.set_uniform(model, int(bits))
    uncalibrated = [q.name for q in wrap.activation_quantizers(model)
                    if q.built and float(keras.ops.convert_to_numpy(q.initialized)) == 0.0]
    if uncalibrated:
        warnings.warn(
            f"{len(uncalibrated)} activation quantizer(s) still have their initial step size "
            f"1.0 (e.g. '{uncalibrated[0]}'); run metamix_tf.calibrate(model, images) first "
            "or the statistics describe an arbitrary quantization grid.", stacklevel=3)


class _RestoreModes:
    """Context manager that restores every activation quantizer's mode and uniform index."""

    def __init__(self, model):
        self.saved = [(q, q.mode, q.uniform_index) for q in wrap.activation_quantizers(model)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for q, mode, index in self.saved:
            q.mode = mode
            q.uniform_index = index
        return False


def _candidate_bits(model) -> list[int]:
    bits = sorted({b for q in wrap.activation_quantizers(model, searchable_only=True)
                   for b in q.candidate_bits})
    if not bits:
        raise ValueError(f"Model '{model.name}' has no searchable activation quantizer; pass "
                         "the bit-widths explicitly. Received: bits=None")
    return bits


# -- statistics ----------------------------------------------------------------------------
class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged over chunks (Chan et
    al.'s parallel update), in float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, x: np.ndarray, axis: int) -> None:
        x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
        x = x.reshape(-1, x.shape[-1])
        n, mean = x.shape[0], x.mean(axis=0)
        m2 = np.square(x - mean).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.n * n / total)
        self.n = total

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.n

    def overall(self) -> tuple[float, float]:
        """Mean and variance over every element (channels have equal counts)."""
        mean = float(np.mean(self.mean))
        return mean, float(np.mean(self.var) + np.mean(np.square(self.mean - mean)))


def _num_samples(images) -> int:
    return int(keras.tree.flatten(images)[0].shape[0])


def _chunks(images, batch_size: int | None):
    n = _num_samples(images)
    if batch_size is None or batch_size >= n:
        yield images
        return
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer or None. "
                         f"Received: batch_size={batch_size}")
    for start in range(0, n, batch_size):
        yield keras.tree.map_structure(lambda x, s=start: x[s:s + batch_size], images)


def _layer_bits(layer, label):
    q = getattr(layer, "input_quantizer", None)
    if label == FLOAT or q is None:
        return None
    return int(q.candidate_bits[q.uniform_index])


def _run_statistics(model, probe: _Probe, images, bits, batch_size) -> dict:
    label = _label(bits)
    _set_bits(model, bits)
    moments = {}
    for chunk in _chunks(images, batch_size):
        outputs = probe(chunk)
        for _, _, index, axis, _, _ in probe.entries:
            moments.setdefault((index, axis), _Moments()).update(outputs[index], axis)
    result = {}
    for name, kind, index, axis, depends, layer in probe.entries:
        m = moments[(index, axis)]
        entry = {"kind": kind, "depends_on_bits": depends}
        if kind == "batch_norm":
            entry.update(bn_mean=float(np.mean(m.mean)), bn_var=float(np.mean(m.var)),
                         bn_mean_channels=m.mean.tolist(), bn_var_channels=m.var.tolist(),
                         epsilon=float(layer.epsilon))
        else:
            mean, var = m.overall()
            entry.update(input_mean=mean, input_var=var, bits=_layer_bits(layer, label))
        result[name] = entry
    return result


def activation_statistics(model, images, bits: int | None, *,
                          batch_size: int | None = None) -> dict:
    """Statistics of the activations arriving at each quantized and BatchNorm layer.

    Runs ``model`` (``training=False``) with every searchable quantizer at ``bits``
    (:func:`metamix_tf.set_uniform`; fixed-bit quantizers keep theirs) or, when ``bits`` is
    None, every quantizer in ``"float"`` mode, then restores every quantizer's mode and
    uniform index (also when it raises).

    Args:
      model: a functional model wrapped by :func:`metamix_tf.apply` (calibrate it first).
      images: one batch (array or tensor; a list of them for a multi-input model).
      bits: a candidate bit-width of the searchable quantizers, or None for float.
      batch_size: split ``images`` into chunks of this size to bound memory; the chunks'
        moments are merged exactly in float64, so the result equals one pass up to the
        float32 round-off of the forward itself (kernels may round differently per batch
        size; about 1e-8 relative on CPU).

    Returns:
      ``{layer_name: entry}`` in layer order. A quantized layer's entry has ``"input_mean"``
      and ``"input_var"`` (over every element of its float input, before its own
      quantizer) and ``"bits"`` (its own bits in this pass, None in float); a
      BatchNormalization layer's has ``"bn_mean"`` and ``"bn_var"`` (the per-channel batch
      mean and biased variance over every axis but the BN axis, averaged over channels),
      the per-channel lists ``"bn_mean_channels"`` and ``"bn_var_channels"``, and the
      layer's ``"epsilon"``. Every entry has ``"kind"`` (``"quantized"`` or
      ``"batch_norm"``) and ``"depends_on_bits"``: whether a searchable quantizer lies
      upstream, i.e. whether the input can change with the bits at all (the first layer's
      input, the raw image, cannot).
    """
    probe = _Probe(model)
    with _RestoreModes(model):
        return _run_statistics(model, probe, images, bits, batch_size)


def _shift(stats: dict, ref: dict, eps: float) -> dict:
    out = {}
    for name, r in ref.items():
        s = stats[name]
        entry = {"depends_on_bits": r["depends_on_bits"]}
        if r["kind"] == "batch_norm":
            e = r["epsilon"]
            mu_b, mu_r = np.asarray(s["bn_mean_channels"]), np.asarray(r["bn_mean_channels"])
            var_b = np.asarray(s["bn_var_channels"]) + e
            var_r = np.asarray(r["bn_var_channels"]) + e
            entry.update(bn_mean_shift=float(np.mean(np.abs(mu_b - mu_r) / np.sqrt(var_r))),
                         bn_var_shift=float(np.mean(np.abs(np.log(var_b / var_r)))))
        else:
            std_r = math.sqrt(r["input_var"])
            entry.update(
                input_mean_shift=abs(s["input_mean"] - r["input_mean"]) / (std_r + eps),
                input_var_shift=abs(math.log((s["input_var"] + eps) / (r["input_var"] + eps))))
        out[name] = entry
    return out


def _mean_shift(per_layer: dict) -> dict:
    out = {}
    for metrics in (_INPUT_METRICS, _BN_METRICS):
        rows = [e for e in per_layer.values() if metrics[0] in e and e["depends_on_bits"]]
        for metric in metrics:
            out[metric] = float(np.mean([e[metric] for e in rows])) if rows else float("nan")
    return out


def activation_shift(model, images, bits: Sequence[int] | None = None, reference=None, *,
                     eps: float = 1e-8, batch_size: int | None = None) -> dict:
    """How far activation and BatchNorm statistics move from ``reference`` at each bit-width.

    One forward pass per bit-width (the reference is run once and reused), then for each
    ``b`` in ``bits`` and each layer: ``|mean_b - mean_ref| / (std_ref + eps)`` and
    ``|log((var_b + eps) / (var_ref + eps))|`` of the quantized layers' float inputs, and,
    for each BatchNormalization layer, the channel averages of ``|mu_b - mu_ref| /
    sqrt(var_ref + e)`` and ``|log((var_b + e) / (var_ref + e))|`` with ``e`` the layer's
    epsilon. At ``b == reference`` every shift is exactly 0.

    Args:
      model: a functional model wrapped by :func:`metamix_tf.apply`, calibrated.
      images: one batch (see :func:`activation_statistics`).
      bits: bit-widths to compare (default: the union of the searchable quantizers'
        candidates); ``"float"`` (or None as an element) is the all-float pass.
      reference: the reference bit-width (default: the largest candidate), or ``"float"``.
      eps: added to the standard deviation and variances of the quantizer inputs.
      batch_size: chunk size for the forward passes (see :func:`activation_statistics`).

    Returns:
      ``{"bits": [...], "reference": ..., "per_layer": {b: {layer_name: {...}}},
      "mean": {b: {"input_mean_shift", "input_var_shift", "bn_mean_shift",
      "bn_var_shift"}}, "num_layers": {"input": n, "bn": m}}``. ``"mean"`` averages over
      the layers whose input depends on the bits (``"depends_on_bits"``; the layers that
      cannot shift would only dilute the average), ``"num_layers"`` counts them; NaN when
      there are none.
    """
    bits = _candidate_bits(model) if bits is None else list(dict.fromkeys(map(_label, bits)))
    reference = max(_candidate_bits(model)) if reference is None else _label(reference)
    probe = _Probe(model)
    with _RestoreModes(model):
        ref = _run_statistics(model, probe, images, reference, batch_size)
        per_layer, mean = {}, {}
        for b in bits:
            stats = ref if b == reference else _run_statistics(
                model, probe, images, b, batch_size)
            per_layer[b] = _shift(stats, ref, eps)
            mean[b] = _mean_shift(per_layer[b])
    depends = [e for e in ref.values() if e["depends_on_bits"]]
    return {
        "bits": list(bits),
        "reference": reference,
        "per_layer": per_layer,
        "mean": mean,
        "num_layers": {"input": sum(e["kind"] != "batch_norm" for e in depends),
                       "bn": sum(e["kind"] == "batch_norm" for e in depends)},
    }


# -- histograms ----------------------------------------------------------------------------
def activation_histograms(model, images, layer_name: str, bits_list: Sequence[int] | None = None,
                          num_bins: int = 60, *, value_range: tuple[float, float] | None = None
                          ) -> dict:
    """Histograms of the input activations of one layer at each bit-width, with shared edges.

    The layer (typically a quantized one, e.g. an early depthwise conv) is probed at its
    input, before its own quantizer; the model runs once in float mode and once per entry of
    ``bits_list`` (every searchable quantizer at that bit-width). Modes are restored.

    Args:
      model: a functional model wrapped by :func:`metamix_tf.apply`, calibrated.
      images: one batch.
      layer_name: name of a single-input layer of ``model``.
      bits_list: bit-widths (default: the searchable candidates); ``"float"`` is always
        added first.
      num_bins: number of bins.
      value_range: ``(low, high)`` of the bin edges (default: min and max over every
        pass). Values outside are counted in the edge bins, so counts always sum to the
        number of elements.

    Returns:
      ``{"layer", "labels" (["float", b, ...]), "edges" (num_bins + 1 floats),
      "counts" ({label: num_bins ints}), "num_elements", "mean" and "std" ({label: float}),
      "depends_on_bits"}``. With ``first_last_bits`` set, the first conv is fixed, so the
      input of the layer right after it (e.g. MobileNet-v2's ``expanded_conv_depthwise``)
      is the same at every bit-width (``"depends_on_bits": False``); pick a later one.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"`num_bins` must be a positive integer. Received: num_bins={num_bins!r}")
    bits_list = _candidate_bits(model) if bits_list is None else list(bits_list)
    labels = [FLOAT] + [b for b in dict.fromkeys(_label(b) for b in bits_list) if b != FLOAT]
    probe = _Probe(model, names=[layer_name])
    if not probe.entries:
        raise ValueError(f"Layer '{layer_name}' is not connected to the outputs of model "
                         f"'{model.name}'. Received: layer_name={layer_name!r}")
    values = {}
    with _RestoreModes(model):
        for label in labels:
            _set_bits(model, label)
            values[label] = probe(images)[0].astype(np.float32).ravel()
    if value_range is None:
        low = min(float(v.min()) for v in values.values())
        high = max(float(v.max()) for v in values.values())
    else:
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ValueError("`value_range` must be (low, high) with high > low. "
                             f"Received: value_range={value_range!r}")
    if not high > low:  # a constant input
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, num_bins + 1)
    counts, means, stds = {}, {}, {}
    for label, v in values.items():
        counts[label] = np.histogram(np.clip(v, low, high), bins=edges)[0].tolist()
        v64 = v.astype(np.float64)
        means[label], stds[label] = float(v64.mean()), float(v64.std())
    return {"layer": layer_name, "labels": labels, "edges": edges.tolist(), "counts": counts,
            "num_elements": int(next(iter(values.values())).size), "mean": means, "std": stds,
            "depends_on_bits": probe.entries[0][4]}


def plot_histograms(hists, path, *, log_y: bool = True) -> None:
    """Plots :func:`activation_histograms` results to a PNG (matplotlib's Agg canvas).

    Args:
      hists: one result (one panel), or a list of ``(title, result)`` pairs, one panel
        each side by side (e.g. the same layer after MetaMix and after a joint search).
      path: output file; its folder is created if needed.
      log_y: logarithmic y axis (post-ReLU activations have a large spike at 0).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(None, hists)] if isinstance(hists, dict) else list(hists)
    if not panels:
        raise ValueError(f"`hists` is empty. Received: hists={hists!r}")
    fig = Figure(figsize=(5.0 * len(panels), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, h) in zip(axes, panels, strict=True):
        edges = np.asarray(h["edges"])
        bit_labels = [lb for lb in h["labels"] if lb != FLOAT]
        for label in h["labels"]:
            frac = np.asarray(h["counts"][label], np.float64) / max(h["num_elements"], 1)
            if label == FLOAT:
                style = dict(color="black", linewidth=1.6, zorder=3)
            else:
                color = _bit_color(bit_labels.index(label), len(bit_labels))
                style = dict(color=color, linewidth=1.2, zorder=2)
            ax.stairs(frac, edges, label="float" if label == FLOAT else f"{label}-bit",
                      **style)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title or f"input of {h['layer']}")
        ax.set_xlabel(f"input activation of {h['layer']}")
        ax.set_ylabel("fraction of elements")
        ax.legend(fontsize="small")
    fig.tight_layout()
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)


def _bit_color(i: int, n: int) -> tuple:
    from matplotlib import colormaps

    return colormaps["viridis"](0.15 + 0.7 * (i / max(n - 1, 1)))
