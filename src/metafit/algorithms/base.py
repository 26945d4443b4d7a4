"""The algorithm interface every meta-learner implements.

An algorithm is an ``nn.Module`` built from a frozen config and a backbone module:

- ``adapt(support_x, support_y, n_ways) -> Adapted``: uses the support set only; the result is
  a small frozen dataclass of tensors (prototypes, fast weights, solver weights) that can be
  cached and reused.
- ``predict(adapted, x) -> logits``.
- ``meta_loss(batch) -> MetaOutput``: the differentiable meta-objective over a ``TaskBatch``;
  the Trainer owns the optimizer, schedule, clipping and checkpoints. Algorithms that write
  their own meta-gradients (e.g. Reptile) override ``meta_step`` instead.
- ``task_logits(task)``: query logits of a whole task, the path evaluation uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, TaskError
from ..types import Task, TaskBatch
from ..validation import ConfigModel

__all__ = ["Adapted", "Algorithm", "AlgorithmConfig", "MetaOutput", "check_task"]


class AlgorithmConfig(ConfigModel):
    """Base of algorithm configs (the ``algorithm:`` section of a run's config); subclasses add a
    ``name`` literal, the key that selects the algorithm in ``ALGORITHMS``, and their own fields."""

    name: str


@dataclass(frozen=True)
class Adapted:
    """Marker base for the result of ``adapt``: a frozen dataclass of tensors (prototypes, fast
    weights, solver weights) that :meth:`Algorithm.predict` classifies queries with."""


@dataclass(frozen=True)
class MetaOutput:
    """``loss``: differentiable meta-objective; ``accuracy``: the training metric of the batch
    (query accuracy for classification, query mean squared error for regression)."""

    loss: torch.Tensor
    accuracy: torch.Tensor


def check_task(support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int, owner: str) -> None:
    """Reject support sets that cannot define an ``n_ways``-class task: raise a :class:`TaskError`
    (its message started by ``owner``) unless ``support_y`` is a 1-D label vector with one label per
    row of ``support_x``, every label lies in ``0..n_ways-1`` and every class has an example.
    Returns nothing.

    >>> import torch
    >>> check_task(torch.zeros(4, 8), torch.tensor([0, 1, 0, 1]), 2, "ProtoNet.adapt")
    >>> check_task(torch.zeros(4, 8), torch.tensor([0, 0, 0, 0]), 2, "ProtoNet.adapt")
    Traceback (most recent call last):
    ...
    metafit.errors.TaskError: ProtoNet.adapt: every class must have at least one support example; got none for...
    """
    if support_y.ndim != 1 or support_y.shape[0] != support_x.shape[0]:
        raise TaskError(
            f"{owner}: support_y must be a 1-D label vector with one label per support example; "
            f"got shape {tuple(support_y.shape)} for {support_x.shape[0]} examples. "
            "Pass one integer label per support image."
        )
    if support_y.numel() and (int(support_y.min()) < 0 or int(support_y.max()) >= n_ways):
        raise TaskError(
            f"{owner}: support labels must lie in 0..{n_ways - 1}; got range "
            f"{int(support_y.min())}..{int(support_y.max())}. Relabel classes as 0..n_ways-1."
        )
    present = torch.bincount(support_y, minlength=n_ways)
    if bool((present == 0).any()):
        missing = torch.nonzero(present == 0).flatten().tolist()
        raise TaskError(
            f"{owner}: every class must have at least one support example; got none for "
            f"labels {missing}. Add support examples for those classes or lower n_ways."
        )


class Algorithm(nn.Module):
    """Base class: subclasses set ``name`` and ``Config`` and implement the methods below.

    Every algorithm is built as ``Algorithm(config, backbone, n_outputs, task_kind)``: ``config``, an instance
    of its ``Config``; ``backbone``, the ``nn.Module`` that embeds inputs (algorithms that put a head on it
    read its ``out_features``, the size of its flat output); ``n_outputs``, the size of a learned head
    (classes per task, or target dimensions for regression; unused by metric and solver heads); ``task_kind``,
    ``"classification"`` or ``"regression"``, which must be one of the class's ``task_kinds`` (else a
    :class:`ConfigError`). :func:`metafit.algorithms.build_algorithm` builds one from a config.
    """

    name: ClassVar[str]
    Config: ClassVar[type[AlgorithmConfig]]

    #: the task kinds an algorithm supports
    task_kinds: ClassVar[tuple[str, ...]] = ("classification",)
    #: what ``meta_loss`` trains on: "episodes" (a ``TaskBatch``) or "batches" (a
    #: ``LabelledBatch`` of base-class images, for supervised pretraining)
    training_data: ClassVar[str] = "episodes"

    def __init__(self, config: AlgorithmConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__()
        if task_kind not in self.task_kinds:
            raise ConfigError(
                f"Config: algorithm.name {self.name!r} must be used on {' or '.join(self.task_kinds)} tasks; "
                f"got {task_kind} data. Choose an algorithm that supports {task_kind} (e.g. maml)."
            )
        self.config = config
        self.backbone = backbone
        self.n_outputs = int(n_outputs)
        self.task_kind = task_kind

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> Adapted:
        """Learn a task from its support set alone: ``support_x`` ``[n, *x_shape]``, ``support_y``
        its labels ``[n]`` in ``0..n_ways-1`` (float targets ``[n, d]`` for regression) and ``n_ways``
        the number of classes. Returns the :class:`Adapted` state (e.g. prototypes or fast weights)
        that :meth:`predict` uses; it can be cached and reused. Invalid support sets raise a
        :class:`~metafit.errors.TaskError`."""
        raise NotImplementedError

    def predict(self, adapted: Adapted, x: torch.Tensor) -> torch.Tensor:
        """The outputs for inputs ``x`` ``[m, *x_shape]`` of the task that ``adapted`` (the result of
        :meth:`adapt`) describes: logits ``[m, n_ways]`` for classification, predictions ``[m, d]``
        for regression."""
        raise NotImplementedError

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        """The differentiable meta-objective over ``batch`` (a :class:`~metafit.types.TaskBatch` of
        training tasks: adapt on each support set, score its query set), averaged over the tasks; the
        Trainer calls ``loss.backward()`` on the returned :class:`MetaOutput`."""
        raise NotImplementedError

    def embeds_per_image(self) -> bool:
        """Whether, in eval mode, this learner's task logits depend on each image only through
        :meth:`embed_images` and :meth:`head_logits`, so that an evaluation may embed every distinct
        image once and run the heads of many episodes on the cached embeddings
        (:mod:`metafit.training.embedded_eval`). Default: no (e.g. learners that adapt the backbone)."""
        return False

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[N, d]`` of images ``x`` ``[N, C, H, W]``, as :meth:`head_logits` takes them
        (learners whose :meth:`embeds_per_image` is true)."""
        raise NotImplementedError

    def head_logits(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                    n_ways: int) -> torch.Tensor:
        """Query logits ``[E, Q, n_ways]`` of ``E`` episodes from the embeddings of their support
        images ``support`` ``[E, S, d]`` (labels ``support_y`` ``[E, S]`` in ``0..n_ways-1``) and of
        their queries ``query`` ``[E, Q, d]``: what :meth:`task_logits` returns for each episode."""
        raise NotImplementedError

    def task_logits(self, task: Task) -> torch.Tensor:
        """Query logits (or predictions) for one ``task`` (evaluation path), ``[n_query, n_ways]``;
        default: adapt on its support set then predict its query set."""
        return self.predict(self.adapt(task.support_x, task.support_y, task.n_ways), task.query_x)
