"""Plumbing shared by algorithms that put a metric or closed-form head on backbone embeddings
(ProtoNet, the SVM and ridge heads): one backbone pass over a whole batch of episodes, the head
in float32 even under bf16 autocast (a bfloat16 Cholesky or expanded distance is unusable), and
the query cross-entropy."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..types import Task, TaskBatch
from .base import Adapted, Algorithm, MetaOutput, check_task

__all__ = ["HeadWeights", "LinearSolverHead", "episode_embeddings", "float_head", "query_output", "widen"]


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def float_head(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which the head runs at its inputs' precision: autocast off if it is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def episode_embeddings(embed: Callable[[torch.Tensor], torch.Tensor], support_x: torch.Tensor,
                       query_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support [B, S, d] and query [B, Q, d] embeddings of a batch of episodes from one backbone
    pass over all their images, widened to float32."""
    b, s = support_x.shape[:2]
    x = torch.cat([support_x, query_x], dim=1)
    emb = widen(embed(x.flatten(0, 1)).unflatten(0, (b, x.shape[1])))
    return emb[:, :s], emb[:, s:]


def query_output(logits: torch.Tensor, query_y: torch.Tensor, label_smoothing: float = 0.0) -> MetaOutput:
    """Mean query cross-entropy and accuracy of logits [B, Q, n_ways]."""
    flat = logits.flatten(0, 1)
    target = query_y.flatten()
    loss = F.cross_entropy(flat, target, label_smoothing=label_smoothing)
    acc = (flat.argmax(-1) == target).float().mean()
    return MetaOutput(loss, acc.detach())


@dataclass(frozen=True)
class HeadWeights(Adapted):
    """A task's linear classifier on embeddings: scores = scale * embedding @ weights."""

    weights: torch.Tensor  # [d (+1 with a bias feature), n_ways]


class LinearSolverHead(Algorithm):
    """Base of algorithms whose task head is a linear classifier solved from the support
    embeddings (SVM, ridge regression): subclasses give ``solve`` (support embeddings [B, n, d]
    -> weights [B, d', n_ways]) and ``scores`` (queries [..., d], weights -> logits); this class
    gives adapt, predict, the batched meta-loss and the task logits around them, with one
    backbone pass per batch and the head in float32."""

    adapted_type: type[HeadWeights] = HeadWeights

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's embeddings ``[n, d]`` of ``x``."""
        return self.backbone(x)

    def solve(self, support: torch.Tensor, labels: torch.Tensor, n_ways: int) -> torch.Tensor:
        """The head's weights ``[B, d', n_ways]`` for a batch of support sets: ``support`` the
        embeddings ``[B, n, d]``, ``labels`` their classes ``[B, n]`` in ``0..n_ways-1``."""
        raise NotImplementedError

    def scores(self, queries: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The logits ``[..., n_ways]`` of query embeddings ``queries`` ``[..., d]`` under the head
        ``weights`` that :meth:`solve` returned."""
        raise NotImplementedError

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> HeadWeights:
        check_task(support_x, support_y, n_ways, f"{type(self).__name__}.adapt")
        emb = widen(self.embed(support_x))
        with float_head(emb):
            return self.adapted_type(self.solve(emb[None], support_y[None], n_ways)[0])

    def predict(self, adapted: HeadWeights, x: torch.Tensor) -> torch.Tensor:
        emb = widen(self.embed(x))
        with float_head(emb):
            return self.scores(emb, adapted.weights.to(emb.dtype))

    def embeds_per_image(self) -> bool:
        """True: the head is solved from frozen support embeddings."""
        return True

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone embeddings of ``x``, in at least float32 (as :meth:`task_logits` uses them)."""
        return widen(self.embed(x))

    def head_logits(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                    n_ways: int) -> torch.Tensor:
        """The head solved from ``support`` (labels ``support_y``, ``n_ways`` classes) scoring
        ``query``, per episode (see :meth:`Algorithm.head_logits`)."""
        with float_head(support):
            return self.scores(query, self.solve(support, support_y, n_ways))

    def _logits(self, sx, sy, qx, n_ways: int) -> torch.Tensor:
        support, queries = episode_embeddings(self.embed, sx, qx)
        with float_head(support):
            return self.scores(queries, self.solve(support, sy, n_ways))

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        logits = self._logits(batch.support_x, batch.support_y, batch.query_x, batch.n_ways)
        return query_output(logits, batch.query_y, getattr(self.config, "label_smoothing", 0.0))

    def task_logits(self, task: Task) -> torch.Tensor:
        check_task(task.support_x, task.support_y, task.n_ways, f"{type(self).__name__}.task_logits")
        return self._logits(task.support_x[None], task.support_y[None], task.query_x[None], task.n_ways)[0]
