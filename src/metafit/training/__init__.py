"""Training, evaluation and checkpoints (the layer above algorithms, nn and data)."""

from __future__ import annotations

from .checkpoint import load, read_checkpoint, save_checkpoint
from .config import (
    AugmentConfig,
    EvalConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    build_model,
    builtin_configs,
    load_config,
    make_config,
)
from .evaluate import EvalResult, evaluate_episodes, evaluate_tasks
from .curves import plot_curves, read_run
from .run import evaluate_checkpoint, evaluate_runs, train, with_algorithm_overrides
from .trainer import Trainer, TrainResult, make_sampler, resolve_device

__all__ = [
    "AugmentConfig",
    "EvalConfig",
    "EvalResult",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_model",
    "builtin_configs",
    "evaluate_checkpoint",
    "evaluate_episodes",
    "evaluate_runs",
    "evaluate_tasks",
    "load",
    "load_config",
    "make_config",
    "make_sampler",
    "plot_curves",
    "read_checkpoint",
    "read_run",
    "resolve_device",
    "save_checkpoint",
    "train",
    "with_algorithm_overrides",
]
