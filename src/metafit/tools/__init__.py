"""Tools around training runs: hyperparameter search (:func:`tune`, Optuna), reports of run folders
(:func:`report_runs`: a Markdown table and learning curves). They call the training entry points a
user calls; the CLI's ``tune`` and ``report`` commands are thin wrappers over them.
"""

from __future__ import annotations

from .report import markdown_table, report_runs, runs_table
from .tune import builtin_spaces, load_space, tune

__all__ = ["builtin_spaces", "load_space", "markdown_table", "report_runs", "runs_table", "tune"]
