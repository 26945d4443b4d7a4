"""R2D2: ridge regression differentiable discriminator (Bertinetto, Henriques, Torr & Vedaldi,
"Meta-learning with differentiable closed-form solvers", ICLR 2019).

Each task's support embeddings are regressed onto one-hot labels in closed form (ridge
regression through the Woodbury identity: an n x n solve, n = support examples); the query
logits are the regression outputs, calibrated by a learned scale and bias. The backbone, the
regulariser and the calibration are meta-learned by back-propagating through the solve.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..nn.solvers import ridge_weights
from ..types import Task, TaskBatch
from .base import Adapted, Algorithm, AlgorithmConfig, MetaOutput, check_task

__all__ = ["R2D2", "RidgeConfig", "RidgeWeights"]


class RidgeConfig(AlgorithmConfig):
    name: Literal["ridge"] = "ridge"
    lambda_init: float = Field(
        1.0, gt=0.0,
        description="initial ridge regulariser lambda (learned as log lambda); R2D2/MetaOptNet use 50 on "
                    "their wider features, 1 suits Conv4's 64-d embeddings")
    learn_lambda: bool = Field(True, description="meta-learn lambda (R2D2 does)")
    scale_init: float = Field(1.0, gt=0.0, description="initial logit scale alpha of the adjust layer (learned)")
    learn_scale: bool = Field(True, description="meta-learn the logit scale alpha and bias beta")
    bias_feature: bool = Field(True, description="append a constant 1 to the features, i.e. fit a bias per class")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the meta-training loss")


@dataclass(frozen=True)
class RidgeWeights(Adapted):
    weights: torch.Tensor  # [d (+1 with bias_feature), n_ways]


def _head_precision(x: torch.Tensor):
    """The head runs in at least float32, with autocast off (a bfloat16 Cholesky is unusable)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _widen(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class R2D2(Algorithm):
    """R2D2 (Bertinetto et al., ICLR 2019): a ridge-regression head solved in closed form.

    Per task, with support embeddings ``X`` [n, d] (a column of ones appended when
    ``bias_feature``) and one-hot labels ``Y`` [n, n_ways],

        W = argmin ||X W - Y||^2 + lambda ||W||^2 = X^T (X X^T + lambda I)^-1 Y,

    and a query ``q`` scores ``logits = alpha * q W + beta`` (the paper's "adjust" layer). lambda,
    alpha and beta are meta-learned; lambda through its logarithm. Note that a bias ``beta``
    shared by all classes cancels in the softmax: it does not change predictions or the
    cross-entropy, so it keeps its initial value 0; it is kept for parity with the paper.
    Defaults: lambda_init = 1 (the paper and MetaOptNet's R2D2 head use 50 on much wider
    features; on 64-d Conv4 embeddings 50 over-shrinks W at the start), alpha = 1, beta = 0,
    bias feature on, no label smoothing.
    """

    name = "ridge"
    Config = RidgeConfig

    def __init__(self, config: RidgeConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        self.log_lambda = nn.Parameter(torch.tensor(float(config.lambda_init)).log(),
                                       requires_grad=config.learn_lambda)
        self.log_scale = nn.Parameter(torch.tensor(float(config.scale_init)).log(),
                                      requires_grad=config.learn_scale)
        self.bias = nn.Parameter(torch.zeros(()), requires_grad=config.learn_scale)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _weights(self, support: torch.Tensor, labels: torch.Tensor, n_ways: int) -> torch.Tensor:
        """Ridge weights [B, d(+1), n_ways] from support embeddings [B, n, d]."""
        onehot = F.one_hot(labels, n_ways).to(support.dtype)
        lam = self.log_lambda.exp().to(support.dtype)
        return ridge_weights(support, onehot, lam, bias_feature=self.config.bias_feature)

    def _scores(self, queries: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.config.bias_feature:
            queries = torch.cat([queries, queries.new_ones(queries.shape[:-1] + (1,))], dim=-1)
        scale = self.log_scale.exp().to(queries.dtype)
        return scale * (queries @ weights) + self.bias.to(queries.dtype)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int) -> RidgeWeights:
        check_task(support_x, support_y, n_ways, "R2D2.adapt")
        emb = _widen(self.embed(support_x))
        with _head_precision(emb):
            return RidgeWeights(self._weights(emb[None], support_y[None], n_ways)[0])

    def predict(self, adapted: RidgeWeights, x: torch.Tensor) -> torch.Tensor:
        emb = _widen(self.embed(x))
        with _head_precision(emb):
            return self._scores(emb, adapted.weights.to(emb.dtype))

    def _logits(self, sx, sy, qx, n_ways: int) -> torch.Tensor:
        # One backbone pass over support and query of all tasks: [B, S + Q, ...] -> [B, S + Q, d]
        b, s = sx.shape[:2]
        x = torch.cat([sx, qx], dim=1)
        emb = _widen(self.embed(x.flatten(0, 1)).unflatten(0, (b, x.shape[1])))
        with _head_precision(emb):
            return self._scores(emb[:, s:], self._weights(emb[:, :s], sy, n_ways))

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        logits = self._logits(batch.support_x, batch.support_y, batch.query_x, batch.n_ways)
        flat = logits.flatten(0, 1)
        target = batch.query_y.flatten()
        loss = F.cross_entropy(flat, target, label_smoothing=self.config.label_smoothing)
        acc = (flat.argmax(-1) == target).float().mean()
        return MetaOutput(loss, acc.detach())

    def task_logits(self, task: Task) -> torch.Tensor:
        check_task(task.support_x, task.support_y, task.n_ways, "R2D2.task_logits")
        return self._logits(
            task.support_x[None], task.support_y[None], task.query_x[None], task.n_ways
        )[0]
