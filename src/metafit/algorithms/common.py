"""What the gradient-based meta-learners (MAML, ANIL, Meta-SGD, Reptile) share, as functions
and small classes they call: the inner-loop config fields, a linear head, BatchNorm handling
(transductive batch statistics or per-step running statistics) and a functional forward over a
parameter dict that works with any backbone ``nn.Module``."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError, TaskError, TrainingError
from ..functional import (
    Params,
    TaskExecutor,
    TaskKind,
    TaskResult,
    batched_inner_loop,
    batched_task_loss,
    gradient_as_loss,
    inner_loop,
    task_loss,
    task_metric,
)
from ..types import TaskBatch
from .base import Adapted, Algorithm, AlgorithmConfig, MetaOutput, check_task

__all__ = [
    "FastWeightAlgorithm",
    "FastWeights",
    "adapt_fast_weights",
    "fast_weight_meta_loss",
    "fit_fast_weights",
    "forward_with",
    "run_meta_batch",
    "setup_fast_weight_model",
    "trainable_names",
    "InnerLoopConfig",
    "StatBank",
    "batchnorm_layers",
    "check_support",
    "check_ways",
    "executor_for",
    "functional_forward",
    "prepare_batchnorm",
]

OOM_HINT = (
    "Second-order meta-gradients keep every inner step's graph: memory grows with inner_steps. "
    "Set algorithm.first_order=true, or lower algorithm.inner_steps, train.meta_batch_size or the "
    "task size (n_ways, n_queries)."
)
VMAP_OOM_HINT = (
    "execution 'vmap' (the default on a GPU) holds the graphs of every task of the meta-batch at once: "
    "set algorithm.execution=loop to hold one task at a time, or lower train.meta_batch_size."
)


class InnerLoopConfig(AlgorithmConfig):
    """The config fields every gradient-based meta-learner (MAML, ANIL, Meta-SGD, Reptile) shares: the
    inner loop's step size and step counts, the BatchNorm mode and how the tasks of a meta-batch run."""

    inner_lr: float = Field(0.4, gt=0.0, le=100.0, description="inner-loop (adaptation) SGD step size")
    inner_steps: int = Field(1, ge=0, le=100, description="inner-loop steps during meta-training")
    eval_inner_steps: int = Field(3, ge=0, le=1000, description="inner-loop steps when adapting at evaluation")
    bn_mode: Literal["transductive", "per_step"] = Field(
        "transductive",
        description=(
            "transductive: BatchNorm always uses the current batch's statistics (the MAML paper); "
            "per_step: running statistics kept separately for every inner step and used at evaluation"
        ),
    )
    execution: Literal["auto", "loop", "threads", "vmap"] = Field(
        "auto",
        description=(
            "how tasks of a meta-batch run: loop (one after another), threads (CPU: tasks side by side, "
            "one core each), vmap (all tasks in one vectorised pass; not with bn_mode per_step), "
            "auto (vmap on a GPU or without BatchNorm, else threads on a multi-core CPU, else loop)"
        ),
    )
    threads: int | None = Field(None, ge=1, le=256, description="threads for execution=threads (None: torch's thread count)")


@dataclass(frozen=True)
class FastWeights(Adapted):
    """The adapted task of the gradient-based learners: ``params``, the adapted parameters by name
    (detached), and ``steps``, the inner step count they were reached with (it selects the per-step
    BatchNorm statistics in ``predict``)."""

    params: dict[str, torch.Tensor]
    steps: int


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The ``(name, layer)`` pairs of every BatchNorm layer in ``module``."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class StatBank(nn.Module):
    """BatchNorm running statistics, one copy per inner step (MAML++'s per-step statistics)."""

    def __init__(self, backbone: nn.Module, prefix: str, n_steps: int) -> None:
        super().__init__()
        self.names: list[str] = []
        for name, bn in batchnorm_layers(backbone):
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                self.names.append(f"{prefix}{name}.{buf}")
        self.n_steps = n_steps
        for k in range(n_steps):
            for full in self.names:
                src = backbone.get_buffer(full[len(prefix):])
                self.register_buffer(self._key(k, full), src.detach().clone())

    @staticmethod
    def _key(step: int, name: str) -> str:
        return f"s{step}__" + name.replace(".", "__")

    def at(self, step: int) -> dict[str, torch.Tensor]:
        """The statistics of inner step ``step`` (the last step's beyond it), by full buffer name."""
        k = min(step, self.n_steps - 1)
        return {name: getattr(self, self._key(k, name)) for name in self.names}


