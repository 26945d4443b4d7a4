"""Data-parallel meta-training with ``torch.distributed`` (launched by ``torchrun``).

The global meta-batch of ``train.meta_batch_size`` tasks is split across ranks: every rank
draws the same task descriptions and builds only its slice (see ``EpisodeSampler.sample``), so
ranks see different tasks and the union is what one process would train on. After the backward
pass the gradients (whatever wrote them: autograd, or an algorithm such as Reptile that writes
its meta-gradient itself) are averaged with one all-reduce; every rank then takes the same
optimizer step, so parameters stay identical without re-broadcasting. BatchNorm running
statistics are averaged after each step. Only rank 0 writes checkpoints and logs.

Gloo on CPU, NCCL on CUDA. A plain ``metafit train`` (no ``torchrun``) is a world of one and
none of this runs.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["DistContext", "init_distributed"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a world of one) ---------------------------------------------------
    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average ``.grad`` over ranks in one flat all-reduce. Every rank must hold gradients for
        the same parameters (the algorithm decides which, identically on every rank)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """The mean over ranks of each value (training loss and metric, for logs and monitors)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks."""
        if not self.enabled:
            return
        bufs = [b for b in module.buffers() if b.is_floating_point()]
        if bufs:
            flat = torch.cat([b.reshape(-1).double() for b in bufs])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for b in bufs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank hold rank 0's parameters and buffers."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (decisions that must agree, e.g. a time budget)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"Distributed: environment variable {name} must be an integer; got {value!r}. "
            "Launch with torchrun, which sets it."
        ) from None


def init_distributed(device_type: str, timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a world of one without it.
    ``device_type`` picks the backend: NCCL for ``cuda``, gloo otherwise."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(
            f"Distributed: RANK must lie in 0..WORLD_SIZE-1; got RANK={rank} with WORLD_SIZE={world}. "
            "Launch with torchrun, which sets both."
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise ConfigError(
                f"Distributed: the process group must match WORLD_SIZE; got a group of {dist.get_world_size()} "
                f"for WORLD_SIZE={world}. Let metafit create the group, or create it with all ranks."
            )
        return DistContext(dist.get_rank(), world, local_rank, dist.get_backend())
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"Distributed: each process needs its own GPU; got LOCAL_RANK={local_rank} with "
                f"{torch.cuda.device_count()} visible GPUs. Use --nproc_per_node <= the number of GPUs."
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    atexit.register(_destroy)  # a clean exit also on errors (no abort from a live group at shutdown)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend)
