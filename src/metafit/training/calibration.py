"""Confidence that means what it says: temperature scaling (Guo et al. 2017) fitted on fixed
validation episodes and stored in the checkpoint's metadata.

A single scalar ``T`` divides every logit before the softmax; it is the minimiser of the query
negative log-likelihood over the validation episodes (convex in log T). Predictions (argmax) do
not change, probabilities do. ``metafit.load`` applies a stored temperature in ``predict`` and
``serve``; evaluation reports the expected calibration error (ECE) with and without it.
"""

from __future__ import annotations

import logging
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
from .checkpoint import load, update_checkpoint_meta, with_algorithm_overrides
from .config import RunConfig, TaskConfig
from .evaluate import expected_calibration_error
from .trainer import make_sampler

__all__ = ["TEMPERATURE_RANGE", "calibrate_checkpoint", "fit_temperature", "query_logits"]

log = logging.getLogger(__name__)


#: the range a fitted temperature is kept in: on validation queries that are all right with a wide
#: margin the NLL keeps falling as T -> 0 (no finite optimum); the bound keeps such a fit usable
TEMPERATURE_RANGE = (1e-2, 1e2)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T in :data:`TEMPERATURE_RANGE` minimising the mean NLL of
    ``softmax(logits / T)`` of validation queries (``logits`` [N, n_ways], ``labels`` [N]); returns T.

    The NLL is convex in 1/T, so a golden-section search over log(1/T) (float64, to machine
    precision) finds the minimum, or the end of the range where the queries do not determine it."""
    logits = logits.detach().double()
    low, high = TEMPERATURE_RANGE
    # logits relative to the true class's, which is left out: NLL_i = log(1 + sum_k exp(beta * margin_ik))
    margins = (logits - logits.gather(1, labels[:, None])).masked_fill(
        F.one_hot(labels, logits.shape[1]).bool(), -math.inf)

    def nll(log_inverse: float) -> float:
        """log of the summed NLL at 1/T = exp(log_inverse), accurate where the NLL underflows."""
        s = torch.logsumexp(margins * math.exp(log_inverse), 1)
        log_terms = torch.where(s < -30.0, s, torch.log(F.softplus(s)))  # log(log1p(exp(s))) ~ s far below 0
        return float(torch.logsumexp(log_terms, 0))

    a, b = -math.log(high), -math.log(low)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > 1e-9:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    temperature = math.exp(-(a + b) / 2.0)
    for end in TEMPERATURE_RANGE:  # a minimum at an end of the range is that end
        if abs(math.log(temperature / end)) < 1e-6:
            return end
    return temperature


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
                         splits: dict[str, ImageClasses] | None = None, device: str = "cpu",
                         algorithm: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the temperature of ``checkpoint`` on fixed validation episodes (default: its ``eval``
    section's validation episodes) and store it in the checkpoint's metadata (in place, or as
    ``out``). Returns the calibration record: temperature, ECE and NLL before and after, the
    episodes' shape and seed, and the path of the checkpoint written.

    ``episodes``, ``n_ways``, ``k_shots``, ``n_queries`` and ``seed`` override the ``eval``
    section's number of validation episodes, task shape and episode seed (None: the section's).
    ``data_root`` points the data source at another folder; ``splits`` passes the class splits
    already loaded (only ``val`` is used) instead of loading them; ``device`` is where the model
    runs. ``algorithm``: ``algorithm`` fields to change before fitting (as ``metafit eval --set``,
    e.g. ``{"transductive_steps": 5}``); the temperature then belongs to the changed model, so the
    copy written to ``out`` (required) carries those fields too and is used that way when loaded; the
    trained checkpoint is not rewritten. A checkpoint that is not a classifier is a ConfigError."""
    model = load(checkpoint, device)
    trained: RunConfig = model.run_config
    if algorithm:
        if out is None:
            raise ConfigError(
                f"Calibrate: algorithm overrides {sorted(algorithm)} must be written to a copy; got no out path. "
                "Pass --out PATH (the copy carries the overrides and their temperature; the trained checkpoint "
                "stays as it is)."
            )
        model = with_algorithm_overrides(model, algorithm)
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
    if temperature in TEMPERATURE_RANGE:
        log.warning("Calibrate: the fitted temperature %g is at the end of the range %s: the validation episodes "
                    "do not determine it (e.g. every query right with a wide margin); use more or harder episodes",
                    temperature, TEMPERATURE_RANGE)
    record = {"temperature": temperature, "at_range_end": temperature in TEMPERATURE_RANGE, "split": "val", "episodes": n_eps, **task.model_dump(),
              "seed": ec.seed if seed is None else seed, "ece_before": ece0, "ece_after": ece1,
              "nll_before": nll0, "nll_after": nll1, "seconds": time.perf_counter() - t0}
    updates: dict[str, Any] = {"calibration": record}
    if config.algorithm != trained.algorithm:
        # the copy is used as calibrated: the changed algorithm, with the temperature fitted on it
        stored = {**trained.to_dict(), "algorithm": config.algorithm.model_dump(mode="json")}
        updates["config"] = stored
        record["algorithm_overrides"] = dict(algorithm or {})
    update_checkpoint_meta(checkpoint, updates, out)
    return {**record, "checkpoint": str(Path(out) if out else Path(checkpoint))}