def prepare_batchnorm(backbone: nn.Module, mode: str) -> None:
    """transductive: drop running statistics so BatchNorm always normalises with the batch;
    per_step: make sure every BatchNorm has running statistics (the bank copies them)."""
    for _, bn in batchnorm_layers(backbone):
        if mode == "transductive":
            bn.track_running_stats = False
            bn.running_mean = None
            bn.running_var = None
            bn.num_batches_tracked = None
        elif bn.running_mean is None:
            bn.track_running_stats = True
            dev = bn.weight.device if bn.weight is not None else None
            bn.running_mean = torch.zeros(bn.num_features, device=dev)
            bn.running_var = torch.ones(bn.num_features, device=dev)
            bn.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=dev)


def functional_forward(module: nn.Module, params: Params, x: torch.Tensor, bank: StatBank | None,
                       step: int) -> torch.Tensor:
    """``module(x)`` with ``params`` (and, in per-step mode, the statistics of ``step``)."""
    tensors = params if bank is None else {**params, **bank.at(step)}
    return functional_call(module, tensors, (x,), strict=False)


def executor_for(config: InnerLoopConfig, backbone: nn.Module) -> TaskExecutor:
    """The :class:`TaskExecutor` for ``config.execution`` on ``backbone``: vmap only where it is exact,
    one task after another with per-step BatchNorm statistics."""
    has_bn = bool(batchnorm_layers(backbone))
    # vmap over tasks is exact with transductive BatchNorm (batch statistics of each task's own
    # images: float64 tests against the loop and finite differences); per-step running statistics
    # are updated in place, which vmap cannot do per task
    vmap_ok = not has_bn or config.bn_mode == "transductive"
    if config.execution == "vmap" and not vmap_ok:
        raise ConfigError(
            "Config: algorithm.execution 'vmap' must be used with bn_mode 'transductive' (or a backbone without "
            "BatchNorm); got bn_mode 'per_step', whose running statistics are updated in place per task. "
            "Use execution=auto or loop, or bn_mode=transductive."
        )
    strategy = config.execution
    if config.bn_mode == "per_step" and strategy in ("auto", "threads"):
        # running statistics are updated in place: tasks must run one after another
        strategy = "loop" if has_bn else strategy
    return TaskExecutor(strategy, config.threads, vmap_ok=vmap_ok, vmap_on_cpu=not has_bn)


def check_ways(owner: str, n_ways: int, n_outputs: int, kind: TaskKind) -> None:
    """Raise a :class:`TaskError` (started by ``owner``) when a classification task (``kind``) has
    ``n_ways`` different from the ``n_outputs`` of the learned head."""
    if kind == "classification" and n_ways != n_outputs:
        raise TaskError(
            f"{owner}: n_ways must equal the {n_outputs} outputs of the learned head; got {n_ways}. "
            f"MAML, ANIL, Meta-SGD and Reptile adapt only to as many classes as they were trained with: use "
            f"{n_outputs}-way tasks ({n_outputs} labels), or train a model with task.n_ways={n_ways} "
            "(ProtoNet, SVM, ridge and transfer adapt to any number of classes)."
        )


