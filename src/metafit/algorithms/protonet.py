"""Prototypical Networks (Snell, Swersky & Zemel, 2017).

A class is represented by the mean embedding of its support examples (its prototype); a query
is classified by a softmax over negative distances to the prototypes. Squared Euclidean distance
is the paper's choice (a linear model in embedding space); cosine similarity with a learned
scale is offered as an option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..types import Task, TaskBatch
from .base import Adapted, Algorithm, AlgorithmConfig, MetaOutput, check_task
from .heads import episode_embeddings, query_output

__all__ = ["ProtoNet", "ProtoNetConfig", "Prototypes", "class_means", "prototype_logits"]


class ProtoNetConfig(AlgorithmConfig):
    name: Literal["protonet"] = "protonet"
    distance: Literal["squared_euclidean", "cosine"] = Field(
        "squared_euclidean", description="distance between query embeddings and prototypes"
    )
    cosine_scale: float = Field(
        10.0, gt=0.0, description="initial (learned) logit scale for the cosine distance"
    )


@dataclass(frozen=True)
class Prototypes(Adapted):
    prototypes: torch.Tensor  # [n_ways, d]


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, n_ways: int) -> torch.Tensor:
    """Mean embedding per class; ``embeddings`` [..., n, d], ``labels`` [..., n] -> [..., n_ways, d]."""
    onehot = F.one_hot(labels, n_ways).to(embeddings.dtype)  # [..., n, n_ways]
    sums = onehot.transpose(-1, -2) @ embeddings
    return sums / onehot.sum(-2).unsqueeze(-1)


def prototype_logits(
    queries: torch.Tensor, prototypes: torch.Tensor, distance: str, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [..., q, n_ways] of queries [..., q, d] against prototypes [..., n_ways, d].

    Computed in at least float32 even under autocast: the expanded squared distance cancels
    catastrophically in bfloat16."""
    if queries.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(queries.device.type):
        with torch.autocast(queries.device.type, enabled=False):
            return prototype_logits(queries.float(), prototypes.float(), distance,
                                    None if scale is None else scale.float())
    if distance == "cosine":
        cos = F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2)
        return cos * scale
    # ||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2, one matmul instead of a [q, n, d] difference tensor
    qq = queries.pow(2).sum(-1, keepdim=True)
    pp = prototypes.pow(2).sum(-1).unsqueeze(-2)
    sq = (qq - 2.0 * queries @ prototypes.transpose(-1, -2) + pp).clamp_min(0.0)
    return -sq


class ProtoNet(Algorithm):
    name = "protonet"
    Config = ProtoNetConfig

    def __init__(self, config: ProtoNetConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        self.log_scale = nn.Parameter(
            torch.tensor(float(config.cosine_scale)).log(), requires_grad=config.distance == "cosine"
        )

    def _scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> Prototypes:
        check_task(support_x, support_y, n_ways, "ProtoNet.adapt")
        return Prototypes(class_means(self.embed(support_x), support_y, n_ways))

    def predict(self, adapted: Prototypes, x: torch.Tensor) -> torch.Tensor:
        return prototype_logits(self.embed(x), adapted.prototypes, self.config.distance, self._scale())

    def _logits(self, sx, sy, qx, n_ways: int) -> torch.Tensor:
        support, queries = episode_embeddings(self.embed, sx, qx)
        return prototype_logits(queries, class_means(support, sy, n_ways), self.config.distance, self._scale())

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        return query_output(self._logits(batch.support_x, batch.support_y, batch.query_x, batch.n_ways),
                            batch.query_y)

    def task_logits(self, task: Task) -> torch.Tensor:
        return self._logits(
            task.support_x[None], task.support_y[None], task.query_x[None], task.n_ways
        )[0]
