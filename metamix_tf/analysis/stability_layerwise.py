"""Per-layer activation instability: the statistic shifts when ONE layer changes its bits.

:func:`metamix_tf.analysis.stability.activation_shift` switches every searchable layer to one
bit-width at once, which is exactly what MetaMix's bit-meta step trains on, so it favours
MetaMix by construction. What a search actually does is move one layer's bits while the
others stay where they are. :func:`layer_swap_shift` measures that: the reference is the
model at its selected bits; for each searchable layer ``L`` and each other candidate ``b``
of ``L``, every layer stays at its selected bits except ``L`` at ``b``, and the quantizer
inputs and BatchNorm batch statistics of the layers downstream of ``L`` are compared with
the reference (the same shift formulas as :mod:`metamix_tf.analysis.stability`). Layers upstream of
``L`` cannot move and are left out of the averages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metamix_tf.analysis import stability
from metamix_tf.quant import wrap

__all__ = ["downstream_entries", "layer_swap_shift"]

_METRICS = ("input_mean_shift", "input_var_shift", "bn_mean_shift", "bn_var_shift")


def downstream_entries(model, probe, layer_name: str) -> set:
    """Names of the probed layers whose input depends on the output of ``layer_name``."""
    nodes, order = stability._graph_nodes(model)
    tainted = {}
    for key in order:
        node = nodes[key]
        tainted[key] = node.operation.name == layer_name or any(
            tainted.get(stability._history_key(t), False) for t in node.input_tensors)
    out = set()
    for name, _, _, _, _, layer in probe.entries:
        inputs = [n.input_tensors[0] for i, n in enumerate(layer._inbound_nodes)
                  if (id(layer), i) in nodes]
        if inputs and tainted.get(stability._history_key(inputs[0]), False):
            out.add(name)
    return out


def layer_swap_shift(model, images, *, bits: dict | None = None,
                     swap_bits: Sequence[int] | None = None, eps: float = 1e-8,
                     batch_size: int | None = None) -> dict:
    """Statistic shifts when one searchable layer at a time leaves its selected bits.

    Args:
      model: a functional model wrapped by :func:`metamix_tf.apply`, calibrated.
      images: one batch (see :func:`metamix_tf.analysis.stability.activation_statistics`).
      bits: the reference bits, layer name -> bits (default: the selected bits).
      swap_bits: the bit-widths each layer is moved to (default: its other candidates);
        a layer's own reference bits are skipped.
      eps, batch_size: as in :func:`metamix_tf.analysis.stability.activation_shift`.

    Returns ``{"per_swap": [{"layer", "from_bits", "to_bits", "num_input", "num_bn",
    <metric>: mean over the downstream layers}], "mean": {<metric>: mean over swaps},
    "mean_by_bits": {b: {<metric>: mean over swaps to b}}}``; a metric is NaN for a swap
    with no downstream layer of its kind. Every quantizer's mode is restored afterwards.
    """
    bits = dict(wrap.get_bits(model) if bits is None else bits)
    probe = stability._Probe(model)
    searchable = [layer for layer in wrap.quant_layers(model)
                  if layer.input_quantizer is not None and layer.input_quantizer.searchable]
    per_swap = []
    with stability._RestoreModes(model):
        ref = stability._run_statistics(model, probe, images, bits, batch_size)
        for layer in searchable:
            down = downstream_entries(model, probe, layer.name)
            targets = layer.input_quantizer.candidate_bits if swap_bits is None else swap_bits
            for b in targets:
                b = int(b)
                if b == bits[layer.name] or b not in layer.input_quantizer.candidate_bits:
                    continue
                stats = stability._run_statistics(model, probe, images,
                                                  {**bits, layer.name: b}, batch_size)
                shift = {k: v for k, v in stability._shift(stats, ref, eps).items()
                         if k in down}
                row = {"layer": layer.name, "from_bits": int(bits[layer.name]), "to_bits": b,
                       "num_input": sum("input_mean_shift" in e for e in shift.values()),
                       "num_bn": sum("bn_mean_shift" in e for e in shift.values())}
                for metric in _METRICS:
                    values = [e[metric] for e in shift.values() if metric in e]
                    row[metric] = float(np.mean(values)) if values else float("nan")
                per_swap.append(row)

    def mean(rows):
        return {m: float(np.nanmean([r[m] for r in rows])) if any(
            not np.isnan(r[m]) for r in rows) else float("nan") for m in _METRICS}

    by_bits = {}
    for row in per_swap:
        by_bits.setdefault(row["to_bits"], []).append(row)
    return {"per_swap": per_swap, "mean": mean(per_swap) if per_swap else {},
            "mean_by_bits": {b: mean(rows) for b, rows in sorted(by_bits.items())}}
