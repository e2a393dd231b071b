"""Where a training step's time goes, op type by op type: one of ``step_overhead.py``'s
steps (the library's own step functions on MobileNetV2, random weights and data) run under
TensorFlow's profiler, its op statistics summed per op type.

Needs the profiler's reader, ``pip install xprof`` (not a dependency of the package). The
times are busy time summed over TensorFlow's threads (``IDLE`` is the threads' idle time),
per step; on 2 cores they add up to about twice the step's wall time. Run it on a quiet
machine.

Usage: ``python benchmarks/step_profile.py [--variant selected] [--size 32 --batch 128]
[--steps 5] [--top 20]``
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from step_overhead import (  # noqa: E402
    CANDIDATES,
    _sync,
    calibrated,
    float_step,
    joint_step,
    random_batch,
    selected_step,
)

import metamix_tf  # noqa: E402

VARIANTS = ("float", "selected", "joint")


def op_type_totals(xplane: str) -> tuple[dict, dict]:
    """``({op type: microseconds}, {op type: occurrences})`` from a profile's ``.xplane.pb``."""
    from xprof.convert import raw_to_tool_data  # the profiler's reader (pip install xprof)

    data, _ = raw_to_tool_data.xspace_to_tool_data([xplane], "framework_op_stats", {})
    table = json.loads(data)[0]
    columns = [c["id"] for c in table["cols"]]
    micros, count = collections.Counter(), collections.Counter()
    for row in table["rows"]:
        values = dict(zip(columns, [cell.get("v") if cell else None for cell in row["c"]],
                          strict=True))
        micros[values["type"]] += values["total_self_time"]
        count[values["type"]] += values["occurrences"]
    return dict(micros), dict(count)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default="selected")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    strategy = tf.distribute.get_strategy()
    images, labels = random_batch(args.size, args.batch)
    float_model, fn = float_step(strategy, args.size)
    if args.variant != "float":
        config = metamix_tf.QuantConfig(candidate_bits=CANDIDATES, weight_bits=4)
        model = calibrated(strategy, float_model, config, images, labels)
        fn = (selected_step if args.variant == "selected" else joint_step)(strategy, model)
    for _ in range(5):  # tracing, graph optimization, warm-up
        _sync(fn(images, labels))
    logdir = tempfile.mkdtemp()
    tf.profiler.experimental.start(logdir)
    for _ in range(args.steps):
        _sync(fn(images, labels))
    tf.profiler.experimental.stop()
    micros, count = op_type_totals(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    total = sum(micros.values())
    print(f"{args.variant} step, MobileNetV2 {args.size}x{args.size}, batch {args.batch}: "
          f"{total / args.steps / 1e3:.1f} ms of thread time per step (idle included)")
    print("| op type | ms per step | share | ops per step |")
    print("|---|---:|---:|---:|")
    for name, us in sorted(micros.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name} | {us / args.steps / 1e3:.1f} | {100 * us / total:.1f}% "
              f"| {count[name] / args.steps:.0f} |")
    return micros


if __name__ == "__main__":
    main()
