"""MkDocs hook: tables generated from metafit's registries at build time, so the pages cannot
drift from the code.

A page asks for a table with an HTML comment on a line of its own:

    <!-- metafit:registry algorithms -->   one row per registered algorithm (name, class, summary)
    <!-- metafit:fields algorithms -->     every algorithm's config fields (default, allowed, meaning)
    <!-- metafit:fields datasets -->       likewise for data sources (``metafit.data.DATASETS``)
    <!-- metafit:fields backbones -->      backbones (``metafit.nn.BACKBONES``)
    <!-- metafit:fields rl-learners -->    meta-RL learners
    <!-- metafit:registry rl-families -->  meta-RL environment families
    <!-- metafit:fields rl-train -->       the meta-RL loop (``train`` of ``metafit rl train``)
    <!-- metafit:fields section NAME -->   one section of the run config (train, task, eval, ...)

An unknown marker, or a registry that does not import, fails the build.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"^<!-- metafit:(fields|registry) ([a-z-]+)(?: ([a-z_]+))? -->$", re.MULTILINE)


def on_config(config, **kwargs):
    # document the source tree this site belongs to, installed or not
    src = str(Path(config.config_file_path).parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    def replace(match: re.Match) -> str:
        kind, what, arg = match.groups()
        try:
            return GENERATORS[(kind, what)](arg) if (kind, what) in GENERATORS else _unknown(match.group(0))
        except PluginError:
            raise
        except Exception as err:  # an import error, a moved registry: fail the build loudly
            raise PluginError(f"{page.file.src_path}: {match.group(0)} failed: {type(err).__name__}: {err}") from err

    return MARKER.sub(replace, markdown)


def on_page_content(html: str, page, config, files, **kwargs):
    # Sphinx roles in docstrings (:class:`x`, :func:`x`) render as their literal text
    # (``~a.b.C`` shows as ``C`` in Sphinx; here the full path is kept, without the tilde)
    return re.sub(r":(?:class|func|meth|mod|data|attr|obj|exc):(<code>)~?", r"\1", html)


def _unknown(marker: str) -> str:
    raise PluginError(f"unknown marker {marker}; see docs/hooks/generate.py")


# -- helpers -----------------------------------------------------------------------------------

def _cell(text: Any) -> str:
    """Text for a table cell: pipes escaped, and ``<``/``>`` outside code spans escaped so that
    ``<out_dir>`` is not read as an HTML tag."""
    parts = re.split(r"(`+[^`]*`+)", str(text).replace("\n", " "))
    for i in range(0, len(parts), 2):  # the text between code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "".join(parts).replace("|", "\\|")


def _summary(*objs: Any) -> str:
    """The first paragraph of the first object with a docstring of its own (not inherited)."""
    for obj in objs:
        doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            first = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")
            if not first.endswith(":"):  # an introduction to a list says nothing on its own
                return first
    return ""


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _allowed(field) -> str:
    parts: list[str] = []
    ann = field.annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal:
        return ", ".join(f"`{a}`" for a in args)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if literals:
        parts.append(", ".join(f"`{v}`" for lit in literals for v in typing.get_args(lit)))
    bounds = []
    for meta in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sym} {getattr(meta, attr)}")
    if bounds:
        parts.append(", ".join(bounds))
    if type(None) in args:
        parts.append("or `null`" if parts else "optional (`null`)")
    return " ".join(parts)


def _field_table(model_cls, prefix: str, skip: tuple[str, ...] = ("name",)) -> str:
    rows = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    for key, field in model_cls.model_fields.items():
        if key in skip:
            continue
        rows.append(f"| `{prefix}{key}` | {_cell(_default(field))} | {_cell(_allowed(field))} | "
                    f"{_cell(field.description or '')} |")
    return "\n".join(rows)


def _class_path(cls: type) -> str:
    module = cls.__module__
    public = module.rsplit(".", 1)[0] if module.count(".") >= 2 else module
    top = importlib.import_module(public)
    return f"{public}.{cls.__name__}" if getattr(top, cls.__name__, None) is cls else f"{module}.{cls.__name__}"


# -- generators --------------------------------------------------------------------------------

def algorithms_registry(_: str | None) -> str:
    from metafit.algorithms import ALGORITHMS

    rows = ["| `algorithm.name` | class | tasks | trains on | what it is |", "|---|---|---|---|---|"]
    for name, cls in ALGORITHMS.items():
        rows.append(f"| `{name}` | `{_class_path(cls)}` | {', '.join(cls.task_kinds)} | {cls.training_data} | "
                    f"{_cell(_summary(sys.modules[cls.__module__], cls))} |")
    return "\n".join(rows)


def _section(name: str, summary: str, classes: str, config_cls: type, prefix: str) -> str:
    """One registry entry's section: its name, summary, classes and the table of its config fields."""
    return f"### `{name}`\n\n{summary}\n\n{classes}.\n\n{_field_table(config_cls, prefix)}\n"


