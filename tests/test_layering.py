"""The package's import graph has no upward edges: each top-level module or subpackage imports
only the ones listed below it in LAYERS (read from the source with ``ast``)."""

import ast
import glob
import os

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "metamix_tf")

# Lowest first. A module may import any module of a lower layer, never one of a higher layer.
LAYERS = (
    ("config", "models"),
    ("quant", "data"),
    ("training",),
    ("analysis", "export"),
    ("run_state", "run_files", "run_checks", "cli"),
    ("api",),
    ("pipeline",),
    ("__init__",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(path: str) -> str:
    """The top-level module or subpackage a file belongs to."""
    return os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py")


def _imported_units(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("metamix_tf"):
            parts = node.module.split(".")
            out |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names
                    if a.name.startswith("metamix_tf.")}
    return out


def test_every_unit_of_the_package_has_a_layer():
    units = {_unit(p) for p in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)}
    assert units == set(RANK), (f"add to LAYERS: {sorted(units - set(RANK))}; "
                                f"gone: {sorted(set(RANK) - units)}")


def test_no_module_imports_a_higher_or_equal_layer():
    upward = []
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        unit = _unit(path)
        for other in _imported_units(path) - {unit}:
            if RANK[other] >= RANK[unit]:
                upward.append(f"{os.path.relpath(path, ROOT)} imports {other}")
    assert not upward, upward
