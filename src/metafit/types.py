"""Task vocabulary: what samplers produce and algorithms consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LabelledBatch", "Task", "TaskBatch"]


def _moved(tasks: "Task | TaskBatch", device: torch.device | str):
    """``tasks`` (a Task or a TaskBatch) with every tensor on ``device``."""
    tensors = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
    return type(tasks)(*(x.to(device, non_blocking=True) for x in tensors), tasks.n_ways)


@dataclass(frozen=True)
class Task:
    """One few-shot task: a labelled support set to adapt on and a query set to predict. Frozen.

    ``support_x``: the support inputs, ``[n_ways * k_shots, *x_shape]``; ``support_y``: their labels,
    ``[n_ways * k_shots]``; ``query_x``: the query inputs, ``[n_ways * n_queries, *x_shape]``; ``query_y``:
    their labels (or regression targets); ``n_ways``: the number of classes, labels being ``0..n_ways-1``
    (regression tasks, such as the sinusoids, use 1).

    >>> import torch
    >>> task = Task(torch.zeros(6, 1, 28, 28), torch.arange(3).repeat(2), torch.zeros(9, 1, 28, 28),
    ...             torch.arange(3).repeat(3), n_ways=3)
    >>> tuple(task.support_x.shape), task.query_y.tolist()
    ((6, 1, 28, 28), [0, 1, 2, 0, 1, 2, 0, 1, 2])
    >>> TaskBatch.stack([task, task]).support_x.shape
    torch.Size([2, 6, 1, 28, 28])
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_ways: int

    def to(self, device: torch.device | str) -> "Task":
        """A copy of the task with its four tensors moved to ``device`` (a ``torch.device`` or a
        name such as ``"cuda"``); returns a new :class:`Task`."""
        return _moved(self, device)


@dataclass(frozen=True)
class TaskBatch:
    """Tasks of identical shape stacked on a leading meta-batch dimension. Frozen.

    The fields are those of :class:`Task` with one more leading dimension (the ``meta_batch_size``):
    ``support_x`` ``[B, n_ways * k_shots, *x_shape]``, ``support_y``, ``query_x``, ``query_y``, and
    ``n_ways`` shared by every task. ``len(batch)`` is the number of tasks, ``batch[i]`` the ``i``-th
    :class:`Task`, and iterating yields the tasks in order.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_ways: int

    @property
    def meta_batch_size(self) -> int:
        """The number of tasks in the batch (the size of the leading dimension)."""
        return int(self.support_x.shape[0])

    def __len__(self) -> int:
        return self.meta_batch_size

    def __getitem__(self, i: int) -> Task:
        return Task(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i], self.n_ways)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @staticmethod
    def stack(tasks: list[Task]) -> "TaskBatch":
        """Stack ``tasks`` (a non-empty list of :class:`Task` of identical shapes) into one
        :class:`TaskBatch`; its ``n_ways`` is the first task's. Raises ``ValueError`` on an empty list."""
        if not tasks:
            raise ValueError("TaskBatch.stack needs at least one task")
        return TaskBatch(
            torch.stack([t.support_x for t in tasks]),
            torch.stack([t.support_y for t in tasks]),
            torch.stack([t.query_x for t in tasks]),
            torch.stack([t.query_y for t in tasks]),
            tasks[0].n_ways,
        )

    def to(self, device: torch.device | str) -> "TaskBatch":
        """A copy of the batch with its four tensors moved to ``device``; returns a new :class:`TaskBatch`."""
        return _moved(self, device)


@dataclass(frozen=True)
class LabelledBatch:
    """A standard (non-episodic) mini-batch: images and their base-class labels, for
    supervised pretraining (transfer baselines). Frozen.

    ``x``: the images, ``[batch, *x_shape]``; ``y``: their base-class labels, ``[batch]``.
    ``len(batch)`` is the number of images.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> "LabelledBatch":
        """A copy of the batch with ``x`` and ``y`` moved to ``device``; returns a new :class:`LabelledBatch`."""
        return LabelledBatch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))
