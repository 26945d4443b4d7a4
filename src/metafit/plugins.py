"""Extensions that live outside metafit's source tree.

A plugin is a Python module that, when imported, registers what it adds: a backbone
(``metafit.nn.register_backbone``), or a line in a registry dict (``metafit.algorithms.ALGORITHMS``,
``metafit.data.DATASETS``, ``metafit.rl.envs.FAMILIES``, ``metafit.rl.learners.RL_LEARNERS``).
In Python, importing it before use is enough. metafit's commands (``metafit train``, ``eval``,
``serve``, ...) import, before they read any config or checkpoint:

- every module named in the environment variable ``METAFIT_PLUGINS`` (comma-separated), e.g.
  ``METAFIT_PLUGINS=my_backbones metafit train my.yaml``;
- every entry point of the group ``metafit.plugins`` of the installed packages, e.g. in a
  package's pyproject.toml: ``[project.entry-points."metafit.plugins"] my_backbones = "my_backbones"``.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from .errors import ConfigError, short_repr

__all__ = ["ENTRY_POINT_GROUP", "PLUGINS_ENV", "load_plugins"]

#: the environment variable naming plugin modules (comma-separated)
PLUGINS_ENV = "METAFIT_PLUGINS"
#: the entry-point group of installed packages' plugins
ENTRY_POINT_GROUP = "metafit.plugins"


def load_plugins(modules: list[str] | None = None) -> list[str]:
    """Import the plugin modules: ``modules`` if given, else those named in ``METAFIT_PLUGINS`` and
    the ``metafit.plugins`` entry points. Returns the names imported; a module that cannot be
    imported is a one-line :class:`~metafit.errors.ConfigError` naming it."""
    if modules is None:
        modules = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        modules += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for name in modules:
        try:
            importlib.import_module(name.split(":")[0])
        except Exception as err:  # noqa: BLE001 - any failure of a user's module becomes one line
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise ConfigError(
                f"Plugins: {short_repr(name)} must be an importable module (from {PLUGINS_ENV} or the "
                f"{ENTRY_POINT_GROUP!r} entry points); got {reason[:300]}. Check the module name and that its "
                "folder is on PYTHONPATH."
            ) from err
    return modules
