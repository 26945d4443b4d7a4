"""The one training loop for every learner kind (see :mod:`metafit.training.loop.core`) and the
small protocol a learner kind implements to plug into it (:mod:`metafit.training.loop.protocol`)."""

from __future__ import annotations

from .core import Loop, check_same_config, stop_line
from .folder import RUN_FILES, RUN_FOLDERS, check_run_folder, prepare_run_folder, remove_run_files
from .guard import Guard
from .protocol import LoopRun, LoopSettings, StepReport, Validation, Window

__all__ = ["Guard", "Loop", "LoopRun", "LoopSettings", "RUN_FILES", "RUN_FOLDERS", "StepReport", "Validation",
           "Window", "check_run_folder", "check_same_config", "prepare_run_folder", "remove_run_files", "stop_line"]
