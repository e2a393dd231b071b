"""Console entry points and shipped configs (metamix_tf.cli)."""

import os
import subprocess
import sys

import pytest

from metamix_tf import cli, config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
