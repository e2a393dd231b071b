"""The package's import graph has no upward edges: each top-level module or subpackage imports
only the ones listed below it in LAYERS (read from the source with ``ast``)."""

import glob
import os

from helpers import ROOT, package_imports

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
    """The top-level modules / subpackages of ``metamix_tf`` that ``path`` imports."""
    out = set()
    for module, name in package_imports(path):
        parts = module.split(".")
        if len(parts) > 1 or name:  # `import metamix_tf` alone names no unit
            out.add(parts[1] if len(parts) > 1 else name)
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
