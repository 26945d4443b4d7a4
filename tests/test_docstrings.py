"""Every public name of the library's modules has a docstring that names its arguments, and the
``>>>`` examples in the main modules' docstrings run (issue 37).

The check, per module in ``MODULES``, over every name in its ``__all__``:

* a class has a docstring of its own (an inherited one does not count);
* a public function or method (one the class defines itself, ``forward`` excepted) has a docstring,
  its own or the one it overrides (``inspect.getdoc``), and that docstring mentions every parameter
  (except ``self``/``cls``) as a word, e.g. ````n_ways````;
* the parameters of ``__init__`` are looked for in the class docstring (and in ``__init__``'s own
  docstring, when it has one), which is where the house style describes them.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re

import pytest
import torch

MODULES = [
    "metafit", "metafit.algorithms", "metafit.nn", "metafit.data", "metafit.inference", "metafit.tools",
    "metafit.serve", "metafit.sklearn", "metafit.types", "metafit.errors", "metafit.validation",
    "metafit.functional", "metafit.stats", "metafit.training", "metafit.rl", "metafit.rl.envs",
    "metafit.rl.learners", "metafit.rl.baselines", "metafit.plugins",
]

#: modules whose docstrings carry ``>>>`` examples (each must still have some)
DOCTEST_MODULES = [
    "metafit.types", "metafit.stats", "metafit.errors", "metafit.validation", "metafit.functional",
    "metafit.algorithms", "metafit.algorithms.base", "metafit.nn", "metafit.nn.mlp", "metafit.data",
    "metafit.data.sinusoid", "metafit.data.classes", "metafit.data.store", "metafit.tools.report",
]

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
EXEMPT_METHODS = {"forward"}  # nn.Module.forward: the class docstring says what the module computes


def _callables(module_name: str):
    """Yield ``(qualified name, object, owner class or None)`` for the public names of a module."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    assert names, f"{module_name} has no __all__"
    for name in names:
        obj = getattr(module, name)
        qual = f"{module_name}.{name}"
        if inspect.isclass(obj):
            yield qual, obj, None
            for attr, value in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if attr == "__init__" and getattr(obj, "_is_protocol", False):
                    continue  # typing's placeholder: a Protocol is a structural type, never instantiated
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if inspect.isfunction(value):
                    yield f"{qual}.{attr}", value, obj
        elif inspect.isfunction(obj):
            yield qual, obj, None


def _offenders(module_names):
    """The public names without a docstring, those whose docstring misses parameters, and the count checked."""
    no_doc, missing_args, checked = [], [], 0
    for module_name in module_names:
        for qual, obj, owner in _callables(module_name):
            checked += 1
            if inspect.isclass(obj):
                if not (obj.__doc__ or "").strip():
                    no_doc.append(qual)
                continue
            attr = qual.rsplit(".", 1)[1]
            if attr in EXEMPT_METHODS:
                continue
            if attr == "__init__":
                doc = (owner.__doc__ or "") + "\n" + (obj.__doc__ or "")
            else:
                doc = inspect.getdoc(obj) or ""
                if not doc.strip():
                    no_doc.append(qual)
                    continue
            try:
                params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
            except (TypeError, ValueError):
                continue
            missing = [p for p in params if not re.search(rf"\b{re.escape(p)}\b", doc)]
            if missing:
                missing_args.append(f"{qual}: {', '.join(missing)}")
    return no_doc, missing_args, checked


def test_every_public_name_has_a_docstring_naming_its_arguments():
    no_doc, missing_args, checked = _offenders(MODULES)
    assert checked >= 150, f"only {checked} public names checked: did __all__ shrink or the walk break?"
    report = [f"no docstring: {q}" for q in no_doc] + [f"arguments not mentioned: {q}" for q in missing_args]
    assert not report, f"{len(report)} public names are not documented:\n" + "\n".join(report)


def test_the_check_catches_an_undocumented_function(monkeypatch):
    """The check above cannot pass vacuously: a bare function and an argument left out are reported."""
    import metafit.stats as stats

    def bare(x):
        pass

    def half(x, y):
        """Uses ``x`` only."""

    monkeypatch.setattr(stats, "bare", bare, raising=False)
    monkeypatch.setattr(stats, "half", half, raising=False)
    monkeypatch.setattr(stats, "__all__", [*stats.__all__, "bare", "half"])
    no_doc, missing_args, _ = _offenders(["metafit.stats"])
    assert no_doc == ["metafit.stats.bare"]
    assert missing_args == ["metafit.stats.half: y"]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    with torch.random.fork_rng(devices=[]):  # examples that seed torch leave the session's stream alone
        result = doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)
    assert result.attempted > 0, f"{name} has no >>> examples any more: update DOCTEST_MODULES"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see stdout)"
