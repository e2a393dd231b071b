"""Bad input to ``train.py``, ``export_tflite.py`` and the Python API: one line naming what
is wrong, exit code 2 from the scripts, no traceback, and no change to existing runs.

The scripts run in this process through their ``main`` (as ``absl.app.run`` calls it), a few
of them also as subprocesses, the way a user starts them.
"""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import traceback

import pytest
from absl import flags
from helpers import ROOT, snapshot
from test_pipeline import tiny_config, tiny_net

from metamix_tf import cli, models, pipeline, run_state
from metamix_tf import config as config_lib
from metamix_tf.export import run as export_run
from metamix_tf.quant import wrap

FLAGS = flags.FLAGS


def small_config(model_dir, **overrides):
    values = {"data": {"max_train_examples": 128, "max_eval_examples": 64},
              "pretrain": {"epochs": 1}, "search": {"epochs": 1, "warmup_epochs": 0},
              "finetune": {"epochs": 1}}
    return tiny_config(model_dir, **config_lib.merge(values, overrides))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Existing run directories (finished, unfinished, with a garbled model or config) built
    without training, and bad files."""
    root = tmp_path_factory.mktemp("bad_input")
    runs = root / "runs"
    done = runs / "finished"
    done.mkdir(parents=True)
    config = small_config(done)
    config_lib.save(config, str(done / "config.yaml"))
    float_model = tiny_net((32, 32, 3), 10)
    float_model.save(done / "float.keras")
    qmodel = wrap.apply(float_model, config.quant)
    bits = wrap.select_bits(qmodel)
    qmodel.save(done / "search.keras")
    wrap.enable_weight_quantization(qmodel, True)
    qmodel.save(done / "final.keras")
    (done / "bits.json").write_text(json.dumps({"searcher": "metamix", "bits": bits}))
    for phase in pipeline.PHASES:
        (done / f"{phase}.done").write_text(json.dumps({"val_acc": 0.5, "wall_time_s": 0.0}))
        run_state.record(config, phase, str(done))
    unfinished = runs / "unfinished"
    shutil.copytree(done, unfinished)
    run_state.clear(str(unfinished), ("search", "finetune"))
    garbled = runs / "garbled"
    shutil.copytree(done, garbled)
    (garbled / "final.keras").write_bytes(b"PK\x03\x04 truncated")
    bad_config = runs / "bad_config"
    shutil.copytree(done, bad_config)
    (bad_config / "config.yaml").write_text("model: [name: tiny\n")
    (root / "bad.yaml").write_text("search:\n  target_avg_bits: [3.5\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "garbled.keras").write_bytes(os.urandom(256))
    (root / "empty" / "train").mkdir(parents=True)
    (root / "corrupt" / "train" / "cat").mkdir(parents=True)
    (root / "corrupt" / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    (root / "no_runs").mkdir()
    return {"root": root, "runs": runs, "done": done, "unfinished": unfinished,
            "garbled": garbled, "bad_config": bad_config, "fresh": root / "fresh",
            "bad": root / "bad.yaml", "list": root / "list.yaml",
            "garbled_keras": root / "garbled.keras", "empty": root / "empty",
            "corrupt": root / "corrupt", "no_runs": root / "no_runs"}


def results_in(directory) -> list:
    """What a run left that would count as results (settings files and config.yaml aside)."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory)
                  if n.endswith((".done", ".keras", ".json")) and not n.endswith(".settings.json")
                  or n == "ckpt")


# -- the scripts, in this process ------------------------------------------------------------

_scripts: dict = {}


