"""What the gradient-based meta-learners (MAML, ANIL, Meta-SGD, Reptile) share, as functions
and small classes they call: the inner-loop config fields, a linear head, BatchNorm handling
(transductive batch statistics or per-step running statistics) and a functional forward over a
parameter dict that works with any backbone ``nn.Module``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError, TaskError
from ..functional import Params, TaskExecutor, TaskKind
from .base import Adapted, AlgorithmConfig, check_task

__all__ = [
    "FastWeights",
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


class InnerLoopConfig(AlgorithmConfig):
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
            "one core each), vmap (all tasks in one vectorised pass; backbones without BatchNorm only), "
            "auto (vmap without BatchNorm, else threads on a multi-core CPU, else loop)"
        ),
    )
    threads: int | None = Field(None, ge=1, le=256, description="threads for execution=threads (None: torch's thread count)")


@dataclass(frozen=True)
class FastWeights(Adapted):
    """Adapted parameters (detached) and the inner step count they were reached with."""

    params: dict[str, torch.Tensor]
    steps: int


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
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
    has_bn = bool(batchnorm_layers(backbone))
    if config.execution == "vmap" and has_bn:
        raise ConfigError(
            "Config: algorithm.execution 'vmap' must be used with a backbone without BatchNorm; got a backbone "
            "with BatchNorm layers (vmap's second-order gradient through BatchNorm was measured wrong). "
            "Use execution=auto, threads or loop."
        )
    strategy = config.execution
    if config.bn_mode == "per_step" and strategy in ("auto", "threads"):
        # running statistics are updated in place: tasks must run one after another
        strategy = "loop" if has_bn else strategy
    return TaskExecutor(strategy, config.threads, vmap_ok=not has_bn)


def check_ways(owner: str, n_ways: int, n_outputs: int, kind: TaskKind) -> None:
    if kind == "classification" and n_ways != n_outputs:
        raise TaskError(
            f"{owner}: n_ways must equal the {n_outputs} outputs of the learned head; got {n_ways}. "
            f"Evaluate with {n_outputs}-way tasks, or train a model with task.n_ways={n_ways}."
        )


def check_support(owner: str, x: torch.Tensor, y: torch.Tensor, n_ways: int, kind: TaskKind) -> None:
    if kind == "classification":
        check_task(x, y, n_ways, owner)
    elif y.shape[0] != x.shape[0] or y.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TaskError(
            f"{owner}: regression targets must be a float tensor with one row per support example; got "
            f"shape {tuple(y.shape)} ({y.dtype}) for {x.shape[0]} examples. Pass float targets [n, d]."
        )


def check_kind(owner: str, kind: str) -> None:
    if kind not in ("classification", "regression"):
        raise ConfigError(
            f"{owner}: task kind must be 'classification' or 'regression'; got {kind!r}. Use one of them."
        )


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
