"""Pure helpers for gradient-based meta-learning over a ``dict[str, Tensor]`` of parameters.

- :func:`task_loss`: cross-entropy for classification, mean squared error for regression.
- :func:`inner_loop`: plain SGD steps on a support set with ``torch.func.functional_call``;
  ``create_graph=True`` keeps the graph for second-order meta-gradients.
- :class:`TaskExecutor`: runs a per-task function over a meta-batch and sums the gradients it
  returns, either in one loop or (on CPU) on several threads, one task partition each. The
  reduction order is fixed, so a run is reproducible for a given thread count.
- :func:`gradient_as_loss`: a scalar whose value is the meta-loss and whose gradient with
  respect to the parameters is a gradient computed elsewhere, so a Trainer can call
  ``loss.backward()`` whatever way an algorithm computed its meta-gradient.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Params",
    "TaskExecutor",
    "TaskResult",
    "batched_inner_loop",
    "batched_task_loss",
    "gradient_as_loss",
    "inner_loop",
    "sgd_step",
    "task_loss",
    "task_metric",
]

Params = dict[str, torch.Tensor]
TaskKind = Literal["classification", "regression"]


def task_loss(output: torch.Tensor, target: torch.Tensor, kind: TaskKind) -> torch.Tensor:
    """The differentiable task loss of ``output`` against ``target``: mean cross-entropy when ``kind``
    is ``"classification"`` (``output`` are logits ``[n, n_ways]``, ``target`` class indices ``[n]``),
    mean squared error when it is ``"regression"`` (same shapes). Returns a scalar tensor.

    >>> import torch
    >>> round(task_loss(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), "classification").item(), 4)
    0.6931
    >>> task_loss(torch.ones(3, 1), torch.zeros(3, 1), "regression").item()
    1.0
    """
    if kind == "regression":
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


@torch.no_grad()
def task_metric(output: torch.Tensor, target: torch.Tensor, kind: TaskKind) -> torch.Tensor:
    """The metric reported for a task, as a scalar tensor without gradient: accuracy (fraction of
    ``output.argmax(-1) == target``) when ``kind`` is ``"classification"``, mean squared error when it
    is ``"regression"``. ``output`` and ``target`` are as for :func:`task_loss`.

    >>> import torch
    >>> task_metric(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), "classification").item()
    0.5
    """
    if kind == "regression":
        return F.mse_loss(output, target)
    return (output.argmax(-1) == target).float().mean()


def sgd_step(params: Params, grads: Mapping[str, torch.Tensor],
             lr: float | Mapping[str, torch.Tensor]) -> Params:
    """``params - lr * grads`` for the names in ``grads``; ``lr`` is a float or a per-parameter
    tensor mapping (Meta-SGD). Other entries are passed through unchanged. ``params`` is not
    modified; returns a new dict.

    >>> import torch
    >>> sgd_step({"w": torch.tensor([1.0]), "b": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}, lr=0.5)
    {'w': tensor([0.]), 'b': tensor([0.])}
    """
    out = dict(params)
    for name, g in grads.items():
        step = lr[name] * g if isinstance(lr, Mapping) else lr * g
        out[name] = params[name] - step
    return out


def inner_loop(forward: Callable[[Params, torch.Tensor, int], torch.Tensor], params: Params,
               x: torch.Tensor, y: torch.Tensor, *, kind: TaskKind, steps: int,
               lr: float | Mapping[str, torch.Tensor], adapt: Sequence[str],
               create_graph: bool) -> Params:
    """``steps`` gradient steps on ``(x, y)`` for the parameters named in ``adapt``.

    ``forward(params, x, step)`` returns the model output with ``params``; ``step`` lets a model
    keep per-step state (e.g. BatchNorm statistics). ``kind``: the loss of :func:`task_loss`;
    ``lr``: the step size, a float or a per-parameter mapping (see :func:`sgd_step`). With
    ``create_graph=False`` the gradients are constants, so the meta-gradient through the result is
    the first-order approximation. Returns the adapted parameters (a new dict; parameters not in
    ``adapt`` are the given tensors).

    >>> import torch
    >>> params = {"w": torch.zeros(1, requires_grad=True)}
    >>> x, y = torch.ones(4, 1), torch.full((4, 1), 2.0)
    >>> fast = inner_loop(lambda p, x, step: x * p["w"], params, x, y, kind="regression", steps=3, lr=0.25,
    ...                   adapt=["w"], create_graph=False)
    >>> round(fast["w"].item(), 4)
    1.75
    """
    for step in range(steps):
        loss = task_loss(forward(params, x, step), y, kind)
        grads = torch.autograd.grad(loss, [params[n] for n in adapt], create_graph=create_graph)
        params = sgd_step(params, dict(zip(adapt, grads)), lr)
    return params


def batched_inner_loop(forward: Callable[[Params, torch.Tensor, int], torch.Tensor], params: Params,
                       x: torch.Tensor, y: torch.Tensor, *, kind: TaskKind, steps: int,
                       lr: float | Mapping[str, torch.Tensor], adapt: Sequence[str],
                       create_graph: bool) -> Params:
    """:func:`inner_loop` for a whole meta-batch at once with ``torch.func.vmap``.

    ``params`` carry a leading task dimension (e.g. ``p.expand(B, *p.shape)``: no copies);
    ``forward`` sees one task's parameters. The gradient of the summed task losses with respect
    to the batched parameters is every task's own gradient, in one backward pass. BatchNorm
    with batch statistics is exact here (each task is normalised with its own images; float64
    tests against the loop and finite differences, torch 2.13); BatchNorm that updates running
    statistics in place is not supported under vmap. ``x`` ``[B, n, ...]`` and ``y`` ``[B, n, ...]``
    hold one support set per task; ``kind``, ``steps``, ``lr``, ``adapt`` and ``create_graph`` are as
    for :func:`inner_loop`. Returns the adapted batched parameters.
    """
    for step in range(steps):
        def one(p, xi, yi, step=step):
            return task_loss(forward(p, xi, step), yi, kind)

        losses = torch.func.vmap(one)(params, x, y)
        grads = torch.autograd.grad(losses.sum(), [params[n] for n in adapt], create_graph=create_graph)
        params = sgd_step(params, dict(zip(adapt, grads)), lr)
    return params


def batched_task_loss(forward: Callable[[Params, torch.Tensor, int], torch.Tensor], params: Params,
                      x: torch.Tensor, y: torch.Tensor, step: int, kind: TaskKind):
    """Per-task query losses and metrics ``[B]`` of batched parameters (see :func:`batched_inner_loop`).

    ``forward(params, x, step)`` computes one task's output; ``params`` carry a leading task dimension;
    ``x``, ``y``: the query sets ``[B, n, ...]``; ``step``: passed to ``forward``; ``kind``: as for
    :func:`task_loss`. Returns ``(losses, metrics)``: the losses keep their graph, the metrics have none.
    """
    out = torch.func.vmap(lambda p, xi: forward(p, xi, step))(params, x)
    losses = torch.func.vmap(lambda o, yi: task_loss(o, yi, kind))(out, y)
    with torch.no_grad():
        metrics = torch.func.vmap(lambda o, yi: task_metric(o, yi, kind))(out.detach(), y)
    return losses, metrics


def gradient_as_loss(value: torch.Tensor, params: Sequence[torch.Tensor],
                     grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. ``params`` is exactly ``grads``.

    ``d/dp sum(p * g) = g`` holds bit for bit (the backward of a product by a constant is that
    constant times 1.0), so ``loss.backward()`` writes the given gradients. ``value``: the meta-loss
    to report (detached); ``params``: the meta-parameters; ``grads``: one gradient per parameter,
    ``None`` for a parameter that gets none.

    >>> import torch
    >>> p = torch.ones(2, requires_grad=True)
    >>> loss = gradient_as_loss(torch.tensor(3.0), [p], [torch.tensor([0.5, -1.0])])
    >>> loss.backward()
    >>> loss.item(), p.grad.tolist()
    (3.0, [0.5, -1.0])
    """
    total = value.detach().clone()
    for p, g in zip(params, grads):
        if g is not None:
            term = (p * g.detach()).sum()
            total = total + (term - term.detach())
    return total


