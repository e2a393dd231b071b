"""int8 export of the keras.applications CNN families: agreement, size and latency.

For each family (``metamix_tf.export.families``: random weights, small input, BatchNorm
statistics from one batch, ``apply()``, calibration, random bits from {2, 3, 4, 8}, 4-bit
weights, biases snapped), exports int8 and float32 TFLite and prints: top-1 agreement of
the int8 model with the Keras model on ``--examples`` inputs (and with the same Keras model
computed in float64, ``metamix_tf.export.precision``), whether every quantized input
is on its b-bit grid, the int8 file size, and the float32 / int8 median latency (1 thread,
XNNPACK). Results go to ``--json`` one family at a time; ``--markdown`` writes the table.

Usage: ``python benchmarks/export_families.py [--families MobileNetV2,ResNet50]
[--examples 64] [--json docs/results/export_families.json]
[--markdown docs/results/export_families.md]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from metamix_tf.export import families  # noqa: E402

ORDER = ("MobileNetV3Small", "EfficientNetB0", "ResNet50V2", "DenseNet121", "Xception",
         "MobileNet", "MobileNetV2", "MobileNetV3Large", "EfficientNetV2B0", "ResNet50",
         "VGG16", "InceptionV3", "NASNetMobile", "InceptionResNetV2", "ConvNeXtTiny")


def measure(name: str, examples: int) -> dict:
    began = time.time()
    try:
        report = families.export_family(name, examples=examples, formats=("int8", "float32"),
                                        latency_rounds=3, latency_runs=10)
    except Exception as error:  # a family that fails is a row of the table, not the end
        return {"family": name, "error": f"{type(error).__name__}: {str(error)[:300]}",
                "trace": traceback.format_exc(limit=-3), "seconds": time.time() - began}
    v = report["verification"]
    int8 = v["tflite"]["int8"]
    return {
        "family": name, "input_size": families.FAMILIES[name][1],
        "examples": v["examples"], "top1_agreement": int8["top1_agreement"],
        "disagreements": int8["disagreements"],
        "max_abs_logit_diff": int8["max_abs_logit_diff"],
        "max_abs_reference_logit": v["max_abs_reference_logit"],
        "all_on_grid": v["grid_check"]["all_on_grid"],
        "quantized_inputs": len(v["grid_check"]["layers"]),
        "median_input_match": v["grid_check"]["median_match_keras"],
        "float_graph_agreement": v["keras_graphs"]["float"]["top1_agreement"],
        "float64": v.get("float64_reference"),
        "float_layers": report["float_layers"], "float_prefix": report["float_prefix"],
        "float_islands": report["float_islands"],
        "int8_float_ops": report["graphs"]["int8"]["float_ops"],
        "int8_bytes": report["files"]["int8"]["bytes"],
        "float32_bytes": report["files"]["float32"]["bytes"],
        "float32_over_int8": v["latency"].get("float32_over_int8"),
        "tensors": report["tensors"], "seconds": time.time() - began,
    }


def _islands(row: dict) -> str:
    """Input preprocessing run in float, and the float islands (layers, TFLite float ops)."""
    parts = list(row["float_prefix"])
    if row.get("float_islands"):
        parts.append(f"{len(row['float_islands'])} layers ({len(row['int8_float_ops'])} "
                     "TFLite float ops)")
    return ", ".join(parts) or "-"


def _float64(row: dict) -> str:
    """int8 against the Keras model computed in float64: agreement and max |dlogit|."""
    f64 = row.get("float64")
    if not f64:
        return "-"
    if "error" in f64:
        return f"n/a ({f64['error'][:60]})"
    c = f64["int8_vs_float64"]
    return (f"{100 * c['top1_agreement']:.1f}% ({c['disagreements']}/{c['examples']}), "
            f"max {c['max_abs_logit_diff']:.1g}")


def markdown(rows: list) -> str:
    lines = ["| family | input | top-1 agreement (int8 vs Keras) | int8 vs Keras in float64 | "
             "BN-folded float graph | on b-bit grids | quantized inputs | int8 KiB | "
             "float32 KiB | float32/int8 latency | float islands |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | | failed: {r['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['family']} | {r['input_size']} | {100 * r['top1_agreement']:.1f}% "
            f"({r['disagreements']}/{r['examples']}) | {_float64(r)} "
            f"| {100 * r['float_graph_agreement']:.1f}% "
            f"| {r['all_on_grid']} | {r['quantized_inputs']} | {r['int8_bytes'] / 1024:.0f} | "
            f"{r['float32_bytes'] / 1024:.0f} | {r['float32_over_int8']:.2f}x | "
            f"{_islands(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(ORDER))
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    rows = []
    for name in [n.strip() for n in args.families.split(",") if n.strip()]:
        row = measure(name, args.examples)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": platform.processor() or platform.machine(),
                           "rows": rows}, f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
