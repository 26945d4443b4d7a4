"""Reptile (Nichol, Achiam & Schulman, 2018): first-order meta-learning by interpolation.

For each task, ``inner_steps`` SGD steps on all of the task's training examples (support and
query together: during meta-training both are labelled data of the same task) give adapted
weights ``theta~``; the meta-gradient is ``theta - mean(theta~)``. With the Trainer's SGD
optimizer (``train.optimizer=sgd``, ``train.momentum=0``) and ``train.meta_lr = epsilon`` the
outer step is the paper's interpolation ``theta + epsilon * (mean(theta~) - theta)``; Adam on
this direction is the paper's other variant. At evaluation the model is fine-tuned on the
support set for ``eval_inner_steps`` steps.

The inner optimiser is plain full-batch SGD by default. ``inner_optimizer: adam`` with
``inner_batch_size`` is the paper's (supervised-reptile: Adam with beta1 = 0, mini-batches of the
task's examples). As in that code, Adam's moments are *not* reset between tasks: they are part of
the model (buffers, saved in checkpoints), every task of a meta-batch starts from them, and after
the meta-batch they become the mean of the tasks' final moments (the reference code ran the tasks
one after another, each continuing the last one's moments; the mean does not depend on the order
in which threads or ranks finish). Without that carried-over second moment the first steps of
every task are sign steps of size ``inner_lr`` for every weight, and Omniglot 5-way 1-shot
validation accuracy fell while training (72.6% after 2,500 meta-steps, 69.7% after 5,000); with
them it rose (86.7% after 1,250, 92.3% after 5,000). Adaptation at evaluation
starts from the stored moments and leaves them unchanged. Mini-batches are drawn in a fixed
class-stratified order (the j-th example of every class, then the (j+1)-th, ...; consecutive
chunks, cycling) instead of a random shuffle, so every mini-batch is balanced and a run needs no
extra random state to resume exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..functional import TaskResult, batched_inner_loop, batched_task_loss, gradient_as_loss, task_loss, task_metric
from ..types import TaskBatch
from .base import MetaOutput
from .common import (
    FastWeightAlgorithm,
    FastWeights,
    InnerLoopConfig,
    check_support,
    check_ways,
    forward_with,
    oom_guard,
    run_meta_batch,
    trainable_names,
)

__all__ = ["Reptile", "ReptileConfig"]


class ReptileConfig(InnerLoopConfig):
    """Config of :class:`Reptile` (``algorithm: {name: reptile}``): the inner-loop fields plus the
    inner optimiser (SGD or Adam) and its mini-batch sizes."""

    name: Literal["reptile"] = "reptile"
    inner_lr: float = Field(0.1, gt=0.0, le=100.0, description="step size of the inner optimiser")
    inner_steps: int = Field(5, ge=1, le=1000, description="inner-loop steps on each training task")
    eval_inner_steps: int = Field(50, ge=0, le=10000, description="fine-tuning steps on the support set at evaluation")
    inner_optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd, or adam (the paper's; its moments carry over from meta-batch to meta-batch)")
    inner_batch_size: int | None = Field(
        None, ge=1, description="examples per inner step while meta-training, in class-stratified mini-batches "
                                "(None: all of the task's examples every step)")
    eval_batch_size: int | None = Field(
        None, ge=1, description="examples per fine-tuning step at evaluation (None: the whole support set)")
    adam_beta1: float = Field(0.0, ge=0.0, lt=1.0, description="Adam beta1 of the inner optimiser (paper: 0)")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2 of the inner optimiser")
    adam_eps: float = Field(1e-8, gt=0.0, description="Adam epsilon of the inner optimiser")

    @property
    def plain_sgd(self) -> bool:
        """Full-batch SGD (the vectorised path can run it)."""
        return self.inner_optimizer == "sgd" and self.inner_batch_size is None


def stratified_order(y: torch.Tensor, kind: str) -> torch.Tensor:
    """Example indices in class-stratified order: the first example of every class, then the
    second of every class, ... (classes in label order; regression: the given order)."""
    if kind != "classification" or y.numel() == 0:
        return torch.arange(y.shape[0], device=y.device)
    n_classes = int(y.max()) + 1
    onehot = torch.nn.functional.one_hot(y, n_classes)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # position of each example within its class
    return torch.argsort(rank * n_classes + y, stable=True)


def minibatch(order: torch.Tensor, step: int, size: int | None) -> torch.Tensor | None:
    """Indices of the ``step``-th mini-batch: consecutive chunks of ``order``, cycling (None: all)."""
    n = order.shape[0]
    if size is None or size >= n:
        return None
    return order[(step * size + torch.arange(size, device=order.device)) % n]


class Reptile(FastWeightAlgorithm):
    """Reptile: first-order meta-learning by moving towards the tasks' adapted weights (see the
    module docstring).

    Built as ``Reptile(config, backbone, n_outputs, task_kind)`` (see :class:`Algorithm`): ``config`` a
    :class:`ReptileConfig`, ``n_outputs`` the size of the linear head put on ``backbone`` (classes per task,
    which every task must have; target dimensions for regression), ``task_kind`` classification or regression.
    ``meta_loss`` returns a loss whose gradient is the Reptile direction ``theta - mean(theta~)``. ``adapt``
    returns :class:`FastWeights`; ``predict`` runs the network with them.
    """

    name = "reptile"
    Config = ReptileConfig

    def __init__(self, config: ReptileConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        if not config.plain_sgd:  # per-task optimiser state and mini-batches: no vectorised path
            if config.execution == "vmap":
                raise ConfigError(
                    "Config: algorithm.execution 'vmap' must be used with Reptile's full-batch SGD inner loop; got "
                    f"inner_optimizer={config.inner_optimizer!r}, inner_batch_size={config.inner_batch_size}. "
                    "Use execution=auto, threads or loop.")
            self.executor.vmap_ok = False
        if config.inner_optimizer == "adam":  # moments shared by all tasks, carried across meta-batches
            self.inner_adam = nn.Module()
            for n, p in self.named_parameters():
                if p.requires_grad:
                    key = n.replace(".", "__")
                    self.inner_adam.register_buffer(f"m__{key}", torch.zeros_like(p.detach()))
                    self.inner_adam.register_buffer(f"v__{key}", torch.zeros_like(p.detach()))
            self.inner_adam.register_buffer("t", torch.zeros((), dtype=torch.long))

    def _moments(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """The shared Adam moments (by parameter name) and step count."""
        st = self.inner_adam
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        m = {n: getattr(st, "m__" + n.replace(".", "__")) for n in names}
        v = {n: getattr(st, "v__" + n.replace(".", "__")) for n in names}
        return m, v, int(st.t)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_ways: int,
              steps: int | None = None) -> FastWeights:
        """Fine-tune every weight on the support set (``support_x``, ``support_y``, ``n_ways`` as in
        :meth:`Algorithm.adapt`) for ``steps`` inner steps (default: ``eval_inner_steps``) with the
        inner optimiser, in mini-batches of ``eval_batch_size``; returns the :class:`FastWeights`."""
        check_support("Reptile.adapt", support_x, support_y, n_ways, self.task_kind)
        check_ways("Reptile.adapt", n_ways, self.n_outputs, self.task_kind)
        n_steps = self.config.eval_inner_steps if steps is None else int(steps)
        fast, _ = self._fit(self, support_x, support_y, n_steps, self.config.eval_batch_size)
        return FastWeights(fast, n_steps)

    def _fit(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
             batch_size: int | None) -> tuple[dict[str, torch.Tensor], tuple[dict, dict] | None]:
        """``steps`` steps of the inner optimiser from the model's weights on ``(x, y)``, run on
        ``module`` (the model or a thread's replica); returns detached fast weights and, for
        Adam, the final moments (the shared ones are not modified here)."""
        cfg, kind = self.config, self.task_kind
        fwd = forward_with(self, module)
        names = trainable_names(self)
        params = {n: p.detach() for n, p in self.named_parameters() if n in names}
        order = stratified_order(y, kind)
        adam = cfg.inner_optimizer == "adam"
        m, v, t0 = self._moments() if adam else ({}, {}, 0)
        b1, b2 = cfg.adam_beta1, cfg.adam_beta2
        for step in range(steps):
            idx = minibatch(order, step, batch_size)
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            with torch.enable_grad():
                live = {n: p.requires_grad_() for n, p in ((n, p.detach()) for n, p in params.items())}
                loss = task_loss(fwd(live, xb, step), yb, kind)
                grads = torch.autograd.grad(loss, [live[n] for n in names])
            with torch.no_grad():
                new = {}
                for n, g in zip(names, grads):
                    if adam:
                        m[n] = b1 * m[n] + (1 - b1) * g
                        v[n] = b2 * v[n] + (1 - b2) * g * g
                        m_hat = m[n] / (1 - b1 ** (t0 + step + 1))
                        v_hat = v[n] / (1 - b2 ** (t0 + step + 1))
                        new[n] = params[n] - cfg.inner_lr * m_hat / (v_hat.sqrt() + cfg.adam_eps)
                    else:
                        new[n] = params[n] - cfg.inner_lr * g
                params = new
        return params, ((m, v) if adam else None)

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
            fast, moments = self._fit(module, x, y, cfg.inner_steps, cfg.inner_batch_size)
            with torch.no_grad():
                out = forward_with(self, module)(fast, x, cfg.inner_steps)
                loss = task_loss(out, y, kind) / b
                grads = [(main[n].detach() - fast[n]) / b for n in names]
                if moments is not None:  # summed over tasks by the executor with the gradients: their mean
                    grads += [moments[0][n] / b for n in names] + [moments[1][n] / b for n in names]
            return TaskResult(loss, task_metric(out, y, kind) / b, grads)

        if cfg.inner_optimizer != "adam":
            return run_meta_batch(self, "Reptile", one_task, batch, main, names, False)
        res = self.executor.run(self, one_task, b, batch.support_x.device)
        k = len(names)
        if self.training:  # the shared moments <- the mean of the tasks' final moments
            m, v, _ = self._moments()
            with torch.no_grad():
                for j, n in enumerate(names):
                    m[n].copy_(res.grads[k + j])
                    v[n].copy_(res.grads[2 * k + j])
                self.inner_adam.t.add_(cfg.inner_steps)
        return MetaOutput(gradient_as_loss(res.loss, [main[n] for n in names], res.grads[:k]), res.metric)
