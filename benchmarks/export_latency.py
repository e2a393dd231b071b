"""The int8 export's latency beside a plain int8 model of the same network (issue 14).

    python benchmarks/export_latency.py [--model_dir=runs/...] [--rounds=30] [--runs=100]

In one process: MobileNetV2 of the zoo (32x32, 10 classes), either a trained run
(``--model_dir``) or, without one, random weights wrapped and calibrated with random bits
from {2, 3, 4, 8} (``metamix_tf.export.families.quantize_at_random``); then three int8
TFLite files of it:

* ``int8``: our export (``clamps="saturate"``: b-bit bounds clamped by int8 saturation and
  the ReLUs, :mod:`metamix_tf.export.graph`), through :func:`metamix_tf.export.run.export_model`,
  whose report holds the agreement with the Keras model, the grid check and the latency of
  the other two files timed in the same interleaved rounds;
* ``int8_clamp_ops``: the same export with ``clamps="ops"`` (a MINIMUM / MAXIMUM op per b-bit
  bound), the graph before issue 14;
* ``plain_int8``: the same float network (BatchNorm folded, the quantized weights in float,
  no fake quants) through the TF converter's standard full-integer post-training
  quantization with a representative dataset (built here, not a dependency of the package).

Prints op counts per type, median latency (LiteRT, XNNPACK, 1 thread) and the ratios to
``plain_int8``, and the top-1 agreement of each file with the Keras model. ``--json``
writes everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from metamix_tf import models  # noqa: E402
from metamix_tf.export import families, graph, run, tflite, verify  # noqa: E402

CLAMP_OPS = ("MINIMUM", "MAXIMUM")


def random_bit_model(calibration_images: int, seed: int):
    """The zoo's MobileNetV2 (random weights) through ``quantize_at_random``."""
    import keras

    keras.utils.set_random_seed(seed)
    float_model = models.build("mobilenet_v2", (32, 32, 3), 10)
    calibration = families.images_for("MobileNetV2", calibration_images, seed)
    model, bits = families.quantize_at_random(float_model, calibration, seed)
    return model, calibration, bits


def trained_model(model_dir: str, examples: int, calibration_images: int):
    source = run.load_run(model_dir)
    calibration, images, _, _, _ = run._run_data(source, examples, calibration_images)
    return source.model, calibration, images


def float_network(export_plan: graph.ExportPlan):
    """The plan's network without fake quants: BatchNorm folded, the quantized weights as
    float32 kernels."""
    bare = dataclasses.replace(
        export_plan, tensors={},
        inputs={k: dataclasses.replace(p, requantized=False)
                for k, p in export_plan.inputs.items()})
    return graph.build(bare, native=False, name=f"{export_plan.model_name}_float")


def plain_int8(float_model, calibration: np.ndarray, workdir: str) -> bytes:
    """Full-integer post-training quantization (float input and output, as ours)."""
    saved = os.path.join(workdir, "plain_saved_model")
    tflite.export_saved_model(float_model, saved)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

    def representative():
        for image in calibration:
            yield [image[None].astype(np.float32)]

    converter.representative_dataset = representative
    return converter.convert()


