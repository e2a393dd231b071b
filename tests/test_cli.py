"""The command line (metamix_tf.cli): order of precedence, YAML numbers, the default run
directory, console entry points and shipped configs."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT

from metamix_tf import cli, config


def test_set_values_are_yaml_with_exponent_numbers_as_floats():
    assert cli.parse_value("6e-3") == pytest.approx(0.006)
    assert cli.parse_value("[2, 4, 8]") == [2, 4, 8]
    assert cli.parse_value("null") is None
    assert cli.parse_value("self") == "self"
    assert cli.set_overrides(["search.cost_weight=8", "search.cost_weight=2"]) == {
        "search": {"cost_weight": 2}}


def test_files_then_sets_then_flags(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("search:\n  cost_weight: 1.0\n  target_gbops: 0.1\npretrain:\n  epochs: 7\n")
    config = cli.resolve_config([str(path)], ["search.cost_weight=2", "pretrain.epochs=8"],
                                {"pretrain_epochs": 9, "epochs": 3})
    assert config.search.cost_weight == 2 and config.pretrain.epochs == 9
    assert config.search.epochs == 3 and config.finetune.epochs == 3
    assert config.search.target_gbops == 0.1  # no bit target given: the file's GBOPs stay


def test_an_average_bit_target_flag_wins_over_a_files_gbops_target(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("search:\n  target_gbops: 0.1\n")
    config = cli.resolve_config([str(path)], flags={"target_avg_bits": 3.0})
    assert config.search.target_gbops is None and config.search.target_avg_bits == 3.0
    both = cli.resolve_config([str(path)], flags={"target_avg_bits": 3.0, "target_gbops": 0.2})
    assert both.search.target_gbops == 0.2


def test_teacher_and_seed_flags_set_both_places():
    config = cli.resolve_config(flags={"teacher": "self", "seed": 5})
    assert config.search.teacher == config.finetune.teacher == "self"
    assert config.seed == config.data.seed == 5


@pytest.mark.parametrize("model_dir,dataset,expected", [
    (None, "mnist_embedded", "runs/mobilenet_v2-mnist_embedded"),
    (None, "folder:/data/my cifar10/", "runs/mobilenet_v2-my_cifar10"),
    ("elsewhere", "mnist_embedded", "elsewhere"),
])
def test_default_run_directory(model_dir, dataset, expected):
    config = cli.resolve_config(flags={"dataset": dataset}, model_dir=model_dir)
    assert config.model_dir == expected


def test_shipped_configs_are_found_and_load():
    names = cli.shipped_configs()
    assert names == sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                           if f.endswith(".yaml"))
    path = cli.config_file("demo_mnist")
    assert os.path.isfile(path)
    assert config.load([path]).model.name == "mobilenet_v2"


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="Received: name='nope'"):
        cli.config_file("nope")


@pytest.mark.parametrize("entry,flag", [("train", "--phase"), ("export", "--format")])
def test_entry_points_run_the_scripts(entry, flag):
    out = subprocess.run([sys.executable, "-c", f"from metamix_tf import cli; cli.{entry}()",
                          "--helpshort"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert flag in out.stdout, out.stderr[-2000:]  # absl's --helpshort exits with 1
