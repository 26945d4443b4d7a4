"""Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML with a learned step size for every parameter.

The inner update is ``theta - alpha * grad`` where ``alpha`` has the shape of ``theta`` and is
meta-learned with it (initialised to ``inner_lr``); one inner step is the paper's setting.
The step sizes get a meta-gradient in first-order mode too (the fast weights depend on them
directly).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..types import TaskBatch
from .base import MetaOutput
from .common import (FastWeightAlgorithm, FastWeights, InnerLoopConfig, adapt_fast_weights,
                     fast_weight_meta_loss, forward_with)

__all__ = ["MetaSGD", "MetaSGDConfig"]


class MetaSGDConfig(InnerLoopConfig):
    """Config of :class:`MetaSGD` (``algorithm: {name: metasgd}``): the inner-loop fields, ``inner_lr``
    being the initial value of the learned step sizes, plus ``first_order``."""

    name: Literal["metasgd"] = "metasgd"
    inner_lr: float = Field(0.4, gt=0.0, le=100.0, description="initial value of every learned step size")
    eval_inner_steps: int = Field(1, ge=0, le=1000, description="inner-loop steps when adapting at evaluation")
    first_order: bool = Field(False, description="treat inner gradients as constants (step sizes still learn)")


def _key(name: str) -> str:
    return name.replace(".", "__")


class MetaSGD(FastWeightAlgorithm):
    """Meta-SGD: MAML with a meta-learned step size per weight (see the module docstring).

    Built as ``MetaSGD(config, backbone, n_outputs, task_kind)`` (see :class:`Algorithm`): ``config`` a
    :class:`MetaSGDConfig`, ``n_outputs`` the size of the linear head put on ``backbone`` (classes per task,
    which every task must have; target dimensions for regression), ``task_kind`` classification or regression.
    The step sizes are the ``step_sizes`` parameters. ``adapt`` returns :class:`FastWeights`; ``predict`` runs
    the network with them.
    """

    name = "metasgd"
    Config = MetaSGDConfig

    def __init__(self, config: MetaSGDConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        self._weights = [n for n, p in self.named_parameters() if p.requires_grad]
        self.step_sizes = nn.ParameterDict({
            _key(n): nn.Parameter(torch.full_like(p, config.inner_lr)) for n, p in self.named_parameters()
            if n in self._weights
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _lrs(self) -> dict[str, torch.Tensor]:
        return {n: self.step_sizes[_key(n)] for n in self._weights}

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int,
              steps: int | None = None) -> FastWeights:
        """Fine-tune every weight on the support set (``support_x``, ``support_y``, ``n_ways`` as in
        :meth:`Algorithm.adapt`) with ``steps`` inner steps at the learned step sizes (default:
        ``eval_inner_steps``); returns the :class:`FastWeights`."""
        lrs = {n: t.detach() for n, t in self._lrs().items()}
        return adapt_fast_weights(self, "MetaSGD.adapt", support_x, support_y, n_ways, steps, self._weights, lrs)

    def predict(self, adapted: FastWeights, x: torch.Tensor) -> torch.Tensor:
        return forward_with(self, self)(adapted.params, x, adapted.steps)

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        return fast_weight_meta_loss(self, "MetaSGD", batch, self._weights, self._lrs(), self.config.first_order)