def check_support(owner: str, x: torch.Tensor, y: torch.Tensor, n_ways: int, kind: TaskKind) -> None:
    """:func:`check_task` on a classification support set (``x``, ``y``, ``n_ways``); for regression
    (``kind``) check that ``y`` holds float targets, one row per row of ``x``. ``owner`` starts the message."""
    if kind == "classification":
        check_task(x, y, n_ways, owner)
    elif y.shape[0] != x.shape[0] or y.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TaskError(
            f"{owner}: regression targets must be a float tensor with one row per support example; got "
            f"shape {tuple(y.shape)} ({y.dtype}) for {x.shape[0]} examples. Pass float targets [n, d]."
        )


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---- the pieces MAML, Meta-SGD, ANIL and Reptile call ------------------------------------------
def setup_fast_weight_model(model: nn.Module, config: InnerLoopConfig, backbone: nn.Module,
                            stat_steps: int, stat_prefix: str = "backbone.") -> None:
    """Give ``model`` a linear head, the BatchNorm mode of ``config`` (with its per-step
    statistics bank) and a task executor."""
    features = getattr(backbone, "out_features", None)
    if not isinstance(features, int) or features < 1:
        raise ConfigError(
            f"{type(model).__name__}: the backbone must have an integer out_features attribute (the size of "
            f"its flattened output); got {features!r} on {type(backbone).__name__}. Set self.out_features in "
            "your module's __init__."
        )
    model.head = nn.Linear(features, model.n_outputs)
    prepare_batchnorm(backbone, config.bn_mode)
    model.stats = StatBank(backbone, stat_prefix, stat_steps) if config.bn_mode == "per_step" else None
    model.executor = executor_for(config, backbone)


def forward_with(model: nn.Module, module: nn.Module):
    """``forward(params, x, step)`` of ``module`` (the model or a thread's replica of it)."""
    return lambda params, x, step: functional_forward(module, params, x, model.stats, step)


def trainable_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters that require a gradient."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def fit_fast_weights(model: nn.Module, module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                     adapt: list[str], lr) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps from the model's weights on ``(x, y)`` for the parameters in ``adapt``,
    run on ``module`` (the model or a thread's replica); no graph is kept."""
    with torch.enable_grad():
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters() if n in adapt}
        fast = inner_loop(forward_with(model, module), params, x, y, kind=model.task_kind,
                          steps=steps, lr=lr, adapt=adapt, create_graph=False)
    return {n: t.detach() for n, t in fast.items()}


def adapt_fast_weights(model: nn.Module, owner: str, support_x: torch.Tensor, support_y: torch.Tensor,
                       n_ways: int, steps: int | None, adapt: list[str], lr) -> FastWeights:
    """Fine-tune the parameters named in ``adapt`` on a support set (no graph kept)."""
    check_support(owner, support_x, support_y, n_ways, model.task_kind)
    check_ways(owner, n_ways, model.n_outputs, model.task_kind)
    n_steps = model.config.eval_inner_steps if steps is None else int(steps)
    return FastWeights(fit_fast_weights(model, model, support_x, support_y, n_steps, adapt, lr), n_steps)


@contextmanager
def oom_guard(owner: str, second_order: bool, vmap: bool = False):
    """Turn an out-of-memory error into a TrainingError that says how to need less memory."""
    try:
        yield
    except RuntimeError as err:
        if is_oom(err) and (second_order or vmap):
            hints = " ".join(h for h, on in ((OOM_HINT, second_order), (VMAP_OOM_HINT, vmap)) if on)
            raise TrainingError(f"{owner}: the meta-gradient must fit in memory; got {err}. {hints}") from err
        raise


def run_meta_batch(model: nn.Module, owner: str, one_task, batch: TaskBatch, main: dict[str, torch.Tensor],
                   names: list[str], second_order: bool) -> MetaOutput:
    """Run ``one_task`` over the meta-batch with the model's executor; the returned loss carries
    the summed per-task gradients (:func:`gradient_as_loss`)."""
    with oom_guard(owner, second_order):
        res = model.executor.run(model, one_task, batch.meta_batch_size, batch.support_x.device)
    return MetaOutput(gradient_as_loss(res.loss, [main[n] for n in names], res.grads), res.metric)


