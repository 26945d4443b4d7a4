"""The import direction of DESIGN.md: imports only point down the layers."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "src" / "metafit"

# layer -> the metafit sub-packages/modules it may import from
BASE = {"types", "errors", "validation", "functional", "stats"}
ALLOWED = {
    "stats": set(),
    "types": {"errors"},
    "errors": set(),
    "validation": {"errors"},
    "functional": {"errors", "types"},
    "nn": BASE | {"nn"},
    "data": BASE | {"data"},
    "rl": BASE | {"rl", "nn"},
    "algorithms": BASE | {"algorithms", "nn", "data"},  # data sits below (DESIGN.md); e.g. fine-tuning augments
    "training": BASE | {"training", "algorithms", "nn", "data", "rl"},
    "inference": BASE | {"inference", "training", "algorithms", "nn", "data"},  # the user API: load, adapt, predict
    "tools": BASE | {"tools", "training", "algorithms", "nn", "data", "rl"},  # tune, report
    "cli": BASE | {"cli", "inference", "tools", "training", "algorithms", "nn", "data", "rl", "serve"},
    "serve": BASE | {"serve", "inference", "training", "algorithms", "nn", "data", "rl"},
}


def _imports(path: Path, layer_parts: tuple[str, ...]) -> set[str]:
    """Top-level metafit sub-packages imported by a module."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(layer_parts[: len(layer_parts) - (node.level - 1)])
                mod = base + (node.module.split(".") if node.module else [])
                if mod:
                    found.add(mod[0])
                else:  # "from .. import x" at the top: x is the sub-package
                    found.update(a.name.split(".")[0] for a in node.names)
            elif node.module and node.module.startswith("metafit."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("metafit."):
                    found.add(a.name.split(".")[1])
    return found


MODULES = sorted(p for p in PKG.rglob("*.py") if p.parent != PKG)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    rel = path.relative_to(PKG)
    layer = rel.parts[0]
    package_parts = rel.parts[:-1]  # the package the module lives in, relative to metafit
    imported = _imports(path, package_parts) - {"__version__"}
    bad = imported - ALLOWED[layer] - {layer}
    assert not bad, f"{rel} (layer {layer}) imports {sorted(bad)}"


def test_bottom_modules_import_nothing_above():
    for name in ("types", "errors", "validation", "stats"):
        imported = _imports(PKG / f"{name}.py", ())
        assert imported <= ALLOWED[name], (name, imported)
