"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, 2017), second and first order.

The meta-parameters are an initialisation of the whole network (backbone and linear head).
For each task, ``inner_steps`` SGD steps on the support set give fast weights; the meta-loss is
the query loss at those fast weights. ``first_order=true`` drops the second-order terms (the
inner gradients are treated as constants): the meta-gradient is the query gradient at the fast
weights, at a fraction of the memory.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..types import TaskBatch
from .base import MetaOutput
from .common import (FastWeightAlgorithm, FastWeights, InnerLoopConfig, adapt_fast_weights,
                     fast_weight_meta_loss, forward_with, trainable_names)

__all__ = ["MAML", "MAMLConfig"]


class MAMLConfig(InnerLoopConfig):
    """Config of :class:`MAML` (``algorithm: {name: maml}``): the inner-loop fields plus ``first_order``."""

    name: Literal["maml"] = "maml"
    first_order: bool = Field(False, description="first-order approximation (FOMAML): no second derivatives")


class MAML(FastWeightAlgorithm):
    """MAML: meta-learns the initialisation of the backbone and a linear head (see the module docstring).

    Built as ``MAML(config, backbone, n_outputs, task_kind)`` (see :class:`Algorithm`): ``config`` a
    :class:`MAMLConfig`, ``n_outputs`` the size of the linear head put on ``backbone`` (classes per task,
    which every task must have; target dimensions for regression), ``task_kind`` classification or regression.
    ``adapt`` returns :class:`FastWeights`; ``predict`` runs the network with them.
    """

    name = "maml"
    Config = MAMLConfig

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int,
              steps: int | None = None) -> FastWeights:
        """Fine-tune every weight on the support set (``support_x``, ``support_y``, ``n_ways`` as in
        :meth:`Algorithm.adapt`) with ``steps`` SGD steps of size ``inner_lr`` (default:
        ``eval_inner_steps``); returns the :class:`FastWeights`."""
        return adapt_fast_weights(self, "MAML.adapt", support_x, support_y, n_ways, steps, trainable_names(self),
                                  self.config.inner_lr)

    def predict(self, adapted: FastWeights, x: torch.Tensor) -> torch.Tensor:
        return forward_with(self, self)(adapted.params, x, adapted.steps)

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        return fast_weight_meta_loss(self, "MAML", batch, trainable_names(self), self.config.inner_lr,
                                     self.config.first_order)
