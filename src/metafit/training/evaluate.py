"""Evaluation: accuracy over a fixed list of episodes with a 95% confidence interval."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, ClassVar, Iterable, Sequence

import torch

from ..algorithms import Algorithm
from ..data import EpisodeSampler
from ..stats import mean_ci
from ..types import Task
from .embedded_eval import embedded_logits, episode_task, supports_embedding

__all__ = ["EpisodePredictions", "EvalPredictions", "EvalResult", "evaluate_episodes", "evaluate_tasks",
           "expected_calibration_error", "summarize"]


@dataclass(frozen=True)
class EpisodePredictions:
    """One evaluated episode as it was shown to the model (images in [0, 1], on the CPU), with
    the model's predicted query labels and the dataset class name of every episode label."""

    support_x: torch.Tensor  # [n_ways * k_shots, C, H, W]
    support_y: torch.Tensor  # [n_ways * k_shots] episode labels 0..n_ways-1
    query_x: torch.Tensor  # [n_ways * n_queries, C, H, W]
    query_y: torch.Tensor  # [n_ways * n_queries] true episode labels
    predicted: torch.Tensor  # [n_ways * n_queries] predicted episode labels
    class_names: tuple[str, ...]  # class_names[label]: the dataset class of episode label ``label``

    @property
    def correct(self) -> torch.Tensor:
        return self.predicted == self.query_y


@dataclass(frozen=True)
class EvalPredictions:
    """What :func:`evaluate_episodes` keeps with ``keep_predictions``: the true and predicted
    dataset class of every query of every evaluated episode (indices into ``classes``: episode
    labels are per episode, dataset classes are what a confusion matrix can pool), and the first
    few ``episodes`` with their images."""

    classes: tuple[str, ...]  # names of the dataset classes that occurred (rotated copies apart)
    true: torch.Tensor  # [all queries] index into ``classes``
    predicted: torch.Tensor  # [all queries] index into ``classes``
    episodes: list[EpisodePredictions]
    n_episodes: int

    @property
    def n_queries(self) -> int:
        return int(self.true.numel())


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
    #: the predictions kept for plots: set on the result of ``evaluate_episodes(keep_predictions=n)``,
    #: else None; not a field (never in ``to_dict``, equality or checkpoints; ``replace`` drops it)
    predictions: ClassVar[EvalPredictions | None] = None

    @property
    def score(self) -> float:
        """Higher is better: accuracy, or minus the mean squared error."""
        return -self.mean if self.metric == "mse" else self.mean

    def to_dict(self, per_episode: bool = False) -> dict:
        """The result's fields as a plain dict; the per-episode scores only with ``per_episode``."""
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


class _Tally:
    """The per-episode scores and pooled confidences of an evaluation, episode by episode."""

    def __init__(self, regression: bool, temperature: float | None) -> None:
        self.regression, self.temperature = regression, temperature
        self.accs: list[float] = []
        self.losses: list[float] = []
        self.conf: list[torch.Tensor] = []
        self.conf_t: list[torch.Tensor] = []
        self.hits: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor | None:
        """Score one episode's query ``logits`` against ``query_y``; its predicted labels (CPU) for classification."""
        if self.regression:
            mse = float(torch.nn.functional.mse_loss(logits, query_y))
            self.losses.append(mse)
            self.accs.append(mse)
            return None
        self.losses.append(float(torch.nn.functional.cross_entropy(logits, query_y)))
        self.accs.append(float((logits.argmax(-1) == query_y).float().mean()))
        logits = logits.float()
        self.conf.append(torch.softmax(logits, -1).amax(-1).cpu())
        predicted = logits.argmax(-1)
        self.hits.append((predicted == query_y).cpu())
        if self.temperature is not None:
            self.conf_t.append(torch.softmax(logits / self.temperature, -1).amax(-1).cpu())
        return predicted.cpu()

    def result(self) -> EvalResult:
        """The :class:`EvalResult` of the episodes added so far."""
        res = summarize(self.accs, self.losses, "mse" if self.regression else "accuracy")
        if self.regression or not self.hits:
            return res
        correct = torch.cat(self.hits)
        extra = {"ece": expected_calibration_error(torch.cat(self.conf), correct)}
        if self.temperature is not None:
            extra.update(ece_calibrated=expected_calibration_error(torch.cat(self.conf_t), correct),
                         temperature=self.temperature)
        return replace(res, **extra)


@torch.no_grad()
def evaluate_tasks(model: Algorithm, tasks: Iterable[Task], device: torch.device | str = "cpu",
                   channels_last: bool = False, progress: Callable | None = None,
                   inner_steps: int | None = None, temperature: float | None = None,
                   on_predictions: Callable[[int, Task, torch.Tensor], None] | None = None) -> EvalResult:
    """Accuracy (or, for regression models, mean squared error) of ``model.task_logits`` on each
    task of ``tasks``, one at a time on ``device`` (``channels_last``: image tensors in that memory
    format); the model is put in eval mode and restored. ``inner_steps`` overrides the adaptation
    steps of gradient-based learners (``adapt(..., steps=inner_steps)``). Classification also
    reports the expected calibration error of the pooled query predictions, and with a
    ``temperature`` (a calibrated checkpoint's) the ECE of ``softmax(logits / temperature)``.
    ``progress(1)`` is called after every task; ``on_predictions(i, task, predicted)``
    (classification) after task ``i`` with the task as evaluated (on ``device``) and its predicted
    query labels (on the CPU)."""
    tally = _Tally(getattr(model, "task_kind", "classification") == "regression", temperature)
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
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
            predicted = tally.add(logits, task.query_y)
            if on_predictions is not None and predicted is not None:
                on_predictions(len(tally.accs) - 1, task, predicted)
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    return tally.result()


