"""examples/own_model.py runs end to end on tiny settings (most of its time is tracing)."""

import importlib.util
import os

import pytest
from helpers import ROOT


def _example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # minutes of tracing on 2 cores; .ci/run runs it after the default suite
def test_own_model_example_runs_end_to_end(tmp_path, capsys):
    example = _example("own_model")
    out = example.run(str(tmp_path), **example.TINY)
    assert out["quant_layers"] == 53  # 52 backbone convolutions + the head: all quantized
    assert (tmp_path / "model_int8.tflite").exists()
    assert set(out["search"].bits.values()) <= {4, 8}
    assert out["export"]["verification"]["tflite"]["int8"]["top1_agreement"] > 0.5
    printed = capsys.readouterr().out
    for line in ("float model:", "quantized layers: 53", "search:", "finetune:", "int8:"):
        assert line in printed, line
