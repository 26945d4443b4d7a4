"""The import direction of DESIGN.md: imports only point down the layers."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "src" / "metafit"

# layer -> the metafit sub-packages/modules it may import from
BASE = {"types", "errors", "validation", "functional", "stats"}
# metafit.rl is three layers of its own (its rooms) under a facade that re-exports them; a layer
# allowed "rl" may import every room
RL_ROOMS = {"rl.envs", "rl.learners", "rl.baselines"}
ALLOWED = {
    "stats": set(),
    "types": {"errors"},
    "errors": set(),
    "validation": {"errors"},
    "functional": {"errors", "types"},
    "nn": BASE | {"nn"},
    "data": BASE | {"data"},
    "rl": BASE | RL_ROOMS,  # metafit/rl/__init__.py: the facade
    "rl.envs": BASE,  # environment families
    "rl.baselines": BASE | {"rl.envs"},  # classical agents
    "rl.learners": BASE | {"nn", "rl.envs"},  # meta-RL learners
    "algorithms": BASE | {"algorithms", "nn", "data"},  # data sits below (DESIGN.md); e.g. fine-tuning augments
    "training": BASE | {"training", "algorithms", "nn", "data", "rl"},
    "inference": BASE | {"inference", "training", "algorithms", "nn", "data"},  # the user API: load, adapt, predict
    "tools": BASE | {"tools", "training", "algorithms", "nn", "data", "rl"},  # tune, report
    "cli": BASE | {"cli", "plugins", "inference", "tools", "training", "algorithms", "nn", "data", "rl", "serve"},
    "serve": BASE | {"serve", "inference", "training", "algorithms", "nn", "data", "rl"},
}


def _room(parts: list[str]) -> str:
    """The layer a dotted module path (relative to metafit) belongs to: its top-level sub-package,
    or for ``rl.<room>...`` the rl room."""
    if len(parts) > 1 and parts[0] == "rl" and f"rl.{parts[1]}" in RL_ROOMS:
        return f"rl.{parts[1]}"
    return parts[0]


def _layer(rel: Path) -> str:
    """The layer of a module (path relative to metafit)."""
    return _room(list(rel.parts[:-1]) + [Path(rel.parts[-1]).stem])


def _allowed(layer: str) -> set[str]:
    allowed = ALLOWED[layer] | {layer}
    return allowed | RL_ROOMS if "rl" in allowed else allowed


def _imports(path: Path, layer_parts: tuple[str, ...]) -> set[str]:
    """The layers (metafit sub-packages; rl rooms) a module imports."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(layer_parts[: len(layer_parts) - (node.level - 1)])
                mod = base + (node.module.split(".") if node.module else [])
                if node.module:
                    found.add(_room(mod))
                else:  # "from . import x": x is a module or sub-package of the resolved package
                    found.update(_room(base + a.name.split(".")) for a in node.names)
            elif node.module and node.module.startswith("metafit."):
                found.add(_room(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("metafit."):
                    found.add(_room(a.name.split(".")[1:]))
    return found


MODULES = sorted(p for p in PKG.rglob("*.py") if p.parent != PKG)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    rel = path.relative_to(PKG)
    layer = _layer(rel)
    package_parts = rel.parts[:-1]  # the package the module lives in, relative to metafit
    imported = _imports(path, package_parts) - {"__version__"}
    bad = imported - _allowed(layer)
    assert not bad, f"{rel} (layer {layer}) imports {sorted(bad)}"


def test_bottom_modules_import_nothing_above():
    for name in ("types", "errors", "validation", "stats"):
        imported = _imports(PKG / f"{name}.py", ())
        assert imported <= ALLOWED[name], (name, imported)