@torch.no_grad()
def _evaluate_embedded(model: Algorithm, sampler: EpisodeSampler, episodes: list, device, channels_last: bool,
                       progress: Callable | None, temperature: float | None,
                       on_predictions: Callable[[int, Task, torch.Tensor], None] | None) -> EvalResult | None:
    """:func:`evaluate_tasks` of ``episodes`` through cached per-image embeddings
    (:mod:`metafit.training.embedded_eval`); None where the backbone uses batch statistics."""
    tally = _Tally(False, temperature)
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        chunks = embedded_logits(model, sampler, episodes, device, channels_last)
        if chunks is None:
            return None
        for logits, query_y in chunks():
            for one_logits, one_y in zip(logits, query_y):
                predicted = tally.add(one_logits, one_y)
                if on_predictions is not None:
                    i = len(tally.accs) - 1
                    on_predictions(i, _LazyTask(sampler, episodes[i], one_y), predicted)
                if progress is not None:
                    progress(1)
    finally:
        model.train(was_training)
    return tally.result()


class _LazyTask:
    """An episode's query labels, and its images (read only if asked for) for ``on_predictions``."""

    def __init__(self, sampler: EpisodeSampler, episode, query_y: torch.Tensor) -> None:
        self._sampler, self._episode, self.query_y = sampler, episode, query_y
        self._task: Task | None = None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._task is None:
            self._task = episode_task(self._sampler, self._episode)
        return getattr(self._task, name)


def evaluate_episodes(model: Algorithm, sampler: EpisodeSampler, episodes, device="cpu",
                      channels_last: bool = False, progress: Callable | None = None,
                      inner_steps: int | None = None, temperature: float | None = None,
                      keep_predictions: int = 0) -> EvalResult:
    """Evaluate ``model`` on the fixed episode descriptions ``episodes`` of ``sampler`` (no
    augmentation); ``device``, ``channels_last``, ``progress``, ``inner_steps`` and ``temperature``
    as in :func:`evaluate_tasks`. Learners whose predictions come from per-image embeddings embed
    every distinct image once and score many episodes at a time (:mod:`metafit.training.embedded_eval`:
    the same numbers, many times faster); others run one episode at a time.

    ``keep_predictions=n`` (classification, image episodes) also keeps, in ``result.predictions``
    (an :class:`EvalPredictions`), the true and predicted dataset class of every query and the
    images and predictions of the first ``n`` episodes; the numbers are the same as without it.
    Rotated copies of a class count as classes of their own (``"name @90"``)."""
    episodes = list(episodes)
    regression = getattr(model, "task_kind", "classification") == "regression"
    keep = None
    if keep_predictions > 0 and not regression:
        n_rot = getattr(sampler, "n_rot", 1)
        names = sampler.data.class_names
        kept: list[EpisodePredictions] = []
        true, predicted = [], []

        def keep(i: int, task: Task, pred: torch.Tensor) -> None:
            classes = episodes[i].classes  # virtual class id of every episode label
            true.append(classes[task.query_y.cpu()])
            predicted.append(classes[pred])
            if len(kept) < keep_predictions:
                kept.append(EpisodePredictions(
                    task.support_x.detach().cpu().contiguous(), task.support_y.cpu(),
                    task.query_x.detach().cpu().contiguous(), task.query_y.cpu(), pred,
                    tuple(_class_name(names, int(c), n_rot) for c in classes)))

    res = None  # (a None from the embedded path comes before any episode is scored or kept)
    if episodes and supports_embedding(model, sampler, inner_steps):
        res = _evaluate_embedded(model, sampler, episodes, device, channels_last, progress, temperature, keep)
    if res is None:
        res = evaluate_tasks(model, sampler.tasks(episodes), device, channels_last, progress, inner_steps,
                             temperature, keep)
    if keep is None:
        return res
    none = torch.zeros(0, dtype=torch.long)
    true_ids, pred_ids = torch.cat(true or [none]), torch.cat(predicted or [none])
    present, index = torch.unique(torch.cat([true_ids, pred_ids]), return_inverse=True)
    n = len(true_ids)
    object.__setattr__(res, "predictions", EvalPredictions(
        classes=tuple(_class_name(names, int(c), n_rot) for c in present), true=index[:n], predicted=index[n:],
        episodes=kept, n_episodes=len(true)))
    return res


def _class_name(names: Sequence[str], virtual: int, n_rot: int) -> str:
    """The name of a virtual class id (``base * n_rot + rotation``)."""
    base, rot = divmod(virtual, n_rot)
    return names[base] + (f" @{90 * rot}" if rot else "")