def algorithms_fields(_: str | None) -> str:
    from metafit.algorithms import ALGORITHMS

    return "\n".join(_section(name, _summary(sys.modules[cls.__module__]), f"Config class `{_class_path(cls.Config)}`",
                              cls.Config, "algorithm.") for name, cls in ALGORITHMS.items())


def datasets_fields(_: str | None) -> str:
    from metafit.data import DATASETS

    return "\n".join(_section(name, _summary(cls, sys.modules[cls.__module__]), f"Config class `{_class_path(cls)}`",
                              cls, "data.") for name, cls in DATASETS.items())


def backbones_fields(_: str | None) -> str:
    from metafit.nn import BACKBONES

    return "\n".join(_section(name, _summary(config_cls, sys.modules[module_cls.__module__], module_cls),
                              f"Module `{_class_path(module_cls)}`, config `{_class_path(config_cls)}`", config_cls,
                              "backbone.") for name, (config_cls, module_cls) in BACKBONES.items())


def _rl_learners() -> dict[str, type]:
    from metafit.rl.learners import RL_LEARNERS

    return RL_LEARNERS


def rl_learners_fields(_: str | None) -> str:
    return "\n".join(_section(name, _summary(sys.modules[cls.__module__]),
                              f"Class `{_class_path(cls)}`, config `{_class_path(cls.Config)}`", cls.Config, "learner.")
                     for name, cls in _rl_learners().items())


def _rl_families() -> dict[str, type]:
    from metafit.rl.envs import FAMILIES

    return FAMILIES


def rl_families_registry(_: str | None) -> str:
    rows = ["| `family.name` | class | settings (default) | what it is |", "|---|---|---|---|"]
    for name, cls in _rl_families().items():
        settings = ", ".join(
            f"`{f.name}` ({f.default})" for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING and not f.name.startswith("_")
        ) if dataclasses.is_dataclass(cls) else ""
        rows.append(f"| `{name}` | `{_class_path(cls)}` | {_cell(settings)} | {_cell(_summary(cls, sys.modules[cls.__module__]))} |")
    return "\n".join(rows)


def section_fields(section: str | None) -> str:
    from metafit.training import RunConfig

    if section not in RunConfig.model_fields:
        raise PluginError(f"metafit:fields section {section}: not a run-config section")
    cls = RunConfig.model_fields[section].annotation
    return _field_table(cls, f"{section}.", skip=())


def rl_train_fields(_: str | None) -> str:
    from metafit.training.rl_run import RLRunConfig

    return _field_table(RLRunConfig.model_fields["train"].annotation, "train.", skip=())


GENERATORS = {
    ("fields", "rl-train"): rl_train_fields,
    ("registry", "algorithms"): algorithms_registry,
    ("fields", "algorithms"): algorithms_fields,
    ("fields", "datasets"): datasets_fields,
    ("fields", "backbones"): backbones_fields,
    ("fields", "rl-learners"): rl_learners_fields,
    ("registry", "rl-families"): rl_families_registry,
    ("fields", "section"): section_fields,
}
