"""Reptile (Nichol, Achiam & Schulman, 2018): first-order meta-learning by interpolation.

For each task, ``inner_steps`` SGD steps on all of the task's training examples (support and
query together: during meta-training both are labelled data of the same task) give adapted
weights ``theta~``; the meta-gradient is ``theta - mean(theta~)``. With the Trainer's SGD
optimizer (``train.optimizer=sgd``, ``train.momentum=0``) and ``train.meta_lr = epsilon`` the
outer step is the paper's interpolation ``theta + epsilon * (mean(theta~) - theta)``; Adam on
this direction is the paper's other variant. At evaluation the model is fine-tuned on the
support set for ``eval_inner_steps`` steps.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..functional import TaskResult, batched_inner_loop, batched_task_loss, gradient_as_loss, task_loss, task_metric
from ..types import TaskBatch
from .base import Algorithm, MetaOutput
from .common import (
    FastWeights,
    InnerLoopConfig,
    adapt_fast_weights,
    check_ways,
    fit_fast_weights,
    forward_with,
    oom_guard,
    run_meta_batch,
    setup_fast_weight_model,
    trainable_names,
)

__all__ = ["Reptile", "ReptileConfig"]


class ReptileConfig(InnerLoopConfig):
    name: Literal["reptile"] = "reptile"
    inner_lr: float = Field(0.1, gt=0.0, le=100.0, description="inner-loop SGD step size")
    inner_steps: int = Field(5, ge=1, le=1000, description="inner-loop steps on each training task")
    eval_inner_steps: int = Field(50, ge=0, le=10000, description="fine-tuning steps on the support set at evaluation")


class Reptile(Algorithm):
    name = "reptile"
    Config = ReptileConfig
    task_kinds = ("classification", "regression")

    def __init__(self, config: ReptileConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        setup_fast_weight_model(self, config, backbone, config.inner_steps + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int,
              steps: int | None = None) -> FastWeights:
        """Fine-tune on the support set for ``steps`` inner steps (default: ``eval_inner_steps``)."""
        return adapt_fast_weights(self, "Reptile.adapt", support_x, support_y, n_ways, steps,
                                  trainable_names(self), self.config.inner_lr)

    def predict(self, adapted: FastWeights, x: torch.Tensor) -> torch.Tensor:
        return forward_with(self, self)(adapted.params, x, adapted.steps)

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        check_ways("Reptile.meta_loss", batch.n_ways, self.n_outputs, self.task_kind)
        cfg, kind = self.config, self.task_kind
        names = trainable_names(self)
        main = dict(self.named_parameters())
        b = batch.meta_batch_size
        if self.executor.resolve(batch.support_x.device)[0] == "vmap":
            with oom_guard("Reptile", False, vmap=True):
                x = torch.cat([batch.support_x, batch.query_x], 1)
                y = torch.cat([batch.support_y, batch.query_y], 1)
                fwd = forward_with(self, self)
                with torch.enable_grad():
                    start = {n: main[n].detach().expand(b, *main[n].shape).requires_grad_() for n in names}
                    fast = batched_inner_loop(fwd, start, x, y, kind=kind, steps=cfg.inner_steps, lr=cfg.inner_lr,
                                              adapt=names, create_graph=False)
                with torch.no_grad():
                    losses, metrics = batched_task_loss(fwd, {n: t.detach() for n, t in fast.items()}, x, y,
                                                        cfg.inner_steps, kind)
                    grads = [main[n].detach() - fast[n].detach().mean(0) for n in names]
                return MetaOutput(gradient_as_loss(losses.mean(), [main[n] for n in names], grads), metrics.mean())

        def one_task(module: nn.Module, i: int) -> TaskResult:
            x = torch.cat([batch.support_x[i], batch.query_x[i]])
            y = torch.cat([batch.support_y[i], batch.query_y[i]])
            fast = fit_fast_weights(self, module, x, y, cfg.inner_steps, names, cfg.inner_lr)
            with torch.no_grad():
                out = forward_with(self, module)(fast, x, cfg.inner_steps)
                loss = task_loss(out, y, kind) / b
                grads = [(main[n].detach() - fast[n]) / b for n in names]
            return TaskResult(loss, task_metric(out, y, kind) / b, grads)

        return run_meta_batch(self, "Reptile", one_task, batch, main, names, False)
