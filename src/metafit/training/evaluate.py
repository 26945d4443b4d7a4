"""Evaluation: accuracy over a fixed list of episodes with a 95% confidence interval."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch

from ..algorithms import Algorithm
from ..data import EpisodeSampler
from ..stats import mean_ci
from ..types import Task

__all__ = ["EvalResult", "evaluate_episodes", "evaluate_tasks", "expected_calibration_error", "summarize"]


@dataclass(frozen=True)
class EvalResult:
    mean: float  # accuracy in [0, 1] (classification) or mean squared error (regression)
    ci95: float  # half-width of the 95% confidence interval of the mean (1.96 * s / sqrt(n))
    std: float
    episodes: int
    loss: float
    per_episode: list[float] = field(default_factory=list, repr=False)
    metric: str = "accuracy"  # or "mse"
    ece: float | None = None  # expected calibration error of the softmax probabilities (classification)
    ece_calibrated: float | None = None  # the same with the checkpoint's calibrated temperature
    temperature: float | None = None

    @property
    def score(self) -> float:
        """Higher is better: accuracy, or minus the mean squared error."""
        return -self.mean if self.metric == "mse" else self.mean

    def to_dict(self, per_episode: bool = False) -> dict:
        d = asdict(self)
        if not per_episode:
            d.pop("per_episode")
        return d

    def __str__(self) -> str:
        if self.metric == "mse":
            return f"MSE {self.mean:.3f} +/- {self.ci95:.3f} ({self.episodes} tasks)"
        return f"{100 * self.mean:.2f}% +/- {100 * self.ci95:.2f}% ({self.episodes} episodes)"


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): the mean |accuracy - confidence| over ``bins`` equal-width confidence
    bins, weighted by the share of predictions in each bin."""
    confidence = confidence.double().flatten()
    correct = correct.double().flatten()
    if confidence.numel() == 0 or not bool(torch.isfinite(confidence).all()):
        return float("nan")  # no predictions, or diverged ones (NaN logits): no calibration to measure
    which = (confidence * bins).ceil().clamp(1, bins).long() - 1
    conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence)
    acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
    return float((conf - acc).abs().sum() / confidence.numel())


def summarize(accs: list[float], losses: list[float], metric: str = "accuracy") -> EvalResult:
    t = torch.tensor(accs, dtype=torch.float64)
    n = len(accs)
    std = float(t.std(unbiased=True)) if n > 1 else 0.0
    mean, ci95 = mean_ci(t)
    return EvalResult(
        mean=mean,
        ci95=ci95,
        std=std,
        episodes=n,
        loss=float(torch.tensor(losses, dtype=torch.float64).mean()),
        per_episode=[float(a) for a in accs],
        metric=metric,
    )


@torch.no_grad()
def evaluate_tasks(model: Algorithm, tasks: Iterable[Task], device: torch.device | str = "cpu",
                   channels_last: bool = False, progress: Callable | None = None,
                   inner_steps: int | None = None, temperature: float | None = None) -> EvalResult:
    """Accuracy (or, for regression models, mean squared error) of ``model.task_logits`` on each
    task; the model is put in eval mode and restored. ``inner_steps`` overrides the adaptation
    steps of gradient-based learners (``adapt(..., steps=inner_steps)``). Classification also
    reports the expected calibration error of the pooled query predictions, and with a
    ``temperature`` (a calibrated checkpoint's) the ECE of ``softmax(logits / temperature)``."""
    regression = getattr(model, "task_kind", "classification") == "regression"
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    accs, losses = [], []
    conf, conf_t, hits = [], [], []
    try:
        for task in tasks:
            task = task.to(device)
            if channels_last and task.support_x.ndim == 4:
                task = Task(task.support_x.contiguous(memory_format=torch.channels_last), task.support_y,
                            task.query_x.contiguous(memory_format=torch.channels_last), task.query_y, task.n_ways)
            if inner_steps is None:
                logits = model.task_logits(task)
            else:
                adapted = model.adapt(task.support_x, task.support_y, task.n_ways, steps=inner_steps)
                logits = model.predict(adapted, task.query_x)
            if regression:
                mse = float(torch.nn.functional.mse_loss(logits, task.query_y))
                losses.append(mse)
                accs.append(mse)
            else:
                losses.append(float(torch.nn.functional.cross_entropy(logits, task.query_y)))
                accs.append(float((logits.argmax(-1) == task.query_y).float().mean()))
                logits = logits.float()
                conf.append(torch.softmax(logits, -1).amax(-1).cpu())
                hits.append((logits.argmax(-1) == task.query_y).cpu())
                if temperature is not None:
                    conf_t.append(torch.softmax(logits / temperature, -1).amax(-1).cpu())
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    res = summarize(accs, losses, "mse" if regression else "accuracy")
    if regression or not hits:
        return res
    correct = torch.cat(hits)
    extra = {"ece": expected_calibration_error(torch.cat(conf), correct)}
    if temperature is not None:
        extra.update(ece_calibrated=expected_calibration_error(torch.cat(conf_t), correct), temperature=temperature)
    return replace(res, **extra)


def evaluate_episodes(model: Algorithm, sampler: EpisodeSampler, episodes, device="cpu",
                      channels_last: bool = False, progress: Callable | None = None,
                      inner_steps: int | None = None, temperature: float | None = None) -> EvalResult:
    """Evaluate on fixed episode descriptions of ``sampler`` (no augmentation)."""
    tasks = sampler.tasks(episodes)
    return evaluate_tasks(model, tasks, device, channels_last, progress, inner_steps, temperature)
