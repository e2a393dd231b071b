"""Formulations of the LSQ quantizer's kernels, timed side by side before any goes into the
library (issue 14: where the quantized training step's overhead is).

Part 1, inside the training step: the library's own step functions (``steps``) on
MobileNetV2 (random weights and data, candidates 2/4/8), each traced while one formulation
of the quantization function stands in for ``metamix_tf.quant.ops``'s (swapped at trace time
only: a diagnostic that touches the module's private functions), timed in interleaved rounds
beside the float step; ratios within rounds. Weight training at 4-bit activations and
weights (``selected``):

* ``library``: ``ops`` as it is (its native C++ kernels, ``metamix_tf.quant.native``; the
  XLA kernels with ``METAMIX_TF_NATIVE_OPS=0``);
* ``sum_in_kernel``: the step-size term summed inside the backward XLA kernel (a scalar out
  instead of a full-size term and TensorFlow's ``Sum``; per-tensor steps only);
* ``sum_over_batch_in_kernel``: summed over the batch axis inside the kernel, the rest by
  ``Sum``;
* ``plain_ops``: the same arithmetic as separate TensorFlow ops (no XLA kernels).

and the joint search step on the mixture (``joint``): ``library`` against
``mixture_sums_in_kernel`` (one backward kernel for the input gradient and every branch's
probability and step-size sums).

Part 2, one tensor (``--tensors``): ReLU6 followed by the quantizer against one fused
kernel, forward ``round(clip(clip(z, 0, 6) / s, 0, Qp)) * s`` and backward with both masks
(the fusion a graph rewrite would need), with their gradients compared bit for bit.

Usage: ``python benchmarks/quantizer_kernels.py [--size 32 --batch 128] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from step_overhead import (  # noqa: E402
    CANDIDATES,
    _sync,
    calibrated,
    float_step,
    interleaved,
    joint_step,
    random_batch,
    selected_step,
    traced_with,
)

import metamix_tf  # noqa: E402
from metamix_tf.quant import ops  # noqa: E402


def _zero(t):
    return tf.zeros_like(t)


def _plain(kernel):
    """The plain TensorFlow function behind one of ``ops``' XLA kernels."""
    return getattr(kernel, "__wrapped__", kernel)  # METAMIX_TF_XLA_OPS=0: no kernel


# ``dx = dy 1[in range]`` and the per-element step term, as ``ops`` computes them
_step_term = _plain(ops._quantize_backward)


@ops._fused
def _backward_sum(dy, x, step, qn, qp):
    dx, term = _step_term(dy, x, step, qn, qp)
    return dx, tf.reduce_sum(term)


@ops._fused
def _backward_batch_sum(dy, x, step, qn, qp):
    dx, term = _step_term(dy, x, step, qn, qp)
    return dx, tf.reduce_sum(term, axis=0)


def _quantize_variant(kind: str):
    """A stand-in for ``ops._lsq_quantize`` (same forward; backward per ``kind``)."""
    forward = _plain(ops._quantize_forward) if kind == "plain_ops" else ops._quantize_forward

    @tf.custom_gradient
    def quantize(x, step, qn, qp, grad_scale):
        def grad(dy):
            if step.shape.rank == 0 and kind == "sum_in_kernel":
                dx, dstep = _backward_sum(dy, x, step, qn, qp)
            elif step.shape.rank == 0 and kind == "sum_over_batch_in_kernel":
                dx, partial = _backward_batch_sum(dy, x, step, qn, qp)
                dstep = tf.reduce_sum(partial)
            else:
                backward = (_step_term if kind == "plain_ops" else ops._quantize_backward)
                dx, term = backward(dy, x, step, qn, qp)
                dstep = ops._sum_to_shape(term, step.shape)
            return dx, dstep * grad_scale, _zero(qn), _zero(qp), _zero(grad_scale)

        return forward(x, step, qn, qp), grad

    return quantize


@ops._fused
def _mixture_backward(dy, x, steps_, probs, qns, qps, num_branches: int):
    gate, prob_sums, step_sums = tf.zeros_like(x), [], []
    for k in range(num_branches):
        v, c, inside = ops._grid(x, steps_[k], qns[k], qps[k])
        r = tf.round(c)
        gate += tf.where(inside, probs[k], 0.0)
        prob_sums.append(tf.reduce_sum(dy * r))
        step_sums.append(tf.reduce_sum(dy * (r - tf.where(inside, v, _zero(v)))))
    return dy * gate, tf.stack(prob_sums), tf.stack(step_sums)


@tf.custom_gradient
def _mixture_sums_in_kernel(x, steps_, probs, qns, qps, grad_scale):
    k = steps_.shape[0]

    def grad(dy):
        dx, prob_sums, step_sums = _mixture_backward(dy, x, steps_, probs, qns, qps, k)
        return (dx, probs * step_sums * grad_scale, prob_sums * steps_, _zero(qns), _zero(qps),
                _zero(grad_scale))

    return ops._mixture_forward(x, steps_, probs, qns, qps, k), grad


