"""The native quantizer kernels (``metamix_tf/quant/native/lsq_kernels.cc``) on single
tensors, against TensorFlow ops that move the same bytes, and builds of the kernels from
other sources side by side.

For each tensor shape (default: a 96-channel expanded MobileNetV2 tensor at 32x32 with
batch 128, and at 224x224 with batch 16) it times, per call (``--tensors`` distinct random
tensors per traced call, so that no call reads another's data from cache and no two calls
are merged):

* ``lsq_forward``: ``MetamixLsqForward`` with a folded ReLU6 (a 4-bit activation quantizer
  after a ReLU6, the common case in the steps), beside ``relu6`` (``tf.nn.relu6``: one read,
  one write, as the forward);
* ``lsq_backward`` (folded ReLU6) and ``lsq_backward_plain`` (no activation), beside
  ``multiply`` (``x * dy``: two reads, one write, as the backward's input gradient; the
  backward also sums its step-size term);
* ``mixture_forward`` / ``mixture_backward``: the joint search's 3-branch mixture (2/4/8
  bits, folded ReLU6).

Each source (``--source NAME=PATH``, repeated; default the installed package's) is compiled
with the package's flags (``metamix_tf.quant.native.load``; ``NAME=PATH:ARCH`` builds it
for another x86-64 level, ``METAMIX_TF_NATIVE_ARCH=ARCH``) and timed in its own child
process (a process can load one build of the ops), the sources alternating over ``--rounds``
rounds; the table gives each kernel's median milliseconds and its ratio to the TensorFlow op
with the same traffic, timed in the same child. An older source comes from git, e.g.
``git show 2ae19df:metamix_tf/quant/native/lsq_kernels.cc > /tmp/old.cc``.

Usage: ``python benchmarks/native_kernels.py [--source before=/tmp/old.cc --source after=...]
[--shapes 128x16x16x96,16x112x112x96] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from metamix_tf.quant import native  # noqa: E402

# kernel -> the TensorFlow op with the same memory traffic
BASELINES = {"lsq_forward": "relu6", "lsq_backward": "multiply",
             "lsq_backward_plain": "multiply", "mixture_forward": "relu6",
             "mixture_backward": "multiply"}
STEP, QN, QP = 0.1, 0.0, 15.0  # an unsigned 4-bit quantizer
MIXTURE = {"steps": [0.4, 0.1, 0.006], "probs": [0.2, 0.5, 0.3], "qns": [0.0, 0.0, 0.0],
           "qps": [3.0, 15.0, 255.0]}  # 2 / 4 / 8 bits


def _calls(lib) -> dict:
    """``name -> fn(xs, dys)``: one traced function per kernel and baseline, each reading
    every tensor of the lists once."""
    s, qn, qp = (tf.constant(v) for v in (STEP, QN, QP))
    mix = {k: tf.constant(v) for k, v in MIXTURE.items()}

    def first(t):  # one element of each output, so nothing is pruned
        return t[(0,) * len(t.shape)]

    def each(body):
        return tf.function(lambda xs, dys: tf.add_n([body(x, dy) for x, dy in
                                                      zip(xs, dys, strict=True)]))

    return {
        "relu6": each(lambda x, dy: first(tf.nn.relu6(x))),
        "multiply": each(lambda x, dy: first(x * dy)),
        "lsq_forward": each(lambda x, dy: first(
            lib.metamix_lsq_forward(x, s, qn, qp, activation="relu6"))),
        "lsq_backward": each(lambda x, dy: tf.add_n(
            [first(t) for t in lib.metamix_lsq_backward(dy, x, s, qn, qp,
                                                        activation="relu6")])),
        "lsq_backward_plain": each(lambda x, dy: tf.add_n(
            [first(t) for t in lib.metamix_lsq_backward(dy, x, s, qn, qp)])),
        "mixture_forward": each(lambda x, dy: first(lib.metamix_mixture_forward(
            x, mix["steps"], mix["probs"], mix["qns"], mix["qps"], activation="relu6"))),
        "mixture_backward": each(lambda x, dy: tf.add_n([first(t) for t in (
            lib.metamix_mixture_backward(dy, x, mix["steps"], mix["probs"], mix["qns"],
                                         mix["qps"], activation="relu6"))])),
    }


def child(source: str, shapes: list[tuple], tensors: int, repeats: int) -> dict:
    """``{shape: {name: median ms per call}}`` for the kernels built from ``source``."""
    lib = native.load(source)
    rng = np.random.default_rng(0)
    out = {}
    for shape in shapes:
        xs = [tf.constant(rng.normal(0, 2, shape).astype(np.float32)) for _ in range(tensors)]
        dys = [tf.constant(rng.normal(0, 1, shape).astype(np.float32)) for _ in range(tensors)]
        calls = _calls(lib)
        for fn in calls.values():
            fn(xs, dys).numpy()  # trace
        times = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():
                began = time.perf_counter()
                fn(xs, dys).numpy()
                times[name].append((time.perf_counter() - began) / tensors * 1e3)
        out["x".join(map(str, shape))] = {n: statistics.median(t) for n, t in times.items()}
    return out


def _shape(text: str) -> tuple:
    return tuple(int(d) for d in text.split("x"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", action="append", default=[],
                        help="NAME=PATH[:ARCH] of a lsq_kernels.cc (repeatable)")
    parser.add_argument("--shapes", default="128x16x16x96,16x112x112x96")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tensors", type=int, default=10, help="distinct tensors per call")
    parser.add_argument("--repeats", type=int, default=3, help="calls per kernel per round")
    parser.add_argument("--save", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = [_shape(s) for s in args.shapes.split(",")]
    if args.child:
        print(json.dumps(child(args.child, shapes, args.tensors, args.repeats)))
        return {}
    sources = dict(s.split("=", 1) for s in args.source) or {"library": native.SOURCE}
    rounds = {name: [] for name in sources}
    for _ in range(args.rounds):
        for name, spec in sources.items():
            path, _, arch = spec.partition(":")
            env = {**os.environ, **({"METAMIX_TF_NATIVE_ARCH": arch} if arch else {})}
            run = subprocess.run(
                [sys.executable, __file__, "--child", os.path.abspath(path), "--shapes",
                 args.shapes, "--tensors", str(args.tensors), "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=True, env=env)
            rounds[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
    results = {name: {shape: {kernel: statistics.median(r[shape][kernel] for r in runs)
                              for kernel in runs[0][shape]} for shape in runs[0]}
               for name, runs in rounds.items()}
    print(f"{os.cpu_count()} CPU cores, TF {tf.__version__}, {args.rounds} rounds "
          f"(sources alternating, one child process each), {args.tensors} tensors per call; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    for shape in results[next(iter(results))]:
        print(f"\n{shape}: ms per call (ratio to the TensorFlow op with the same traffic)")
        print("| kernel | " + " | ".join(results) + " |")
        print("|---|" + "---:|" * len(results))
        for kernel in ["relu6", "multiply", *BASELINES]:
            cells = []
            for name in results:
                ms = results[name][shape][kernel]
                base = BASELINES.get(kernel)
                ratio = f" ({ms / results[name][shape][base]:.2f}x {base})" if base else ""
                cells.append(f"{ms:.2f}{ratio}")
            print(f"| {kernel} | " + " | ".join(cells) + " |")
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"sources": sources, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
