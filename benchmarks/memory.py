"""Peak memory (resident set size) of the main command and of one 224x224 search step.

Each measurement runs in its own child process, and its peak RSS is read from
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it ends:

* ``main``: ``python train.py --model=mobilenet_v2 --phase=all`` (the README's demo run)
  into a temporary run directory;
* ``search_step_224``: MobileNetV2 at 224x224, batch 16, 3 candidates: calibration, then
  ``--iterations`` MetaMix iterations (``make_meta_step`` with full bit-meta, then
  ``make_search_step``) and as many joint steps, on random data (the library's own step
  functions, as ``benchmarks/step_overhead.py`` times them; only the float model and the
  two quantized models these steps train are built).

Usage: ``python benchmarks/memory.py [--skip-main] [--iterations 3]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_peak_mib(command: list[str]) -> float:
    """Runs ``command`` to the end and returns its peak RSS in MiB (Linux: ru_maxrss in KiB).

    ``RUSAGE_CHILDREN`` holds the largest peak of all waited-for children so far, so each
    measurement runs from a fresh helper process that starts only this one child.
    """
    probe = ("import resource, subprocess, sys; "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def _search_step(iterations: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from step_overhead import CANDIDATES, calibrated, joint_step, metamix_steps, mobilenet_v2

    import metamix_tf

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (16, 224, 224, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, 16), tf.int32)
    strategy = tf.distribute.get_strategy()
    float_model = mobilenet_v2(224)
    config = metamix_tf.QuantConfig(candidate_bits=CANDIDATES, weight_bits=4)
    fns = {"metamix": metamix_steps(strategy, calibrated(strategy, float_model, config,
                                                         images, labels), "full")[1],
           "joint": joint_step(strategy, calibrated(strategy, float_model, config, images,
                                                    labels))}
    for name in ("metamix", "joint"):
        for _ in range(iterations):
            for value in fns[name](images, labels).values():
                value.numpy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-main", action="store_true", help="only the search step")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "search_step_224":
        _search_step(args.iterations)
        return
    rows = []
    if not args.skip_main:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "train.py", "--model=mobilenet_v2", "--phase=all",
                       f"--model_dir={tmp}/run"]
            rows.append(("python train.py --model=mobilenet_v2 --phase=all",
                         _child_peak_mib(command)))
    command = [sys.executable, os.path.abspath(__file__), "--child=search_step_224",
               f"--iterations={args.iterations}"]
    rows.append(("MobileNetV2 224x224, batch 16: MetaMix iteration + joint step",
                 _child_peak_mib(command)))
    print(f"peak resident memory, {os.cpu_count()} CPU cores")
    print("| what | peak RSS |")
    print("|---|---:|")
    for what, mib in rows:
        print(f"| {what} | {mib:,.0f} MiB |")


if __name__ == "__main__":
    main()
