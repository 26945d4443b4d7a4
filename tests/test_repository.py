"""The repository holds code, not output: the few weights kept to re-score headline figures are
exactly those the manifest lists, with matching checksums, and results stay small."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
WEIGHTS = RESULTS / "weights"


def test_kept_weights_are_the_manifest_and_match_its_checksums():
    manifest = json.loads((WEIGHTS / "MANIFEST.json").read_text())
    listed = {Path(f["file"]).name: f for f in manifest["files"]}
    on_disk = {p.name for p in WEIGHTS.iterdir() if p.name != "MANIFEST.json"}
    assert on_disk == set(listed), "weights without a manifest entry (or entries without a file)"
    total = 0
    for name, entry in listed.items():
        data = (WEIGHTS / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert len(data) == entry["bytes"], name
        assert "--iterations 0" in entry["rescore"]["command"] and entry["regenerate"]["steps"], name
        total += len(data)
    assert total == manifest["total_bytes"] <= 3 * 10**6


def test_results_are_small_summaries():
    big = {str(p.relative_to(RESULTS)): p.stat().st_size for p in RESULTS.rglob("*")
           if p.is_file() and p.parent != WEIGHTS and p.stat().st_size > 2**20}
    assert not big, f"results over 1 MiB (thin the curves): {big}"


REPO = RESULTS.parent.parent
SRC = REPO / "src" / "metafit"
MODULE_LINES, FUNCTION_LINES, BENCHMARK_LINES = 450, 80, 300
#: words a long function's docstring uses to state why it stays in one piece
LONG_REASON = "one piece:"


def _code_lines(node) -> int:
    """Lines of a function without its docstring."""
    lines = node.end_lineno - node.lineno + 1
    doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) else None
    if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        lines -= doc.end_lineno - doc.lineno + 1
    return lines


def test_modules_and_functions_stay_small():
    """No module over ~450 lines, no function over ~80 lines of code unless its docstring says
    why it is one piece ("one piece: ..."), no benchmark script over ~300 lines."""
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(REPO)
        if len(text.splitlines()) > MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > FUNCTION_LINES:
                if LONG_REASON not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {_code_lines(node)} lines")
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        if len(path.read_text().splitlines()) > BENCHMARK_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(path.read_text().splitlines())} lines")
    assert not too_long, "split these (or state in the docstring why a function is one piece): " + "; ".join(too_long)


#: the packages whose ``__all__`` is metafit's public API
PUBLIC = ("metafit", "metafit.algorithms", "metafit.nn", "metafit.data", "metafit.training", "metafit.inference",
          "metafit.tools", "metafit.rl", "metafit.rl.envs", "metafit.rl.learners", "metafit.rl.baselines",
          "metafit.serve", "metafit.sklearn", "metafit.types", "metafit.errors", "metafit.stats", "metafit.validation")


def _public_names(module: str) -> set[str]:
    import importlib

    names = set(getattr(importlib.import_module(module), "__all__", ()))
    return names | {p.rsplit(".", 1)[-1] for p in PUBLIC if "." in p and p.rsplit(".", 1)[0] == module}  # subpackages


def test_benchmarks_use_the_public_api():
    """Benchmark scripts import only names of metafit's public packages (their ``__all__``), so
    they run the same entry points a user runs, not library internals."""
    offenders = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "metafit":
                public = _public_names(node.module) if node.module in PUBLIC else set()
                offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                              if a.name not in public]
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names
                              if a.name.startswith("metafit") and a.name not in PUBLIC]
    assert not offenders, "benchmarks must use public names: " + "; ".join(offenders)
