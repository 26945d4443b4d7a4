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
from torch import nn

from ..errors import TrainingError
from ..functional import (
    TaskResult,
    batched_inner_loop,
    batched_task_loss,
    gradient_as_loss,
    inner_loop,
    task_loss,
    task_metric,
)
from ..types import TaskBatch
from .base import Algorithm, MetaOutput
from .common import (
    OOM_HINT,
    FastWeights,
    InnerLoopConfig,
    StatBank,
    check_support,
    check_ways,
    executor_for,
    functional_forward,
    is_oom,
    prepare_batchnorm,
)

__all__ = ["MAML", "MAMLConfig"]


class MAMLConfig(InnerLoopConfig):
    name: Literal["maml"] = "maml"
    first_order: bool = Field(False, description="first-order approximation (FOMAML): no second derivatives")


class MAML(Algorithm):
    name = "maml"
    Config = MAMLConfig
    task_kinds = ("classification", "regression")

    def __init__(self, config: MAMLConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        self.head = nn.Linear(backbone.out_features, self.n_outputs)
        prepare_batchnorm(backbone, config.bn_mode)
        self.stats = StatBank(backbone, "backbone.", config.inner_steps + 1) if config.bn_mode == "per_step" else None
        self.executor = executor_for(config, backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def _fwd(self, module: nn.Module):
        return lambda params, x, step: functional_forward(module, params, x, self.stats, step)

    # -- adaptation -------------------------------------------------------------------------
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int,
              steps: int | None = None) -> FastWeights:
        """Fine-tune on the support set for ``steps`` inner steps (default: ``eval_inner_steps``)."""
        check_support("MAML.adapt", support_x, support_y, n_ways, self.task_kind)
        check_ways("MAML.adapt", n_ways, self.n_outputs, self.task_kind)
        cfg = self.config
        n_steps = cfg.eval_inner_steps if steps is None else int(steps)
        names = self._names()
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_() for n, p in self.named_parameters() if n in names}
            fast = inner_loop(self._fwd(self), params, support_x, support_y, kind=self.task_kind,
                              steps=n_steps, lr=cfg.inner_lr, adapt=names, create_graph=False)
        return FastWeights({n: t.detach() for n, t in fast.items()}, n_steps)

    def predict(self, adapted: FastWeights, x: torch.Tensor) -> torch.Tensor:
        return self._fwd(self)(adapted.params, x, adapted.steps)

    # -- meta-training ----------------------------------------------------------------------
    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        check_ways("MAML.meta_loss", batch.n_ways, self.n_outputs, self.task_kind)
        cfg, kind = self.config, self.task_kind
        names = self._names()
        main = dict(self.named_parameters())
        b = batch.meta_batch_size
        if self.executor.resolve(batch.support_x.device)[0] == "vmap":
            fwd = self._fwd(self)
            fast = batched_inner_loop(fwd, {n: main[n].expand(b, *main[n].shape) for n in names},
                                      batch.support_x, batch.support_y, kind=kind, steps=cfg.inner_steps,
                                      lr=cfg.inner_lr, adapt=names, create_graph=not cfg.first_order)
            losses, metrics = batched_task_loss(fwd, fast, batch.query_x, batch.query_y, cfg.inner_steps, kind)
            return MetaOutput(losses.mean(), metrics.mean())

        def one_task(module: nn.Module, i: int) -> TaskResult:
            fwd = self._fwd(module)
            params = {n: main[n] for n in names}
            fast = inner_loop(fwd, params, batch.support_x[i], batch.support_y[i], kind=kind,
                              steps=cfg.inner_steps, lr=cfg.inner_lr, adapt=names,
                              create_graph=not cfg.first_order)
            out = fwd(fast, batch.query_x[i], cfg.inner_steps)
            loss = task_loss(out, batch.query_y[i], kind) / b
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            return TaskResult(loss.detach(), task_metric(out, batch.query_y[i], kind) / b, list(grads))

        try:
            res = self.executor.run(self, one_task, b, batch.support_x.device)
        except RuntimeError as err:
            if is_oom(err) and not cfg.first_order:
                raise TrainingError(f"MAML: the meta-gradient must fit in memory; got {err}. {OOM_HINT}") from err
            raise
        return MetaOutput(gradient_as_loss(res.loss, [main[n] for n in names], res.grads), res.metric)
