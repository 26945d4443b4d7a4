"""Shared plumbing for the RL package: argument checks with the one error shape, random
generators, task batching and the lazy import of the optional extras (gymnasium, MuJoCo)."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Sequence, TypeVar

import torch

from ...errors import ConfigError, MetafitError, TaskError, constraint_message

__all__ = [
    "MissingExtraError",
    "check_int",
    "check_positive",
    "check_nonnegative",
    "check_range",
    "check_finite",
    "make_generator",
    "stack_tasks",
    "require_gymnasium",
    "require_mujoco",
    "random_argmax",
    "check_actions",
]

T = TypeVar("T")


class MissingExtraError(MetafitError, ImportError):
    """An optional dependency (a pip extra of metafit) is not installed."""


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(constraint_message(owner, name, f"an integer >= {minimum}", value,
                                             f"Pass an integer >= {minimum}."))
    return int(value)


def check_positive(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(constraint_message(owner, name, "positive", value, "Pass a positive number."))
    return float(value)


def check_nonnegative(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(constraint_message(owner, name, ">= 0", value, "Pass a number >= 0."))
    return float(value)


def check_finite(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(constraint_message(owner, name, "a finite number", value, "Pass a finite number."))
    return float(value)


def check_range(owner: str, name: str, value: Any) -> tuple[float, float]:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
          and value[0] <= value[1])
    if not ok:
        raise ConfigError(constraint_message(owner, name, "a finite (min, max) pair with min <= max", value,
                                             "Pass two finite numbers in increasing order."))
    return float(value[0]), float(value[1])


def make_generator(seed: int | None = None, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device``: the one given, or a new one seeded with ``seed``
    (a nondeterministic seed when both are None)."""
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def stack_tasks(owner: str, tasks: Any, cls: type[T], unbatched_dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """The fields of ``tasks`` stacked along a new leading task dimension.

    ``tasks`` is a non-empty sequence of ``cls`` instances (one task each) or one ``cls`` instance
    whose tensor fields already carry a leading task dimension. ``unbatched_dims`` gives each
    field's number of dimensions for a single task."""
    if isinstance(tasks, cls):
        out = {}
        for f in fields(cls):
            v = torch.as_tensor(getattr(tasks, f.name))
            nd = unbatched_dims[f.name]
            out[f.name] = v.unsqueeze(0) if v.dim() == nd else v
            if out[f.name].dim() != nd + 1:
                raise TaskError(constraint_message(
                    owner, f"tasks.{f.name}", f"a tensor with {nd} or {nd + 1} dimensions", tuple(v.shape),
                    f"Pass {cls.__name__} objects from the family's sample_tasks()."))
        return out
    if not isinstance(tasks, Sequence) or len(tasks) == 0 or not all(isinstance(t, cls) for t in tasks):
        raise TaskError(constraint_message(
            owner, "tasks", f"a non-empty list of {cls.__name__}", type(tasks).__name__,
            "Pass the list returned by the family's sample_tasks(n)."))
    out = {}
    for f in fields(cls):
        values = [torch.as_tensor(getattr(t, f.name)) for t in tasks]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise TaskError(constraint_message(
                owner, f"tasks.{f.name}", "the same shape in every task", sorted(shapes),
                "Sample all tasks of one batch from the same family."))
        out[f.name] = torch.stack(values)
    return out


def require_gymnasium(owner: str):
    try:
        import gymnasium
    except ImportError as err:
        raise MissingExtraError(
            f"{owner}: the gymnasium package is required for single-task Gymnasium environments; "
            f"it is not installed. Install it with: pip install \"metafit[rl]\" (the batched torch "
            "environments work without it)."
        ) from err
    return gymnasium


def require_mujoco(owner: str):
    """Import Gymnasium's MuJoCo HalfCheetah, or fail naming the extra to install."""
    try:
        import mujoco  # noqa: F401
        from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
    except ImportError as err:
        raise MissingExtraError(
            f"{owner}: MuJoCo environments need the gymnasium[mujoco] packages, which are not installed "
            f"({err}). Install them with: pip install \"metafit[mujoco]\"."
        ) from err
    return HalfCheetahEnv


def random_argmax(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Index of the maximum along the last dimension, ties broken uniformly at random."""
    is_max = values == values.amax(dim=-1, keepdim=True)
    noise = torch.rand(values.shape, generator=generator, device=values.device, dtype=torch.float32)
    return torch.where(is_max, noise + 1.0, noise.new_zeros(())).argmax(dim=-1)


def check_actions(owner: str, actions: torch.Tensor, num_envs: int, n_actions: int) -> torch.Tensor:
    """Validate a batch of discrete actions: ``num_envs`` integers in ``[0, n_actions)``."""
    actions = torch.as_tensor(actions)
    if actions.shape != (num_envs,) or actions.dtype.is_floating_point or actions.dtype == torch.bool:
        raise TaskError(constraint_message(
            owner, "actions", f"an integer tensor of shape ({num_envs},)",
            f"{actions.dtype} tensor of shape {tuple(actions.shape)}", "Pass one action index per environment."))
    if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= n_actions):
        raise TaskError(constraint_message(
            owner, "actions", f"in [0, {n_actions})", (int(actions.min()), int(actions.max())),
            "Pass valid action indices (or build the environment with check_actions=False to skip this check)."))
    return actions
