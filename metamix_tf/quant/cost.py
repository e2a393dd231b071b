"""BitOPs cost model: per-layer MACs from shapes, BitOPs = MACs x a_bits x w_bits.

``GBOPs = sum_l MACs_l * a_bits_l * w_bits_l / 1e9``. During the search, ``a_bits_l`` is
:func:`metamix_tf.quant.ops.argmax_bits_ste` (forward the argmax bits, backward through the
softmax), which makes the cost term of the bit-search loss differentiable in the alphas.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from metamix_tf.quant import ops, wrap

__all__ = ["layer_macs", "LayerCost", "CostModel"]


def layer_macs(layer) -> int:
    """Multiply-accumulates of one call of a Conv2D/DepthwiseConv2D/Dense layer.

    ``MACs = prod(output shape without batch) * kernel size / output channels``: every
    output element takes ``kh*kw*cin/groups`` (Conv2D), ``kh*kw`` (depthwise) or ``in``
    (Dense) multiply-accumulates.
    """
    out_shape = layer.output.shape[1:]
    if any(d is None for d in out_shape):
        raise ValueError(f"Layer '{layer.name}' has an undefined output shape {tuple(out_shape)}; "
                         "build the model with a fixed input size to count MACs.")
    kernel_shape = layer.kernel.shape
    out_channels = out_shape[-1]
    return int(np.prod(out_shape)) * int(np.prod(kernel_shape)) // int(out_channels)


@dataclasses.dataclass
class LayerCost:
    name: str
    layer_type: str
    macs: int
    params: int
    input_elements: int  # per sample
    w_bits: int
    candidate_bits: tuple
    signed: bool
    searchable: bool


class CostModel:
    """Cost of a wrapped model, built once from its shapes (cheap to evaluate per step)."""

    def __init__(self, model, float_weight_bits: int = 32):
        self.model = model
        self.layers = []
        self._quantizers = []
        for layer in wrap.quant_layers(model):
            q = layer.input_quantizer
            wq = layer.kernel_quantizer
            self.layers.append(LayerCost(
                name=layer.name, layer_type=type(layer).__name__, macs=layer_macs(layer),
                params=int(np.prod(layer.kernel.shape)),
                input_elements=int(np.prod(layer.input.shape[1:])),
                w_bits=wq.bits if wq is not None else float_weight_bits,
                candidate_bits=q.candidate_bits if q is not None else (32,),
                signed=q.signed if q is not None else True,
                searchable=q is not None and q.searchable))
            self._quantizers.append(q)
        self.unsupported = wrap.unsupported_layers(model)

    @property
    def total_macs(self) -> int:
        return sum(c.macs for c in self.layers)

    def gbops(self, bits: dict | None = None) -> float:
        """GBOPs at ``bits`` (layer name -> activation bits; default: the selected bits)."""
        bits = wrap.get_bits(self.model) if bits is None else bits
        return sum(c.macs * bits[c.name] * c.w_bits for c in self.layers) / 1e9

    def uniform_gbops(self, a_bits: float) -> float:
        """GBOPs with every searchable layer at ``a_bits`` (fixed layers keep theirs)."""
        return sum(c.macs * (a_bits if c.searchable else c.candidate_bits[0]) * c.w_bits
                   for c in self.layers) / 1e9

    def bounds(self) -> tuple[float, float]:
        """Smallest and largest GBOPs that the candidate bits allow."""
        low = sum(c.macs * min(c.candidate_bits) * c.w_bits for c in self.layers) / 1e9
        high = sum(c.macs * max(c.candidate_bits) * c.w_bits for c in self.layers) / 1e9
        return low, high

    def check_target(self, target: float) -> float:
        """Returns ``target`` if the candidates can reach it, else raises with the range."""
        low, high = self.bounds()
        if not low - 1e-9 <= target <= high + 1e-9 or not math.isfinite(target):
            raise ValueError(
                f"The GBOPs target {target:.4f} is outside what the candidate bits allow "
                f"[{low:.4f}, {high:.4f}]; pick a target in that range. "
                f"Received: target_gbops={target}")
        return float(target)

    def fit_to_target(self, bits: dict, target: float, scores: dict) -> dict:
        """``bits`` lowered one layer at a time until they cost at most ``target`` GBOPs.

        Each step lowers the searchable layer whose next lower candidate gives up the least
        preference per GBOP saved, ``(scores[l][now] - scores[l][lower]) / saved_l``, with
        ``scores`` a layer's per-candidate preferences (its alphas). Bits within the target
        come back unchanged. Returns a new dict.
        """
        self.check_target(target)
        bits = dict(bits)
        by_name = {c.name: c for c in self.layers}
        missing = sorted(c.name for c in self.layers if c.searchable and c.name not in scores)
        if missing:
            raise ValueError(f"`scores` has no entry for searchable layers {missing}. "
                             f"Received: scores keys={sorted(scores)}")
        while self.gbops(bits) > target * (1 + 1e-9):
            best, best_ratio = None, math.inf
            for name, now in bits.items():
                c = by_name[name]
                if not c.searchable or now == c.candidate_bits[0]:  # sorted candidates
                    continue
                i = c.candidate_bits.index(now)
                lower = c.candidate_bits[i - 1]
                saved = c.macs * (now - lower) * c.w_bits / 1e9
                ratio = (float(scores[name][i]) - float(scores[name][i - 1])) / saved
                if ratio < best_ratio:
                    best, best_ratio = (name, lower), ratio
            if best is None:  # unreachable after check_target; kept as a guard
                raise ValueError(f"Cannot lower the bits below {self.gbops(bits):.4f} GBOPs "
                                 f"to reach the target. Received: target_gbops={target}")
            bits[best[0]] = best[1]
        return bits

    def argmax_gbops_ste(self) -> tf.Tensor:
        """Differentiable GBOPs of the current alphas (straight-through argmax)."""
        total = tf.constant(0.0)
        for c, q in zip(self.layers, self._quantizers, strict=True):
            if c.searchable:
                a_bits = ops.argmax_bits_ste(tf.convert_to_tensor(q.alpha),
                                             np.asarray(q.candidate_bits, np.float32),
                                             q.temperature)
            else:
                a_bits = float(c.candidate_bits[0])
            total += (c.macs * c.w_bits / 1e9) * a_bits
        return total

    def report(self, bits: dict | None = None) -> dict:
        """Per-layer table and totals as a dict (JSON ready)."""
        bits = wrap.get_bits(self.model) if bits is None else bits
        rows = []
        for c in self.layers:
            a = bits[c.name]
            rows.append(dict(name=c.name, type=c.layer_type, macs=c.macs, a_bits=a,
                             w_bits=c.w_bits, signed=c.signed, searchable=c.searchable,
                             gbops=c.macs * a * c.w_bits / 1e9))
        searchable = [r for r in rows if r["searchable"]]
        mac_sum = sum(r["macs"] for r in searchable) or 1
        return dict(
            gbops=sum(r["gbops"] for r in rows),
            macs=self.total_macs,
            avg_activation_bits=float(np.mean([r["a_bits"] for r in searchable]))
            if searchable else float("nan"),
            mac_weighted_activation_bits=sum(r["a_bits"] * r["macs"] for r in searchable)
            / mac_sum,
            weight_memory_bytes=sum(c.params * c.w_bits for c in self.layers) / 8,
            activation_memory_bytes=sum(c.input_elements * bits[c.name] for c in self.layers)
            / 8,
            layers=rows,
            unsupported_float_layers=self.unsupported,
        )

    def format_report(self, bits: dict | None = None) -> str:
        """The report as a fixed-width text table."""
        r = self.report(bits)
        width = max([len(row["name"]) for row in r["layers"]] + [5])
        lines = [f"{'layer':<{width}}  {'type':<20} {'MACs':>12} {'A':>3} {'W':>3} "
                 f"{'sign':>4} {'GBOPs':>9}"]
        for row in r["layers"]:
            lines.append(f"{row['name']:<{width}}  {row['type']:<20} {row['macs']:>12,} "
                         f"{row['a_bits']:>3} {row['w_bits']:>3} "
                         f"{'s' if row['signed'] else 'u':>4} {row['gbops']:>9.4f}")
        lines.append(
            f"total: {r['gbops']:.4f} GBOPs, {r['macs'] / 1e6:.1f}M MACs, avg activation bits "
            f"{r['avg_activation_bits']:.2f} (MAC-weighted "
            f"{r['mac_weighted_activation_bits']:.2f}), weights "
            f"{r['weight_memory_bytes'] / 1024:.1f} KiB, activations "
            f"{r['activation_memory_bytes'] / 1024:.1f} KiB/sample")
        if r["unsupported_float_layers"]:
            lines.append("left in float (unsupported): " + ", ".join(r["unsupported_float_layers"]))
        return "\n".join(lines)
