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
    """One few-shot task. Labels are ``0..n_ways-1``.

    ``support_x``: ``[n_ways * k_shots, *x_shape]``, ``query_x``: ``[n_ways * n_queries, *x_shape]``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_ways: int

    def to(self, device: torch.device | str) -> "Task":
        return _moved(self, device)


@dataclass(frozen=True)
class TaskBatch:
    """Tasks of identical shape stacked on a leading meta-batch dimension."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_ways: int

    @property
    def meta_batch_size(self) -> int:
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
        return _moved(self, device)


@dataclass(frozen=True)
class LabelledBatch:
    """A standard (non-episodic) mini-batch: images and their base-class labels, for
    supervised pretraining (transfer baselines)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> "LabelledBatch":
        return LabelledBatch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))
