"""Confidence that means what it says: temperature scaling (Guo et al. 2017) fitted on fixed
validation episodes and stored in the checkpoint's metadata.

A single scalar ``T`` divides every logit before the softmax; it is the minimiser of the query
negative log-likelihood over the validation episodes (convex in log T). Predictions (argmax) do
not change, probabilities do. ``metafit.load`` applies a stored temperature in ``predict`` and
``serve``; evaluation reports the expected calibration error (ECE) with and without it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import ImageClasses, load_splits
from ..errors import ConfigError
from ..types import Task
from .checkpoint import load, update_checkpoint_meta
from .config import RunConfig, TaskConfig
from .evaluate import expected_calibration_error
from .trainer import make_sampler

__all__ = ["calibrate_checkpoint", "fit_temperature", "query_logits"]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the mean NLL of ``softmax(logits / T)`` (L-BFGS on log T, float64)."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


@torch.no_grad()
def query_logits(model, tasks, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Query logits [N, n_ways] and labels [N] of ``tasks`` pooled (all tasks must be n-way alike)."""
    model.eval()
    logits, labels = [], []
    for task in tasks:
        task: Task = task.to(device)
        logits.append(model.task_logits(task).float().cpu())
        labels.append(task.query_y.cpu())
    return torch.cat(logits), torch.cat(labels)


def calibrate_checkpoint(checkpoint: str | os.PathLike, *, episodes: int | None = None, n_ways: int | None = None,
                         k_shots: int | None = None, n_queries: int | None = None, seed: int | None = None,
                         out: str | os.PathLike | None = None, data_root: str | None = None,
                         splits: dict[str, ImageClasses] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Fit the temperature of ``checkpoint`` on fixed validation episodes (default: its ``eval``
    section's validation episodes) and store it in the checkpoint's metadata (in place, or as
    ``out``). Returns the calibration record: temperature, ECE and NLL before and after."""
    model = load(checkpoint, device)
    config: RunConfig = model.run_config
    if config.data.task_kind != "classification":
        raise ConfigError(
            f"Calibrate: the checkpoint must be a classifier; got a {config.data.task_kind} model. "
            "Temperature scaling applies to class probabilities only."
        )
    if data_root is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"root": data_root})})
    ec = config.eval
    task = TaskConfig(n_ways=n_ways or ec.n_ways, k_shots=k_shots or ec.k_shots,
                      n_queries=n_queries or ec.n_queries, within_group=ec.within_group)
    n_eps = episodes if episodes is not None else ec.val_episodes
    if n_eps < 1:
        raise ConfigError(f"Calibrate: episodes must be >= 1; got {n_eps}. Pass a positive --episodes.")
    ev = config.model_copy(update={"eval": ec.model_copy(update=task.model_dump())})
    sampler = make_sampler((splits or load_splits(config.data))["val"], ev, "val", 0)
    eps = sampler.fixed_episodes(n_eps, ec.seed if seed is None else seed)
    t0 = time.perf_counter()
    logits, labels = query_logits(model, sampler.tasks(eps), device)
    temperature = fit_temperature(logits, labels)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(
            f"Calibrate: the fitted temperature must be a positive number; got {temperature}. The validation "
            "logits are degenerate (e.g. every prediction right with infinite margin); use more episodes."
        )

    def stats(t: float) -> tuple[float, float]:
        probs = torch.softmax(logits / t, -1)
        ece = expected_calibration_error(probs.amax(-1), probs.argmax(-1) == labels)
        return ece, float(F.cross_entropy(logits / t, labels))

    (ece0, nll0), (ece1, nll1) = stats(1.0), stats(temperature)
    record = {"temperature": temperature, "split": "val", "episodes": n_eps, **task.model_dump(),
              "seed": ec.seed if seed is None else seed, "ece_before": ece0, "ece_after": ece1,
              "nll_before": nll0, "nll_after": nll1, "seconds": time.perf_counter() - t0}
    update_checkpoint_meta(checkpoint, {"calibration": record}, out)
    return {**record, "checkpoint": str(Path(out) if out else Path(checkpoint))}
