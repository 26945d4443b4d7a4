"""A worked example of adding an algorithm: one file, plus one line in ``ALGORITHMS``
(``metafit/algorithms/__init__.py``: ``MatchingLite.name: MatchingLite``).

Matching networks without the full-context embeddings (Vinyals et al., 2016): a query's class
scores are the softmax-weighted votes of the support examples, weighted by the cosine
similarity of their embeddings times a learned scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from metafit.algorithms import Adapted, Algorithm, AlgorithmConfig, MetaOutput, check_task
from metafit.types import TaskBatch


class MatchingLiteConfig(AlgorithmConfig):
    name: Literal["matching_lite"] = "matching_lite"
    scale: float = Field(10.0, gt=0.0, le=1000.0, description="initial (learned) scale of the cosine similarities")


@dataclass(frozen=True)
class SupportSet(Adapted):
    embeddings: torch.Tensor  # [n_support, d], unit length
    onehot: torch.Tensor  # [n_support, n_ways]


class MatchingLite(Algorithm):
    name = "matching_lite"
    Config = MatchingLiteConfig

    def __init__(self, config: MatchingLiteConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        self.log_scale = nn.Parameter(torch.tensor(float(config.scale)).log())

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> SupportSet:
        check_task(support_x, support_y, n_ways, "MatchingLite.adapt")
        emb = F.normalize(self.backbone(support_x), dim=-1)
        return SupportSet(emb, F.one_hot(support_y, n_ways).to(emb.dtype))

    def predict(self, adapted: SupportSet, x: torch.Tensor) -> torch.Tensor:
        attention = (self.log_scale.exp() * F.normalize(self.backbone(x), dim=-1) @ adapted.embeddings.T).softmax(-1)
        return (attention @ adapted.onehot).clamp_min(1e-8).log()  # log class probabilities

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        losses, correct = [], []
        for b in range(batch.support_x.shape[0]):
            logits = self.predict(self.adapt(batch.support_x[b], batch.support_y[b], batch.n_ways), batch.query_x[b])
            losses.append(F.nll_loss(logits, batch.query_y[b]))
            correct.append((logits.argmax(-1) == batch.query_y[b]).float().mean())
        return MetaOutput(torch.stack(losses).mean(), torch.stack(correct).mean().detach())
