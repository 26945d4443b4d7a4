"""R2D2: ridge regression differentiable discriminator (Bertinetto, Henriques, Torr & Vedaldi,
"Meta-learning with differentiable closed-form solvers", ICLR 2019).

Each task's support embeddings are regressed onto one-hot labels in closed form (ridge
regression through the Woodbury identity: an n x n solve, n = support examples); the query
logits are the regression outputs times a learned scale. The backbone, the
regulariser and the scale are meta-learned by back-propagating through the solve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..nn.solvers import ridge_weights
from .base import AlgorithmConfig
from .heads import HeadWeights, LinearSolverHead

__all__ = ["R2D2", "RidgeConfig", "RidgeWeights"]


class RidgeConfig(AlgorithmConfig):
    """Config of :class:`R2D2` (``algorithm: {name: ridge}``): the ridge regulariser, the logit scale
    and whether they are learned."""

    name: Literal["ridge"] = "ridge"
    lambda_init: float = Field(
        1.0, gt=0.0,
        description="initial ridge regulariser lambda (learned as log lambda); R2D2/MetaOptNet use 50 on "
                    "their wider features, 1 suits Conv4's 64-d embeddings")
    learn_lambda: bool = Field(True, description="meta-learn lambda (R2D2 does)")
    scale_init: float = Field(1.0, gt=0.0, description="initial logit scale alpha of the adjust layer (learned)")
    learn_scale: bool = Field(True, description="meta-learn the logit scale alpha")
    bias_feature: bool = Field(True, description="append a constant 1 to the features, i.e. fit a bias per class")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the meta-training loss")


@dataclass(frozen=True)
class RidgeWeights(HeadWeights):
    """R2D2's adapted task: ``weights``, the primal ridge weights [d (+1 with bias_feature), n_ways]."""


class R2D2(LinearSolverHead):
    """R2D2 (Bertinetto et al., ICLR 2019): a ridge-regression head solved in closed form.

    Per task, with support embeddings ``X`` [n, d] (a column of ones appended when
    ``bias_feature``) and one-hot labels ``Y`` [n, n_ways],

        W = argmin ||X W - Y||^2 + lambda ||W||^2 = X^T (X X^T + lambda I)^-1 Y,

    and a query ``q`` scores ``logits = alpha * q W`` (the paper's "adjust" layer without its
    bias). lambda and alpha are meta-learned, through their logarithms. The paper's bias ``beta``
    is left out: shared by all classes, it cancels in the softmax (no effect on predictions,
    cross-entropy or any gradient). Defaults: lambda_init = 1 (the paper and MetaOptNet's R2D2
    head use 50 on much wider features; on 64-d Conv4 embeddings 50 over-shrinks W at the
    start), alpha = 1, bias feature on, no label smoothing.

    Built as ``R2D2(config, backbone, n_outputs, task_kind)`` (see :class:`Algorithm`): ``config`` a
    :class:`RidgeConfig`; ``n_outputs`` is not used (any number of classes per task); classification
    only (``task_kind``). ``adapt`` returns :class:`RidgeWeights`.
    """

    name = "ridge"
    Config = RidgeConfig
    adapted_type = RidgeWeights

    def __init__(self, config: RidgeConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        self.log_lambda = nn.Parameter(torch.tensor(float(config.lambda_init)).log(),
                                       requires_grad=config.learn_lambda)
        self.log_scale = nn.Parameter(torch.tensor(float(config.scale_init)).log(),
                                      requires_grad=config.learn_scale)

    def solve(self, support: torch.Tensor, labels: torch.Tensor, n_ways: int) -> torch.Tensor:
        """Ridge weights [B, d(+1), n_ways] from support embeddings ``support`` [B, n, d] and their
        ``labels`` [B, n] in ``0..n_ways-1`` (regressed as one-hot rows)."""
        onehot = F.one_hot(labels, n_ways).to(support.dtype)
        lam = self.log_lambda.exp().to(support.dtype)
        return ridge_weights(support, onehot, lam, bias_feature=self.config.bias_feature)

    def scores(self, queries: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.config.bias_feature:
            queries = torch.cat([queries, queries.new_ones(queries.shape[:-1] + (1,))], dim=-1)
        scale = self.log_scale.exp().to(queries.dtype)
        return scale * (queries @ weights)