def clamp_ops_int8(model, calibration: np.ndarray, workdir: str):
    """Our int8 export with ``clamps="ops"`` (the plan, and the converted file's bytes)."""
    export_plan = graph.plan(model, calibration_data=calibration, clamps="ops")
    saved = os.path.join(workdir, "clamp_ops_saved_model")
    tflite.export_saved_model(graph.build(export_plan, native=True), saved)
    return export_plan, tflite.convert(saved, "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=None, help="a trained mobilenet_v2 run")
    parser.add_argument("--examples", type=int, default=512, help="images for agreement")
    parser.add_argument("--calibration", type=int, default=32, help="as families.export_family")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    parser.add_argument("--runs", type=int, default=100, help="invokes per model per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bits = None
    if args.model_dir:
        model, calibration, images = trained_model(args.model_dir, args.examples,
                                                   args.calibration)
    else:
        model, calibration, bits = random_bit_model(args.calibration, args.seed)
        images = families.images_for("MobileNetV2", args.examples, args.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        old_plan, old = clamp_ops_int8(model, calibration, tmp)
        paths = {"int8_clamp_ops": os.path.join(tmp, "int8_clamp_ops.tflite"),
                 "plain_int8": os.path.join(tmp, "plain_int8.tflite")}
        tflite.write_atomic(paths["int8_clamp_ops"], old)
        tflite.write_atomic(paths["plain_int8"],
                            plain_int8(float_network(old_plan), calibration, tmp))
        report = run.export_model(
            model, os.path.join(tmp, "export"), ("int8",), name="mobilenet_v2",
            calibration_data=calibration, eval_images=images, tensor_costs=False,
            latency_rounds=args.rounds, latency_runs=args.runs, latency_baselines=paths,
            log=lambda _: None)
        v = report["verification"]
        reference = run._reference_logits(model, images)
        agreement = {"int8": v["tflite"]["int8"]["top1_agreement"]}
        for key, path in paths.items():
            agreement[key] = verify.compare(reference, verify.run_tflite(path, images))[
                "top1_agreement"]
        old_grids = verify.check_grids(paths["int8_clamp_ops"], old_plan, images[:64])
        # the same int8 computation with and without the clamp ops: bit-equal logits
        new_vs_old = float(np.abs(verify.run_tflite(report["files"]["int8"]["path"], images)
                                  - verify.run_tflite(paths["int8_clamp_ops"], images)).max())

    lat, graphs = v["latency"], report["graphs"]
    keys = ("int8", "int8_clamp_ops", "plain_int8")
    op_types = sorted(set().union(*(graphs[k]["ops"] for k in keys)))
    print(f"MobileNetV2 32x32, {'run ' + args.model_dir if args.model_dir else 'random bits'}; "
          f"{v['examples']} images; LiteRT {lat['int8']['num_threads']} thread, "
          f"{args.rounds} interleaved rounds x {args.runs} invokes; machine: "
          f"{platform.processor() or platform.machine()} (shared: ratios only)")
    print(f"{'op':<22}" + "".join(f"{k:>16}" for k in keys))
    for op in op_types:
        print(f"{op:<22}" + "".join(f"{graphs[k]['ops'].get(op, 0):>16}" for k in keys))
    print(f"{'total':<22}" + "".join(f"{graphs[k]['num_ops']:>16}" for k in keys))
    print(f"{'median ms':<22}" + "".join(f"{lat[k]['median_ms']:>16.4f}" for k in keys))
    ratios = {k: lat[k]["median_ms"] / lat["plain_int8"]["median_ms"] for k in keys}
    print(f"{'/ plain_int8':<22}" + "".join(f"{ratios[k]:>15.3f}x" for k in keys))
    print(f"{'top-1 agree w/ Keras':<22}" + "".join(f"{agreement[k]:>16.4f}" for k in keys))
    on_grid = {"int8": v["grid_check"]["all_on_grid"],
               "int8_clamp_ops": all(c.on_grid for c in old_grids), "plain_int8": None}
    print(f"{'on b-bit grids':<22}" + "".join(f"{str(on_grid[k]):>16}" for k in keys))
    print(f"max |logit difference| int8 vs int8_clamp_ops: {new_vs_old}")
    print(run.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model_dir": args.model_dir, "bits": bits, "seed": args.seed,
                       "machine": platform.processor() or platform.machine(),
                       "ops": {k: graphs[k]["ops"] for k in keys},
                       "num_ops": {k: graphs[k]["num_ops"] for k in keys},
                       "latency": {k: lat[k] for k in keys}, "over_plain_int8": ratios,
                       "top1_agreement": agreement, "on_grid": on_grid,
                       "max_abs_logit_diff_int8_vs_clamp_ops": new_vs_old,
                       "grid_check_min_match_keras": v["grid_check"]["min_match_keras"]},
                      f, indent=1)


if __name__ == "__main__":
    main()
