"""End-to-end entry points used by the CLI and by scripts: train then test, evaluate a checkpoint
on fixed episodes or on Lake's one-shot runs. Reports are written as JSON (atomically)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from pydantic import Field

from ..data import ImageClasses, load_runs, load_splits
from ..errors import ConfigError
from ..validation import parse_config
from .checkpoint import load, with_algorithm_overrides
from .config import RunConfig, TaskConfig
from .evaluate import EvalResult, evaluate_episodes, evaluate_tasks
from .metrics_log import write_json
from .trainer import Trainer, check_run_folder, make_sampler

__all__ = ["evaluate_checkpoint", "evaluate_runs", "train", "with_algorithm_overrides"]

TEST_SEED_OFFSET = 1  # test episodes use eval.seed + 1 so they never coincide with validation




def train(config: RunConfig, resume: bool | str = False, splits: dict[str, ImageClasses] | None = None,
          test: bool = True, on_validate=None, overwrite: bool = False) -> dict[str, Any]:
    """Meta-train, then evaluate the best checkpoint on ``eval.test_episodes`` fixed test episodes.
    Returns (and writes to ``<out_dir>/report.json``) a summary. ``on_validate(step, result)``
    is called after every validation (see :class:`Trainer`). An ``out_dir`` that already holds
    something is refused unless ``resume`` (continue that run) or ``overwrite`` (delete its
    checkpoints, logs and report first). ``report["stop"]`` says why training ended (all
    ``train.meta_steps``, or the ``train.max_minutes`` budget at ``step``); ``report["split"]``
    lists the classes of every split (image data)."""
    check_run_folder(config.out_dir, resume, overwrite)  # before the data is read: a refusal comes at once
    trainer = Trainer(config, splits, pretrained=not resume, on_validate=on_validate)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    if not trainer.dist.is_main:  # distributed: rank 0 calibrates, tests and writes the report
        return {"out_dir": str(result.out_dir), "steps": result.steps, "rank": trainer.dist.rank,
                "best_checkpoint": str(result.checkpoint), "val": result.best_val.to_dict() if result.best_val else None,
                "train_seconds": result.train_seconds, "best_step": result.best_step, "timing": trainer.timing,
                "stop": result.stop}
    report: dict[str, Any] = {
        "out_dir": str(result.out_dir),
        "steps": result.steps,
        "stop": result.stop,
        "train_seconds": result.train_seconds,
        "timing": trainer.timing,
        "best_step": result.best_step,
        "best_checkpoint": str(result.checkpoint),
        "val": result.best_val.to_dict() if result.best_val else None,
    }
    if trainer.split is not None:
        report["split"] = trainer.split
    temperature = None
    if config.eval.calibrate and config.data.task_kind == "classification":
        from .calibration import calibrate_checkpoint

        report["calibration"] = calibrate_checkpoint(result.checkpoint, splits=trainer.splits,
                                                     device=str(trainer.device))
        temperature = report["calibration"]["temperature"]
    if test:
        model = load(result.checkpoint, trainer.device)
        ec = config.eval
        test_res = _evaluate(model, trainer.splits["test"], config, ec, ec.test_episodes,
                             ec.seed + TEST_SEED_OFFSET, trainer.device, trainer.channels_last,
                             temperature=temperature)
        report["test"] = {**test_res.to_dict(), "n_ways": ec.n_ways, "k_shots": ec.k_shots,
                          "n_queries": ec.n_queries, "within_group": ec.within_group}
    write_json(result.out_dir / "report.json", report)
    return report


def _evaluate(model, data, config: RunConfig, task: TaskConfig, episodes: int, seed: int,
              device, channels_last: bool, progress=None, split: str = "test",
              inner_steps: int | None = None, temperature: float | None = None) -> EvalResult:
    ev = config.model_copy(update={"eval": config.eval.model_copy(update=task.model_dump())})
    sampler = make_sampler(data, ev, split, 0)
    eps = sampler.fixed_episodes(episodes, seed)
    return evaluate_episodes(model, sampler, eps, device, channels_last, progress, inner_steps, temperature)


class EvalRequest(TaskConfig):
    """The settings of one evaluation of a checkpoint (``metafit eval``), validated as a config."""

    episodes: int = Field(ge=1, le=100_000, description="fixed episodes")
    seed: int = Field(ge=0, le=2**32 - 1, description="episode seed")
    inner_steps: int | None = Field(None, ge=0, le=100_000, description="adaptation steps of a gradient-based learner")


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, n_ways: int | None = None, k_shots: int | None = None,
                        n_queries: int | None = None, episodes: int | None = None, split: str = "test",
                        within_group: bool | None = None, rotations: bool | None = None, seed: int | None = None,
                        data_root: str | None = None, device: str = "cpu", progress=None,
                        splits: dict[str, ImageClasses] | None = None,
                        inner_steps: int | None = None,
                        algorithm_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Accuracy (regression: mean squared error) of a checkpoint on fixed episodes of a split
    (task settings default to the checkpoint's ``eval`` section). Test episodes of the same seed
    are those the trainer reports. ``inner_steps`` overrides a gradient-based learner's
    adaptation steps; ``algorithm_overrides`` changes adaptation-only fields of the algorithm
    (see :func:`with_algorithm_overrides`)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"Eval: split must be one of 'train', 'val', 'test'; got {split!r}. Choose a listed split.")
    model = with_algorithm_overrides(load(checkpoint, device), algorithm_overrides)
    config: RunConfig = model.run_config
    if data_root is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"root": data_root})})
    if rotations is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"rotations": rotations})})
    ec = config.eval
    if seed is None:
        seed = ec.seed + (TEST_SEED_OFFSET if split == "test" else 0)
    request = parse_config(EvalRequest, {
        "n_ways": n_ways if n_ways is not None else ec.n_ways,
        "k_shots": k_shots if k_shots is not None else ec.k_shots,
        "n_queries": n_queries if n_queries is not None else ec.n_queries,
        "within_group": within_group if within_group is not None else ec.within_group,
        "episodes": episodes if episodes is not None else ec.test_episodes, "seed": seed, "inner_steps": inner_steps,
    }, owner="Eval", fix="Pass a value in that range (metafit eval --ways/--shots/--queries/--episodes/--seed/--inner-steps).")
    task = TaskConfig(**request.model_dump(include=set(TaskConfig.model_fields)))
    n_eps = request.episodes
    data = (splits or load_splits(config.data))[split]
    t0 = time.perf_counter()
    dev = torch.device(device)
    if inner_steps is not None and not hasattr(model.config, "eval_inner_steps"):
        raise ConfigError(
            f"Eval: inner steps only apply to gradient-based learners; got --inner-steps {inner_steps} for "
            f"{model.config.name!r}. Drop --inner-steps."
        )
    temperature = (model.checkpoint_meta.get("calibration") or {}).get("temperature")
    res = _evaluate(model, data, config, task, n_eps, seed, dev, dev.type in ("cpu", "cuda"), progress, split,
                    inner_steps, temperature)
    rot = ec.rotations if ec.rotations is not None else getattr(config.data, "rotations", False)
    out = {"checkpoint": str(checkpoint), "split": split, **task.model_dump(), "rotations": rot, "seed": seed,
           **res.to_dict(), "seconds": time.perf_counter() - t0}
    if inner_steps is not None:
        out["inner_steps"] = inner_steps
    if algorithm_overrides:
        out["algorithm_overrides"] = dict(algorithm_overrides)
    return out


def evaluate_runs(checkpoint: str | os.PathLike, runs_dir: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """Accuracy and error rate on Lake's one-shot runs (one N-way 1-shot task per run)."""
    model = load(checkpoint, device)
    dc = model.run_config.data
    runs = load_runs(runs_dir, dc.image_size, dc.in_channels, invert=dc.name == "omniglot" or dc.invert)
    res = evaluate_tasks(model, [t for _, t in runs], device)
    per_run = {name: acc for (name, _), acc in zip(runs, res.per_episode)}
    return {"checkpoint": str(checkpoint), "runs_dir": str(runs_dir), **res.to_dict(),
            "error_rate": 1.0 - res.mean, "per_run": per_run}