def _vmap_meta_loss(model: nn.Module, batch: TaskBatch, main: dict[str, torch.Tensor], adapt: list[str], lr,
                    first_order: bool) -> MetaOutput:
    """:func:`fast_weight_meta_loss` for the whole meta-batch in one vectorised pass."""
    cfg, kind, b = model.config, model.task_kind, batch.meta_batch_size
    fwd = forward_with(model, model)
    fast = batched_inner_loop(fwd, {n: main[n].expand(b, *main[n].shape) for n in adapt},
                              batch.support_x, batch.support_y, kind=kind, steps=cfg.inner_steps,
                              lr=lr, adapt=adapt, create_graph=not first_order)
    losses, metrics = batched_task_loss(fwd, fast, batch.query_x, batch.query_y, cfg.inner_steps, kind)
    return MetaOutput(losses.mean(), metrics.mean())


def fast_weight_meta_loss(model: nn.Module, owner: str, batch: TaskBatch, adapt: list[str], lr,
                          first_order: bool) -> MetaOutput:
    """The MAML objective: per task, ``inner_steps`` SGD steps on the support set for the
    parameters in ``adapt`` (step size ``lr``: a float or a per-parameter mapping), then the query
    loss at the fast weights; the meta-gradient is taken for every trainable parameter."""
    cfg, kind = model.config, model.task_kind
    check_ways(f"{owner}.meta_loss", batch.n_ways, model.n_outputs, kind)
    names = trainable_names(model)
    main = dict(model.named_parameters())
    b = batch.meta_batch_size
    if model.executor.resolve(batch.support_x.device)[0] == "vmap":
        with oom_guard(owner, not first_order, vmap=True):
            return _vmap_meta_loss(model, batch, main, adapt, lr, first_order)

    def one_task(module: nn.Module, i: int) -> TaskResult:
        fwd = forward_with(model, module)
        fast = inner_loop(fwd, {n: main[n] for n in adapt}, batch.support_x[i], batch.support_y[i], kind=kind,
                          steps=cfg.inner_steps, lr=lr, adapt=adapt, create_graph=not first_order)
        out = fwd(fast, batch.query_x[i], cfg.inner_steps)
        loss = task_loss(out, batch.query_y[i], kind) / b
        grads = torch.autograd.grad(loss, [main[n] for n in names], allow_unused=True)
        return TaskResult(loss.detach(), task_metric(out, batch.query_y[i], kind) / b, list(grads))

    return run_meta_batch(model, owner, one_task, batch, main, names, not first_order)


class FastWeightAlgorithm(Algorithm):
    """Base of the learners that adapt fast weights of the backbone and a linear head (MAML, ANIL,
    Meta-SGD, Reptile): ``__init__`` (arguments as :class:`~metafit.algorithms.Algorithm`'s) gives the
    model its head, BatchNorm mode and task executor (:func:`setup_fast_weight_model`), and
    ``forward(x)`` runs backbone then head. Subclasses set ``stat_prefix`` ("" when only the head
    adapts) and may override :meth:`stat_steps`; everything else is theirs."""

    task_kinds = ("classification", "regression")
    #: where the per-step BatchNorm statistics live ("backbone.": the backbone adapts; "": it runs once)
    stat_prefix: str = "backbone."

    def __init__(self, config: InnerLoopConfig, backbone: nn.Module, n_outputs: int = 5,
                 task_kind: str = "classification") -> None:
        super().__init__(config, backbone, n_outputs, task_kind)
        setup_fast_weight_model(self, config, backbone, self.stat_steps(config), stat_prefix=self.stat_prefix)

    def stat_steps(self, config: InnerLoopConfig) -> int:
        """Sets of per-step BatchNorm running statistics ``config`` needs: one per inner step and one
        for the adapted weights."""
        return config.inner_steps + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