def build(size: int, images, labels) -> dict:
    strategy = tf.distribute.get_strategy()
    float_model, float_train = float_step(strategy, size)
    config = metamix_tf.QuantConfig(candidate_bits=CANDIDATES, weight_bits=4)
    out = {"float": float_train}
    quantize = ("_lsq_quantize", "_lsq_quantize_native")  # a variant stands in for both
    mixture = ("_lsq_mixture", "_lsq_mixture_native")
    for kind in ("library", "sum_in_kernel", "sum_over_batch_in_kernel", "plain_ops"):
        step = selected_step(strategy, calibrated(strategy, float_model, config, images, labels))
        out[f"selected/{kind}"] = (step if kind == "library" else traced_with(
            step, dict.fromkeys(quantize, _quantize_variant(kind))))
    for kind in ("library", "mixture_sums_in_kernel"):
        step = joint_step(strategy, calibrated(strategy, float_model, config, images, labels))
        out[f"joint/{kind}"] = (step if kind == "library" else traced_with(
            step, dict.fromkeys(mixture, _mixture_sums_in_kernel)))
    return out


def in_step(size: int, batch: int, rounds: int, calls: int) -> dict:
    images, labels = random_batch(size, batch)
    fns = build(size, images, labels)
    for fn in fns.values():
        for _ in range(2):  # tracing and compilation, then one warm call
            _sync(fn(images, labels))
    _, ratios = interleaved(fns, images, labels, rounds, calls, ("float",))
    return {name: statistics.median(v["float"]) for name, v in ratios.items()}


# -- part 2: ReLU6 and the quantizer, fused or not, on one tensor -----------------------------
@ops._fused
def _relu6_quantize_forward(z, step, qn, qp):
    return tf.round(tf.clip_by_value(tf.clip_by_value(z, 0.0, 6.0) / step, -qn, qp)) * step


@ops._fused
def _relu6_quantize_backward(dy, z, step, qn, qp):
    dx, term = _step_term(dy, tf.clip_by_value(z, 0.0, 6.0), step, qn, qp)
    relu_passes = tf.logical_and(z > 0.0, z < 6.0)  # tf.nn.relu6's gradient mask
    return tf.where(relu_passes, dx, _zero(dx)), term


@tf.custom_gradient
def _relu6_quantize(z, step, qn, qp, grad_scale):
    def grad(dy):
        dz, term = _relu6_quantize_backward(dy, z, step, qn, qp)
        return dz, tf.reduce_sum(term) * grad_scale, _zero(qn), _zero(qp), _zero(grad_scale)

    return _relu6_quantize_forward(z, step, qn, qp), grad


def one_tensor(shape, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    z = tf.constant(rng.normal(0.0, 3.0, shape).astype(np.float32))
    dy = tf.constant(rng.normal(size=shape).astype(np.float32))
    step, qn, qp, scale = tf.constant(0.4), tf.constant(0.0), tf.constant(15.0), tf.constant(0.01)

    def make(kind):
        @tf.function
        def fn(z, dy):
            with tf.GradientTape() as tape:
                tape.watch([z, step])
                if kind == "relu6":
                    y = tf.nn.relu6(z)
                elif kind == "relu6_then_quantizer":
                    y = ops.lsq_quantize(tf.nn.relu6(z), step, qn, qp, scale)
                else:
                    y = _relu6_quantize(z, step, qn, qp, scale)
            dz, dstep = tape.gradient(y, [z, step], output_gradients=dy)
            return dz, tf.zeros(()) if dstep is None else dstep

        return fn

    fns = {kind: make(kind) for kind in ("relu6", "relu6_then_quantizer", "fused")}
    fns["relu6"](z, dy)  # traced before timing, as the other two are here
    separate, fused = fns["relu6_then_quantizer"](z, dy), fns["fused"](z, dy)
    same = bool(tf.reduce_all(separate[0] == fused[0])) and float(separate[1]) == float(fused[1])
    times = {kind: [] for kind in fns}
    for _ in range(rounds):
        for kind, fn in fns.items():
            start = time.perf_counter()
            fn(z, dy)[0].numpy()
            times[kind].append(time.perf_counter() - start)
    ms = {kind: statistics.median(v) * 1e3 for kind, v in times.items()}
    return {"ms": ms, "gradients_equal": same,
            "quantizer_ms_separate": ms["relu6_then_quantizer"] - ms["relu6"],
            "quantizer_ms_fused": ms["fused"] - ms["relu6"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3, help="calls per variant per round")
    parser.add_argument("--tensors", default="128x17x17x96,16x112x112x96",
                        help="comma-separated shapes for part 2 ('' to skip it)")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPU cores, TF {tf.__version__}; MobileNetV2 {args.size}x"
          f"{args.size}, batch {args.batch}, {args.rounds} interleaved rounds")
    print("| step / formulation | vs float (median of rounds) |\n|---|---:|")
    for name, ratio in in_step(args.size, args.batch, args.rounds, args.calls).items():
        print(f"| {name} | {ratio:.3f}x |")
    if args.tensors:
        print("\n| tensor | ReLU6 ms | ReLU6 then quantizer ms | fused ms | quantizer's own ms, "
              "separate / fused | gradients bit-equal |\n|---|---:|---:|---:|---|---|")
        for text in args.tensors.split(","):
            shape = tuple(int(v) for v in text.split("x"))
            r = one_tensor(shape, args.rounds * 2)
            print(f"| {text} | {r['ms']['relu6']:.2f} | {r['ms']['relu6_then_quantizer']:.2f} | "
                  f"{r['ms']['fused']:.2f} | {r['quantizer_ms_separate']:.2f} / "
                  f"{r['quantizer_ms_fused']:.2f} | {r['gradients_equal']} |")


if __name__ == "__main__":
    main()