def _script(name: str):
    """``train.py`` or ``export_tflite.py`` as a module; the two define some flags alike,
    so the other one's flags are removed first."""
    if name not in _scripts:
        for other in list(_scripts):
            _, defined = _scripts.pop(other)
            for flag in defined:
                delattr(FLAGS, flag)
        known = set(FLAGS)
        spec = importlib.util.spec_from_file_location(
            f"{name}_script", os.path.join(ROOT, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _scripts[name] = (module, set(FLAGS) - known)
    return _scripts[name][0]


def call_script(name: str, args) -> tuple:
    """(exit code, stderr) of ``python <name>.py <args>``, run as ``absl.app.run`` would."""
    module = _script(name)
    FLAGS.unparse_flags()
    argv = [f"{name}.py", *map(str, args)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = module.main(cli.flags_parser(argv)) or 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # what Python would print
            traceback.print_exc()
            code = 1
    return code, err.getvalue()


def assert_one_line(stderr: str, prefix: str, match: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    assert match.lower() in errors[0].lower(), errors[0]


# (script, args, match); {name} is replaced by paths[name]
SCRIPT_CASES = [
    ("train", ["--set", "quant.candidate_bits=4"], "'quant.candidate_bits' must be a list"),
    ("train", ["--config={bad}"], "is not valid YAML"),
    ("train", ["--config={root}/missing.yaml"], "Config file not found"),
    ("train", ["--config={list}"], "mapping at the top level"),
    ("train", ["--set", "quant.nope=1"], "Unknown config key(s) ['quant.nope']"),
    ("train", ["--set", "nosuch.key=1"], "Unknown config key(s) ['nosuch']"),
    ("train", ["--set", "search.cost_weight=abc"], "'search.cost_weight' must be a number"),
    ("train", ["--set", "data.augment=3"], "'data.augment' must be true or false"),
    ("train", ["--set", "quant.weight_bits=1"], "Received: weight_bits=1"),
    ("train", ["--set", "quant.candidate_bits=[2, 2]"], "duplicates"),
    ("train", ["--set", "search.searcher=foo"], "Received: searcher='foo'"),
    ("train", ["--set", "noequals"], "--set takes key.sub=value"),
    ("train", ["--set", "quant.candidate_bits=[2, 4"], "takes a YAML value"),
    ("train", ["--set", "pretrain.epochs=-1"], "pretrain.epochs` must be an integer >= 0"),
    ("train", ["--set", "search.epochs=0"], "search.epochs` >= 1"),
    ("train", ["--set", "search.meta_candidates=5"], "at most the number of candidate"),
    ("train", ["--set", "data.batch_size=0", "--model_dir={fresh}"], "batch_size=0"),
    ("train", ["--searcher=foo"], "value should be one of"),
    ("train", ["--epochs=abc"], "--epochs"),
    ("train", ["--no_such_flag=1"], "no_such_flag"),
    ("train", ["stray"], "Unexpected arguments"),
    ("train", ["--model=nope", "--model_dir={fresh}"], "Unknown model name"),
    ("train", ["--target_gbops=-1"], "target_gbops` must be > 0"),
    ("train", ["--target_avg_bits=1", "--model_dir={fresh}"], "outside the candidate bits"),
    ("train", ["--target_gbops=1000", "--model_dir={fresh}"],
     "outside what the candidate bits allow"),
    ("train", ["--set", "model.input_size=16", "--model_dir={fresh}"],
     "needs input height and width >= 32"),
    ("train", ["--weights={root}/missing.keras", "--model_dir={fresh}"],
     "Weights file not found"),
    ("train", ["--weights={garbled_keras}", "--model_dir={fresh}"], "Could not read weights"),
    ("train", ["--teacher={root}/missing.keras", "--model_dir={fresh}"],
     "Teacher model file not found"),
    ("train", ["--dataset=folder:{root}/no_such_folder", "--model_dir={fresh}"],
     "does not exist"),
    ("train", ["--dataset=folder:{empty}", "--model_dir={fresh}"], "no class folders"),
    ("train", ["--dataset=folder:{corrupt}", "--model_dir={fresh}"], "images"),
    ("train", ["--dataset=no_such_dataset_xyz", "--model_dir={fresh}"], "Unknown dataset"),
    ("train", ["--model=resnet18", "--model_dir={done}"], "model.name: 'tiny' -> 'resnet18'"),
    ("export_tflite", ["--model_dir={unfinished}"], "has no bits.json"),
    ("export_tflite", ["--model_dir={root}/no_such_run"], "Run directory not found"),
    ("export_tflite", ["--model_dir={garbled}"], "is not a readable Keras model"),
    ("export_tflite", ["--model_dir={bad_config}"], "is not valid YAML"),
    ("export_tflite", ["--model_dir={done}", "--format=int4"], "formats"),
    ("export_tflite", ["--run_root={no_runs}"], "No training runs"),
    ("export_tflite", ["--weight_storage=nibbles"], "value should be one of"),
    ("export_tflite", ["--max_eval_examples=many"], "--max_eval_examples"),
]


def _fill(args, paths):
    return [a.format(**paths) for a in args]


@pytest.mark.parametrize("script,args,match", SCRIPT_CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in SCRIPT_CASES])
def test_scripts_answer_bad_input_in_one_line(paths, tmp_path, monkeypatch, script, args,
                                              match):
    monkeypatch.chdir(tmp_path)  # a default run directory lands here, not in the repository
    before = snapshot(paths["runs"])
    code, stderr = call_script(script, _fill(args, paths))
    assert code == 2, stderr
    assert_one_line(stderr, f"{script}.py: error: ", match)
    assert snapshot(paths["runs"]) == before
    assert results_in(paths["fresh"]) == []
    assert results_in(tmp_path / "runs" / "mobilenet_v2-mnist_embedded") == []


# -- the Python API --------------------------------------------------------------------------


def _run(config, **kwargs):
    return pipeline.run(config, model_fn=tiny_net, verbose=False, **kwargs)


API_CASES = [
    ("candidate_bits an int", lambda p: config_lib.QuantConfig(candidate_bits=4),
     ValueError, "must be a list of bit-widths"),
    ("malformed YAML", lambda p: config_lib.load([str(p["bad"])]), ValueError,
     "is not valid YAML"),
    ("section not a mapping",
     lambda p: config_lib.from_dict(config_lib.ExperimentConfig, {"data": 3}), ValueError,
     "must be a mapping"),
    ("wrong type", lambda p: config_lib.load([], {"seed": "x"}), ValueError,
     "'seed' must be an integer"),
    ("unknown phase", lambda p: _run(small_config(p["fresh"]), phase="nope"), ValueError,
     "`phase` must be one of"),
    ("changed settings", lambda p: _run(small_config(p["done"], search={"cost_weight": 1.0})),
     run_state.SettingsChangedError, "search.cost_weight: 4.0 -> 1.0"),
    ("unreachable GBOPs target",
     lambda p: _run(small_config(p["fresh"], search={"target_gbops": 1e6})), ValueError,
     "outside what the candidate bits allow"),
    ("corrupt images",
     lambda p: _run(small_config(p["fresh"], data={"dataset": f"folder:{p['corrupt']}"})),
     ValueError, "images"),
    ("image size", lambda p: models.build("mobilenet_v2", (16, 16, 3), 10), ValueError,
     "needs input height and width >= 32"),
    ("export of an unfinished run",
     lambda p: export_run.export_run(model_dir=str(p["unfinished"]), log=lambda *a: None),
     export_run.RunError, "has no bits.json"),
    ("export of a garbled model",
     lambda p: export_run.export_run(model_dir=str(p["garbled"]), log=lambda *a: None),
     export_run.RunError, "is not a readable Keras model"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_api_raises_one_line_errors(paths, call, error, match):
    before = snapshot(paths["runs"])
    with pytest.raises(error) as info:
        call(paths)
    assert "\n" not in str(info.value)
    assert match in str(info.value)
    assert snapshot(paths["runs"]) == before
    assert results_in(paths["fresh"]) == []


# -- as a user starts them -------------------------------------------------------------------

SUBPROCESS_CASES = [
    ("train", ["--set", "quant.candidate_bits=4", "--model_dir={done}"],
     "'quant.candidate_bits' must be a list"),
    ("train", ["--config={bad}", "--model_dir={done}"], "is not valid YAML"),
    ("export_tflite", ["--model_dir={unfinished}"], "has no bits.json"),
]


def test_scripts_as_subprocesses(paths, tmp_path):
    """Started together (each imports TensorFlow)."""
    before = snapshot(paths["runs"])
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}.py"),
                               *_fill(args, paths)], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for script, args, _ in SUBPROCESS_CASES]
    for proc, (script, _, match) in zip(procs, SUBPROCESS_CASES, strict=True):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        assert_one_line(stderr, f"{script}.py: error: ", match)
    assert snapshot(paths["runs"]) == before
    assert not os.path.exists(tmp_path / "runs")
