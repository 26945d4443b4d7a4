"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, 2019).

Like MAML, but only the linear head adapts in the inner loop; the backbone is a feature
extractor meta-learned through the outer loop. The backbone runs once per task (support and
query), so inner steps cost almost nothing. ``first_order=true`` treats the head's inner
gradients as constants.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..functional import TaskResult, batched_inner_loop, batched_task_loss, inner_loop, task_loss, task_metric
from ..types import TaskBatch
from .base import MetaOutput
from .common import (
    FastWeightAlgorithm,
    FastWeights,
    InnerLoopConfig,
    check_support,
    check_ways,
    functional_forward,
    oom_guard,
    run_meta_batch,
)

__all__ = ["ANIL", "ANILConfig"]

HEAD = ("head.weight", "head.bias")


def _head(params, features, step):
    return F.linear(features, params["head.weight"], params["head.bias"])


class ANILConfig(InnerLoopConfig):
    """Config of :class:`ANIL` (``algorithm: {name: anil}``): the inner-loop fields (for the head only,
    with more steps by default than MAML) plus ``first_order``."""

    name: Literal["anil"] = "anil"
    inner_steps: int = Field(5, ge=0, le=1000, description="head-only inner-loop steps during meta-training")
    eval_inner_steps: int = Field(10, ge=0, le=10000, description="head-only inner-loop steps at evaluation")
    first_order: bool = Field(False, description="treat the head's inner gradients as constants")


class ANIL(FastWeightAlgorithm):
    """ANIL: MAML whose inner loop adapts only the linear head (see the module docstring).

    Built as ``ANIL(config, backbone, n_outputs, task_kind)`` (see :class:`Algorithm`): ``config`` an
    :class:`ANILConfig`, ``n_outputs`` the size of the linear head put on ``backbone`` (classes per task,
    which every task must have; target dimensions for regression), ``task_kind`` classification or regression.
    ``adapt`` returns :class:`FastWeights` holding the adapted head (``head.weight``, ``head.bias``).
    """

    name = "anil"
    Config = ANILConfig
    stat_prefix = ""

    def stat_steps(self, config: ANILConfig) -> int:
        """One set of BatchNorm running statistics whatever ``config`` says: the backbone runs once per task."""
        return 1

    def _features(self, module: nn.Module, params, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(module.backbone, params, x, self.stats, 0)

    def _backbone_params(self, main) -> dict:
        return {n[len("backbone."):]: p for n, p in main.items() if n.startswith("backbone.")}

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int,
              steps: int | None = None) -> FastWeights:
        """Fine-tune the head on the support set's features (``support_x``, ``support_y``, ``n_ways`` as
        in :meth:`Algorithm.adapt`; the backbone is not changed) with ``steps`` SGD steps of size
        ``inner_lr`` (default: ``eval_inner_steps``); returns the :class:`FastWeights` of the head."""
        check_support("ANIL.adapt", support_x, support_y, n_ways, self.task_kind)
        check_ways("ANIL.adapt", n_ways, self.n_outputs, self.task_kind)
        cfg = self.config
        n_steps = cfg.eval_inner_steps if steps is None else int(steps)
        with torch.no_grad():
            feats = self._features(self, self._backbone_params(dict(self.named_parameters())), support_x)
        with torch.enable_grad():
            head = {n: getattr(self.head, n[5:]).detach().requires_grad_() for n in HEAD}
            fast = inner_loop(_head, head, feats, support_y, kind=self.task_kind, steps=n_steps,
                              lr=cfg.inner_lr, adapt=HEAD, create_graph=False)
        return FastWeights({n: t.detach() for n, t in fast.items()}, n_steps)

    def predict(self, adapted: FastWeights, x: torch.Tensor) -> torch.Tensor:
        feats = self._features(self, self._backbone_params(dict(self.named_parameters())), x)
        return _head(adapted.params, feats, adapted.steps)

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        check_ways("ANIL.meta_loss", batch.n_ways, self.n_outputs, self.task_kind)
        cfg, kind = self.config, self.task_kind
        main = {n: p for n, p in self.named_parameters() if p.requires_grad}
        names = list(main)
        bb = self._backbone_params(main)
        b = batch.meta_batch_size
        if self.executor.resolve(batch.support_x.device)[0] == "vmap":
            with oom_guard("ANIL", not cfg.first_order, vmap=True):
                s, q = batch.support_x.shape[1], batch.query_x.shape[1]
                if self.executor.vmap_on_cpu:  # no BatchNorm: one backbone pass over every image
                    feats = self.backbone(torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)).unflatten(0, (b, s + q))
                else:  # BatchNorm (batch statistics): each task's support and query sets on their own, as the loop
                    feat = torch.func.vmap(lambda x: self._features(self, bb, x))
                    feats = torch.cat([feat(batch.support_x), feat(batch.query_x)], 1)
                fast = batched_inner_loop(_head, {n: main[n].expand(b, *main[n].shape) for n in HEAD}, feats[:, :s],
                                          batch.support_y, kind=kind, steps=cfg.inner_steps, lr=cfg.inner_lr, adapt=HEAD,
                                          create_graph=not cfg.first_order)
                losses, metrics = batched_task_loss(_head, fast, feats[:, s:], batch.query_y, cfg.inner_steps, kind)
                return MetaOutput(losses.mean(), metrics.mean())

        def one_task(module: nn.Module, i: int) -> TaskResult:
            fs = self._features(module, bb, batch.support_x[i])
            fq = self._features(module, bb, batch.query_x[i])
            head = {n: main[n] for n in HEAD}
            fast = inner_loop(_head, head, fs, batch.support_y[i], kind=kind, steps=cfg.inner_steps,
                              lr=cfg.inner_lr, adapt=HEAD, create_graph=not cfg.first_order)
            out = _head(fast, fq, cfg.inner_steps)
            loss = task_loss(out, batch.query_y[i], kind) / b
            grads = torch.autograd.grad(loss, [main[n] for n in names], allow_unused=True)
            return TaskResult(loss.detach(), task_metric(out, batch.query_y[i], kind) / b, list(grads))

        return run_meta_batch(self, "ANIL", one_task, batch, main, names, not cfg.first_order)
