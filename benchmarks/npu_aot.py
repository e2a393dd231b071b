"""Ahead-of-time NPU compilation of exported models with LiteRT's AOT path: what compiles here.

    python benchmarks/npu_aot.py --models=<run>/export/mobilenet_v2_int8.tflite,<...>_int4.tflite

Calls ``ai_edge_litert.aot.aot_compile.aot_compile`` for every registered target (Qualcomm,
MediaTek, Google Tensor, Intel OpenVINO, Samsung SoCs) with ``keep_going=True`` and records per
model and vendor: the targets that compiled (with the compiled file size and the ops left to
the CPU), and for the others the first error line of the compiler plugin. The vendor SDKs come
from the ``ai-edge-litert-sdk-<vendor>`` packages (their build downloads the vendor's
toolchain; put them on PYTHONPATH). Writes ``--output`` (JSON) and prints a table.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "TFLite files to compile.")
flags.DEFINE_string("output", "/tmp/metamix_npu_aot.json", "JSON result.")


def _first_error(message: str) -> str:
    """The plugin's own reason: the error file it points to, else the message."""
    path = message.split("See ")[-1].split(" for details")[0] if "See " in message else None
    lines = []
    if path and os.path.exists(path):
        with open(path, errors="replace") as f:
            text = [x.strip() for x in f if x.strip() and not x.startswith("INFO")]
        os.remove(path)
        first = next((i for i, x in enumerate(text) if "ERROR" in x or "Failed" in x), None)
        lines = [" ".join(text[first:first + 3])] if first is not None else []
    return (lines[0] if lines else message)[:500]


def compile_model(path: str) -> dict:
    from ai_edge_litert.aot import aot_compile

    with tempfile.TemporaryDirectory() as out:
        result = aot_compile.aot_compile(path, output_dir=out, keep_going=True)
        by_vendor = collections.defaultdict(lambda: {"compiled": [], "failed": {}})
        for backend, model in result.models_with_backend:
            name = type(backend).__name__.replace("Backend", "")
            if name == "Fallback":
                continue
            target = str(getattr(backend, "target", name))
            size = None
            for f in glob.glob(os.path.join(out, "*.tflite")):
                if target.split("_")[-1] in f:
                    size = os.path.getsize(f)
            by_vendor[name]["compiled"].append({"target": target, "bytes": size,
                                                "model": repr(model)})
        for backend, message in result.failed_backends:
            name = type(backend).__name__.replace("Backend", "")
            target = str(getattr(backend, "target", name))
            by_vendor[name]["failed"][target] = _first_error(message)
    return dict(by_vendor)


def main(argv):
    del argv
    results = {path: compile_model(path) for path in FLAGS.models}
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
