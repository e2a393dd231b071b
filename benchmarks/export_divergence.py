"""Where the int8 export of a keras.applications family, or of a training run, first departs
from the Keras model.

With ``--family``, runs the family recipe of ``metamix_tf.export.families`` (random weights,
random bits from {2, 3, 4, 8}, 4-bit weights, biases snapped), then compares every tensor
that both models round on the same grid, integer by integer, in graph order
(``metamix_tf.export.divergence``), and prints the first ``--show`` tensors that differ with
how far the Keras model's value was from a rounding boundary.

With ``--model_dir``, takes a ``train.py`` run's ``final.keras`` with its training images for
calibration and its eval images, as ``export_tflite.py`` does.

Usage: ``python benchmarks/export_divergence.py --family DenseNet121 [--examples 64]
[--show 4] [--json out.json]`` or ``... --model_dir runs/<run>``
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from metamix_tf.export import divergence, families  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--family", choices=sorted(families.FAMILIES))
    source.add_argument("--model_dir", help="A train.py run directory (its final.keras).")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--show", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.family:
        calibration = families.images_for(args.family, 32, 0)
        model, _ = families.prepare(args.family, calibration, 0)
        images = families.images_for(args.family, args.examples, 1)
        rows = divergence.model_divergence(model, calibration, images)
    else:
        rows = divergence.run_divergence(args.model_dir, args.examples)
    name = args.family or args.model_dir
    differing = [r for r in rows if r["mismatches"]]
    print(f"{name}: {len(rows)} tensors compared, {len(differing)} differ")
    for r in differing[:args.show]:
        print(f"  {r['tensor']} ({r['kind']}, {r['bits']}-bit): {r['mismatches']} of "
              f"{r['elements']} integers differ; max |frac(x/step) - 1/2| = "
              f"{r['max_tie_distance']:.3g}; first: {r['first'][:2]}")
    starts = divergence.first_divergence_per_input(rows)
    print(f"inputs whose integers differ: {len(starts)} of {args.examples}; where each starts "
          "(tensor, integers, max |frac - 1/2|):")
    for image, (tensor, count, tie) in starts.items():
        print(f"  input {image}: {tensor}, {count}, {tie:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"family": args.family, "model_dir": args.model_dir,
                       "examples": args.examples, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
