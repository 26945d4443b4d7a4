"""Training, evaluation and checkpoints (the layer above algorithms, nn and data): one training
loop for every learner kind (:mod:`metafit.training.loop`), few-shot (:class:`Trainer`) and meta-RL
(:func:`metafit.training.rl_run.train_rl`) runs plugged into it, one checkpoint format."""

from __future__ import annotations

from .calibration import calibrate_checkpoint
from .checkpoint import load, read_checkpoint, save_checkpoint
from .config import (
    AugmentConfig,
    EvalConfig,
    LoopConfig,
    OptimizerSettings,
    RunConfig,
    TaskConfig,
    TrainConfig,
    TrainLoopConfig,
    build_model,
    builtin_configs,
    load_config,
    make_config,
)
from .ensemble import ensemble_checkpoints
from .evaluate import EvalResult, evaluate_episodes, evaluate_tasks
from .curves import plot_curves, read_run
from .run import evaluate_checkpoint, evaluate_runs, train, with_algorithm_overrides
from .loop import Loop, LoopRun, LoopSettings
from .metrics_log import write_json
from .rl_run import RLRunConfig, builtin_rl_configs, evaluate_rl_checkpoint, load_rl, load_rl_config, train_rl
from .trainer import Trainer, TrainResult, make_sampler, resolve_device

__all__ = [
    "AugmentConfig",
    "EvalConfig",
    "EvalResult",
    "Loop",
    "LoopConfig",
    "LoopRun",
    "LoopSettings",
    "OptimizerSettings",
    "RLRunConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "TrainResult",
    "Trainer",
    "build_model",
    "builtin_configs",
    "builtin_rl_configs",
    "calibrate_checkpoint",
    "ensemble_checkpoints",
    "evaluate_checkpoint",
    "evaluate_episodes",
    "evaluate_rl_checkpoint",
    "evaluate_runs",
    "evaluate_tasks",
    "load",
    "load_config",
    "load_rl",
    "load_rl_config",
    "make_config",
    "make_sampler",
    "plot_curves",
    "read_checkpoint",
    "read_run",
    "resolve_device",
    "save_checkpoint",
    "train",
    "train_rl",
    "with_algorithm_overrides",
    "write_json",
]
