"""Int32 bias grid in weight training vs the post-hoc snap: a side-by-side table of runs.

Reads finished run directories (``train.py --phase=all`` then ``export_tflite.py``) and
prints, per run: float accuracy, weight-training accuracy before the bias snap (the last
epoch's evaluation: with the grid in training, on the grid already), after the snap (what
``final.keras`` scores), how far the snap moved the biases, and the int8 TFLite model's
accuracy and top-1 agreement with ``final.keras``.

Usage (the README's table; 2 CPU cores, measured under load)::

    python train.py --model=mobilenet_v2 --phase=all --model_dir=/tmp/bg_off \\
        --set finetune.bias_grid_epochs=0
    python train.py --model=mobilenet_v2 --phase=all --model_dir=/tmp/bg_on
    python export_tflite.py --model_dir=/tmp/bg_off --format=int8
    python export_tflite.py --model_dir=/tmp/bg_on --format=int8
    python benchmarks/bias_grid.py /tmp/bg_off /tmp/bg_on
"""

from __future__ import annotations

import json
import os
import sys


def _json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def row(model_dir: str) -> dict:
    """The table row of one finished run directory."""
    summary = _json(os.path.join(model_dir, "summary.json"))
    if summary is None or "finetune" not in summary.get("phases", {}):
        raise SystemExit(f"{model_dir}: no finished weight training (summary.json); run "
                         "train.py --phase=all first.")
    phases = summary["phases"]
    snap = phases["finetune"].get("bias_snap") or {}
    report = _json(os.path.join(model_dir, "export", "export_report.json")) or {}
    int8 = report.get("verification", {}).get("tflite", {}).get("int8", {})
    return {
        "run": model_dir,
        "grid_in_training": bool(snap.get("trained_on_grid")),
        "float": phases["pretrain"].get("val_acc"),
        "before_snap": snap.get("val_acc_before"),
        "after_snap": phases["finetune"].get("val_acc"),
        "snap_max_units": snap.get("max_shift_units"),
        "snap_layers_moved": snap.get("moved"),
        "int8_accuracy": int8.get("accuracy"),
        "int8_agreement": int8.get("top1_agreement"),
    }


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(rows: list) -> str:
    lines = ["| run | bias grid in training | float | before snap | after snap (final.keras) "
             "| snap: largest bias move (units) | int8 accuracy | int8 top-1 agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        moved = "-" if r["snap_max_units"] is None else f"{r['snap_max_units']:.2f}"
        lines.append(f"| {r['run']} | {'on' if r['grid_in_training'] else 'off'} "
                     f"| {_pct(r['float'])} | {_pct(r['before_snap'])} "
                     f"| {_pct(r['after_snap'])} | {moved} | {_pct(r['int8_accuracy'])} "
                     f"| {_pct(r['int8_agreement'])} |")
    return "\n".join(lines)


def main(argv: list) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    rows = [row(d) for d in argv[1:]]
    print(markdown(rows))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
