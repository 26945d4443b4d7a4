"""The documentation site: it builds with ``mkdocs build --strict``, its ``>>>`` examples run,
every page is in the nav, and the benchmarks page stays a page of current figures (<= 400 lines).

Convention: a fenced ```` ```pycon ```` block holding ``>>>`` prompts is a doctest. All such blocks
of one page run in order in one namespace, in a fresh working directory (relative paths such as
``runs/...`` land in a temporary folder) with ``METAFIT_CACHE_DIR`` pointing there too. Plain
```` ```python ```` blocks are illustrations and are not run.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYCON = re.compile(r"^```pycon[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

SRC = ROOT / "src"
DOCTEST_LINE = re.compile(r"^\s*>>> ", re.MULTILINE)


def _doctest_modules() -> list[str]:
    """The modules of src/metafit whose docstrings carry ``>>>`` examples (checked with doctest.testmod)."""
    names = []
    for path in sorted((SRC / "metafit").rglob("*.py")):
        if DOCTEST_LINE.search(path.read_text(encoding="utf-8")):
            parts = path.relative_to(SRC).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


DOCTEST_MODULES = _doctest_modules()


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


def _doctest_pages() -> list[Path]:
    return [p for p in _pages() if any(">>>" in block for block in PYCON.findall(p.read_text()))]


def _pycon_only(markdown: str) -> str:
    """The page with every line outside ```pycon blocks blanked, so doctest's line numbers are
    the page's."""
    out, inside = [], False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            inside = line.startswith("```pycon") and not inside
            out.append("")
        else:
            out.append(line if inside else "")
    return "\n".join(out)


class _NavLoader(yaml.SafeLoader):
    """mkdocs.yml may hold tags such as !!python/name (Material's emoji options): ignore them."""


_NavLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def _nav_files(nav) -> list[str]:
    out: list[str] = []
    for item in nav or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out += _nav_files(value)
        elif isinstance(value, str) and not value.startswith(("http://", "https://")):
            out.append(value)
    return out


def test_every_page_is_in_the_nav():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_NavLoader)
    nav = _nav_files(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in _pages() if "hooks" not in p.relative_to(DOCS).parts)
    assert sorted(set(nav)) == sorted(nav), "a page is listed twice in the nav"
    assert [p for p in pages if p not in nav] == [], "pages missing from the nav of mkdocs.yml"
    assert [p for p in nav if p not in pages] == [], "nav entries without a page"


def test_benchmarks_page_is_at_most_400_lines():
    lines = (DOCS / "benchmarks.md").read_text().count("\n")
    assert lines <= 400, f"docs/benchmarks.md has {lines} lines; keep current figures only (<= 400)"


def test_benchmarks_sections_keep_their_numbers():
    # other pages, configs and results/*.json refer to "docs/benchmarks.md section N"
    text = (DOCS / "benchmarks.md").read_text()
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", text, re.MULTILINE)]
    assert numbers == list(range(1, 14))


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.skip('mkdocs / mkdocstrings are not installed: pip install -c constraints.txt -e ".[docs]"')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "algorithms" / "index.html").is_file()


@pytest.mark.parametrize("page", _doctest_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METAFIT_CACHE_DIR", str(tmp_path / "cache"))
    text = _pycon_only(page.read_text())
    test = doctest.DocTestParser().get_doctest(text, {"__name__": "__docs__"}, str(page.relative_to(ROOT)),
                                               str(page), 0)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=report.append, clear_globs=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {page} failed:\n" + "".join(report)


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_module_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in doctest.DocTestFinder().find(module, name, module=module):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{name}: no >>> example found in its docstrings"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed:\n" + "".join(report)
