"""Every ``metamix_tf`` name the benchmark and example scripts import exists.

The scripts are not imported here (their absl flags would collide in one process, and most
of them only run for minutes); their ``from metamix_tf... import ...`` statements are read
with ``ast`` and resolved, so a module moved inside the package breaks this test, not the
next multi-hour study.
"""

import glob
import importlib
import os

import pytest
from helpers import ROOT, package_imports

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                 + glob.glob(os.path.join(ROOT, "examples", "*.py"))
                 + glob.glob(os.path.join(ROOT, "*.py")))


def test_the_scripts_are_found():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"cifar10_curves.py", "train_float.py", "train.py", "own_model.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_package_import_resolves(path):
    missing = []
    for module_name, name in package_imports(path):
        module = importlib.import_module(module_name)
        if name is None or hasattr(module, name):
            continue
        try:  # a submodule not imported by its package's __init__
            importlib.import_module(f"{module_name}.{name}")
        except ModuleNotFoundError:
            missing.append(f"from {module_name} import {name}")
    assert not missing, f"{os.path.relpath(path, ROOT)}: {missing}"