@dataclass
class TaskResult:
    """What the per-task function given to :meth:`TaskExecutor.run` returns, and what ``run`` returns
    summed over the tasks: ``loss``: the task's (scalar, detached) loss; ``metric``: its (scalar,
    detached) metric; ``grads``: one gradient per meta-parameter, already scaled by the caller
    (``None`` for a parameter without one)."""

    loss: torch.Tensor  # scalar, detached
    metric: torch.Tensor  # scalar, detached
    grads: list[torch.Tensor | None]  # one per meta-parameter (already scaled by the caller)


def _add(acc: list, grads: list) -> list:
    if acc is None:
        return [None if g is None else g.clone() for g in grads]
    for i, g in enumerate(grads):
        if g is not None:
            acc[i] = g.clone() if acc[i] is None else acc[i].add_(g)
    return acc


class TaskExecutor:
    """Runs ``fn(module, task_index) -> TaskResult`` over a meta-batch and sums the results.

    ``strategy``: ``loop`` (one task after another), ``threads`` (tasks ``t, t + T, ...`` on
    thread ``t``, each with its own replica of the module and one intra-op thread: small
    per-task convolutions use two cores better side by side than split in two), ``vmap`` (all
    tasks in one vectorised pass; the algorithm runs it, see :func:`batched_inner_loop`), or
    ``auto``, chosen per device from measurements (docs/benchmarks.md sections 3 and 5):
    ``vmap`` where it is exact (``vmap_ok``) and either the device is not a CPU (on a GPU one
    launch for all tasks beats a launch-bound loop) or the model has no BatchNorm
    (``vmap_on_cpu``: small MLPs); else ``threads`` on a CPU with more than one torch thread
    (vmap with BatchNorm was 2.7-3x slower there than a loop); else ``loop``. Each task's
    graph is freed as soon as its gradients are taken, so memory does not grow with the
    meta-batch (except under vmap, which holds the whole meta-batch's graph at once).

    ``threads``: the number of threads for ``threads`` (default: torch's intra-op thread count, at
    most the CPU count). ``vmap_ok``: whether the algorithm's batched path is exact for its model;
    ``vmap_on_cpu``: whether ``auto`` picks ``vmap`` on a CPU too (default: ``vmap_ok``).
    Deep copies and pickles keep these settings, not the thread pool or the replicas.
    """

    def __init__(self, strategy: Literal["auto", "loop", "threads", "vmap"] = "auto", threads: int | None = None,
                 vmap_ok: bool = False, vmap_on_cpu: bool | None = None) -> None:
        self.strategy = strategy
        self.threads = threads
        self.vmap_ok = vmap_ok
        self.vmap_on_cpu = vmap_ok if vmap_on_cpu is None else vmap_on_cpu
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._replicas: dict[int, nn.Module] = {}

    def resolve(self, device: torch.device) -> tuple[str, int]:
        """The strategy used on ``device`` and its thread count: ``("vmap", 1)``, ``("loop", 1)`` or
        ``("threads", n)``, by the rules in the class docstring."""
        if self.strategy == "vmap" or (self.strategy == "auto" and self.vmap_ok
                                       and (device.type != "cpu" or self.vmap_on_cpu)):
            return "vmap", 1
        n = self.threads or min(torch.get_num_threads(), os.cpu_count() or 1)
        if self.strategy == "loop" or device.type != "cpu" or n < 2:
            return "loop", 1
        return "threads", n

    def __getstate__(self):  # deepcopy/pickle: no pool, no replicas
        return {"strategy": self.strategy, "threads": self.threads, "vmap_ok": self.vmap_ok,
                "vmap_on_cpu": self.vmap_on_cpu}

    def __setstate__(self, state):
        self.__init__(state["strategy"], state["threads"], state["vmap_ok"], state.get("vmap_on_cpu"))

    def _replica(self, module: nn.Module, slot: int) -> nn.Module:
        rep = self._replicas.get(slot)
        if rep is None or getattr(rep, "_source_id", None) != id(module):
            rep = copy.deepcopy(module)
            rep._source_id = id(module)
            self._replicas[slot] = rep
        rep.train(module.training)
        return rep

    def run(self, module: nn.Module, fn: Callable[[nn.Module, int], TaskResult], n_tasks: int,
            device: torch.device) -> TaskResult:
        """Call ``fn(module, i)`` for every task index ``i`` in ``range(n_tasks)`` and return the summed
        :class:`TaskResult` (losses, metrics and gradients added in a fixed order). ``device`` picks
        the strategy (:meth:`resolve`); with ``loop`` ``fn`` gets ``module`` itself, with ``threads`` each
        thread gets its own deep copy of it (kept between calls, in ``module``'s train/eval mode), so
        that module state such as BatchNorm buffers is not shared between threads. The ``vmap`` strategy
        is the caller's to run: algorithms check :meth:`resolve` first (``run`` would run the tasks on
        one worker thread)."""
        strategy, n = self.resolve(device)
        if strategy == "loop" or n_tasks == 1:
            return self._serial(module, fn, range(n_tasks))
        n = min(n, n_tasks)
        if self._pool is None or self._pool._max_workers != n:
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="metafit-task")
            self._replicas.clear()
        parts = [range(t, n_tasks, n) for t in range(n)]
        futures = [self._pool.submit(self._worker, self._replica(module, t), fn, part)
                   for t, part in enumerate(parts)]
        results = [f.result() for f in futures]  # re-raises a worker's exception here
        out = results[0]
        for r in results[1:]:
            out = TaskResult(out.loss + r.loss, out.metric + r.metric, _add(out.grads, r.grads))
        return out

    def _worker(self, replica: nn.Module, fn, part) -> TaskResult:
        if not getattr(self._local, "single", False):
            torch.set_num_threads(1)  # per OS thread with OpenMP: the caller keeps its setting
            self._local.single = True
        return self._serial(replica, fn, part)

    @staticmethod
    def _serial(module: nn.Module, fn, part) -> TaskResult:
        loss = metric = None
        grads = None
        for i in part:
            r = fn(module, i)
            loss = r.loss if loss is None else loss + r.loss
            metric = r.metric if metric is None else metric + r.metric
            grads = _add(grads, r.grads)
        return TaskResult(loss, metric, grads)
