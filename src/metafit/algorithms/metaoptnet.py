"""MetaOptNet with the multi-class SVM head (Lee, Maji, Ravichandran & Soatto, CVPR 2019).

Each task's support embeddings train a linear Crammer-Singer SVM exactly (a convex QP); the query
logits are the SVM scores times a learned scale. The backbone is meta-learned through the QP's
solution by implicit differentiation (:func:`metafit.nn.solvers.svm_crammer_singer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..nn.solvers import svm_crammer_singer
from .base import AlgorithmConfig
from .heads import HeadWeights, LinearSolverHead

__all__ = ["MetaOptNetSVM", "SVMConfig", "SVMWeights"]


class SVMConfig(AlgorithmConfig):
    """Config of :class:`MetaOptNetSVM` (``algorithm: {name: svm}``): the SVM's box constraint and ridge,
    the solver's budget, the logit scale and the label smoothing."""

    name: Literal["svm"] = "svm"
    C: float = Field(0.1, gt=0.0, description="SVM box constraint: cost of a margin violation (MetaOptNet: 0.1)")
    ridge: float = Field(
        1.0, ge=0.0,
        description="ridge added to the dual's kernel, ridge * I (MetaOptNet: 1.0); 0 is the plain SVM "
                    "and needs more feature dimensions than support examples")
    max_iter: int = Field(1000, ge=1, le=100000, description="ADMM iterations at most per solve")
    tol: float = Field(
        1e-4, gt=0.0, lt=1.0,
        description="ADMM residual tolerance; the answer is polished to the exact optimum afterwards, "
                    "so this only needs to identify the support vectors")
    learn_scale: bool = Field(True, description="learn the logit scale (MetaOptNet does)")
    scale_init: float = Field(1.0, gt=0.0, description="initial logit scale")
    label_smoothing: float = Field(
        0.1, ge=0.0, lt=1.0, description="label smoothing of the meta-training loss (MetaOptNet: 0.1)")


@dataclass(frozen=True)
class SVMWeights(HeadWeights):
    """MetaOptNet-SVM's adapted task: ``weights``, the primal SVM weights [d, n_ways]."""


class MetaOptNetSVM(LinearSolverHead):
    """MetaOptNet-SVM (Lee et al., "Meta-Learning with Differentiable Convex Optimization", 2019).

    Per task, the support embeddings ``x_i`` with labels ``y_i`` give the Crammer-Singer SVM dual

        min_alpha 1/2 tr(alpha^T (X X^T + ridge I) alpha) - sum_i alpha[i, y_i]
        s.t. alpha[i, k] <= C 1[k == y_i],  sum_k alpha[i, k] = 0,

    whose primal weights ``W = X^T alpha`` [d, n_ways] score a query ``q`` as
    ``logits = scale * q W``. Defaults follow the paper's SVM-CS head: C = 0.1, ridge = 1.0 (the
    1.0 * I MetaOptNet adds to its block kernel), a learned logit scale initialised at 1.0, and
    label smoothing 0.1 in the meta-training loss only. The QP is solved to its exact optimum
    (ADMM, then an active-set polish) and differentiated implicitly through the KKT system, see
    :func:`metafit.nn.solvers.svm_crammer_singer`. ``adapt`` stores ``W``, so ``predict`` needs
    no support set.

    Built as ``MetaOptNetSVM(config, backbone, n_outputs, task_kind)`` (see :class:`Algorithm`):
    ``config`` an :class:`SVMConfig`; ``n_outputs`` is not used (any number of classes per task);
    classification only (``task_kind``). ``adapt`` returns :class:`SVMWeights`.
    """

    name = "svm"
    Config = SVMConfig
    adapted_type = SVMWeights

    def __init__(self, config: SVMConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        self.log_scale = nn.Parameter(torch.tensor(float(config.scale_init)).log(),
                                      requires_grad=config.learn_scale)

    def solve(self, support: torch.Tensor, labels: torch.Tensor, n_ways: int) -> torch.Tensor:
        """Primal SVM weights [B, d, n_ways] from support embeddings ``support`` [B, n, d] and their
        ``labels`` [B, n] in ``0..n_ways-1``."""
        cfg = self.config
        alpha = svm_crammer_singer(support, labels, n_ways, C=cfg.C, ridge=cfg.ridge,
                                   max_iter=cfg.max_iter, tol=cfg.tol)
        return support.transpose(-1, -2) @ alpha

    def scores(self, queries: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp().to(queries.dtype) * (queries @ weights)
