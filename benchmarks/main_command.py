"""The main command, ``python train.py --model=mobilenet_v2 --phase=all``, over several seeds
and variants: final accuracy, bits and where the seconds went, with each variant's mean and
standard deviation.

A variant is a name and overrides, ``NAME[:KEY=VALUE,...]`` (``base`` with none: the
defaults): an environment variable, or a config key when KEY has a dot (passed as ``--set
KEY=VALUE``, e.g. ``split:search.meta_batch=split``); optionally run from another checkout
of the repository,
``NAME@PATH[:VAR=VALUE,...]`` (e.g. a ``git worktree`` of an older commit: code against
code in the same sitting). Runs are interleaved (seed 0 of every variant, then seed 1,
...), each in its own child process and temporary run directory, with ``--set seed=S``
(the data order, the initialization and the augmentation). One run is one draw: on the
demo's 500 validation images one run's accuracy moves by a point or two from seed to seed,
so compare means.

Usage::

    python benchmarks/main_command.py --seeds 0 1 2 3 \\
        --variant base --variant keras_bn:METAMIX_TF_FUSED_BATCH_NORM=0 --save FILE.json
    git worktree add /tmp/before 2ae19df
    python benchmarks/main_command.py --seeds 0 1 --variant after --variant before@/tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from metamix_tf.run_files import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("pretrain", "search", "finetune")


def parse_variant(text: str) -> tuple[str, dict, str, list[str]]:
    """``"name@path:A=1,b.c=2"`` -> ``("name", {"A": "1"}, path, ["--set=b.c=2"])`` (the
    path of this repository without ``@path``)."""
    name, _, overrides = text.partition(":")
    name, _, root = name.partition("@")
    root = os.path.abspath(root) if root else ROOT
    if not os.path.isfile(os.path.join(root, "train.py")):
        raise ValueError(f"--variant {text!r}: no train.py in {root}")
    env, settings = {}, []
    for item in filter(None, overrides.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--variant {text!r}: overrides are KEY=VALUE, comma-separated")
        if "." in key:
            settings.append(f"--set={key}={value}")
        else:
            env[key] = value
    return name, env, root, settings


def run_once(seed: int, env: dict, extra: list[str], root: str = ROOT) -> dict:
    """One main command in a fresh run directory: its summary's numbers and the wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "train.py", "--model=mobilenet_v2", "--phase=all",
                   f"--model_dir={tmp}/run", f"--set=seed={seed}", *extra]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=root, env={**os.environ, **env},
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        with open(os.path.join(tmp, "run", "summary.json")) as f:
            summary = json.load(f)
    phases = {name: summary["phases"][name]["phase_seconds_this_process"] for name in PHASES}
    return {"seed": seed, "final_val_acc": summary["final_val_acc"],
            "float_val_acc": summary["float_val_acc"],
            "avg_activation_bits": summary["avg_activation_bits"], "gbops": summary["gbops"],
            "phase_seconds": phases, "phases_total_s": sum(phases.values()),
            "process_wall_s": wall}


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4g} +- {sd:.2g}"


def report(results: dict) -> str:
    """A table per run and the mean +- standard deviation of each variant."""
    lines = ["variant        seed  final_acc  float_acc  bits   phases_s  "
             "(pretrain/search/finetune)"]
    for name, runs in results.items():
        for r in runs:
            p = r["phase_seconds"]
            lines.append(f"{name:<14} {r['seed']:>4}  {r['final_val_acc']:.4f}     "
                         f"{r['float_val_acc']:.4f}     {r['avg_activation_bits']:.2f}   "
                         f"{r['phases_total_s']:>7.0f}  ({p['pretrain']:.0f}/{p['search']:.0f}"
                         f"/{p['finetune']:.0f})")
    lines.append("")
    for name, runs in ((n, r) for n, r in results.items() if r):  # the variants run so far
        lines.append(f"{name}: final_val_acc {_mean_sd([r['final_val_acc'] for r in runs])}, "
                     f"avg bits {_mean_sd([r['avg_activation_bits'] for r in runs])}, "
                     f"phases {_mean_sd([r['phases_total_s'] for r in runs])} s "
                     f"over {len(runs)} seed(s)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME[@CHECKOUT][:KEY=VALUE,...]; repeatable (default: base)")
    parser.add_argument("--extra", action="append", default=[],
                        help="a further train.py flag for every run, e.g. --extra=--epochs=1")
    parser.add_argument("--save", help="write the runs and the machine to this JSON file")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["base"])]
    results = {name: [] for name, *_ in variants}
    for seed in args.seeds:
        for name, env, root, settings in variants:
            results[name].append(run_once(seed, env, [*settings, *args.extra], root))
            print(f"{name} seed {seed}: {results[name][-1]}", flush=True)
            if args.save:  # after every run: a run stopped early keeps what it measured
                save(args.save, variants, results)
    print(report(results))


def save(path: str, variants: list, results: dict) -> None:
    """The runs so far, the variants and the machine, as JSON."""
    with open(path, "w") as f:
        json.dump({"command": " ".join(sys.argv), "cpu": cpu_model(),
                   "cpu_count": os.cpu_count(),
                   "variants": {name: {"env": env, "checkout": root, "settings": settings}
                                for name, env, root, settings in variants},
                   "runs": results, "report": report(results)}, f, indent=1)


if __name__ == "__main__":
    main()
