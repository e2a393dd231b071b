"""Ahead-of-time NPU compilation of exported models with LiteRT's AOT path: what compiles here.

    python benchmarks/npu_aot.py --models=<run>/export/mobilenet_v2_int8.tflite,<...>_int4.tflite

Runs :func:`metamix_tf.export.npu.compile_model` (every target LiteRT's AOT path registers)
on each file; the vendor SDKs come from the ``ai-edge-litert-sdk-<vendor>`` packages (their
build downloads the vendor's toolchain; put them on PYTHONPATH). Writes ``--output`` (JSON)
and prints a table.
"""

from __future__ import annotations

import collections
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "TFLite files to compile.")
flags.DEFINE_string("output", "/tmp/metamix_npu_aot.json", "JSON result.")


def main(argv):
    del argv
    from metamix_tf.export import npu

    results = {path: npu.compile_model(path) for path in FLAGS.models}
    with open(FLAGS.output, "w") as f:
        json.dump(results, f, indent=1)
    for path, vendors in results.items():
        print(path)
        for vendor, r in sorted(vendors.items()):
            errors = collections.Counter(r["failed"].values())
            reason = "; ".join(f"{n}x {e}" for e, n in errors.most_common(2))
            print(f"  {vendor:<14} compiled {len(r['compiled'])}, failed {len(r['failed'])}"
                  + (f": {reason}" if reason else ""))


if __name__ == "__main__":
    app.run(main)
