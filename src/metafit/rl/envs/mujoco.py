"""HalfCheetah velocity and direction tasks (Finn et al. 2017, MAML, section 5.3; Rothfuss et
al. 2019, ProMP), on Gymnasium's ``HalfCheetah-v5`` (needs ``pip install "metafit[mujoco]"``).

Variant implemented (where the papers' code differ):

* forward velocity = ``(x_after - x_before) / dt`` of the root body, Gymnasium's
  ``info["x_velocity"]`` (ProMP's definition; MAML's rllab env used the torso's centre-of-mass
  velocity, which differs slightly within a gait cycle);
* velocity task: target ``v ~ U[0, 2]``, reward ``-|v_fwd - v| - 0.05 * |a|^2``;
* direction task: ``d = +1`` or ``-1`` with probability 1/2, reward ``d * v_fwd - 0.05 * |a|^2``;
* the control cost ``0.05 * |a|^2`` (MAML/ProMP's ``0.5 * 1e-1 * sum(a^2)``) uses the action
  clipped to the action box ``[-1, 1]^6``, as MuJoCo applies it;
* episodes are truncated after ``horizon = 200`` steps (MAML; Gymnasium's default is 1000);
  observations are Gymnasium v5's 17 numbers (position without the root x, velocities).

Tasks and families (this module) need only torch; the environments are
:class:`metafit.rl.HalfCheetahVelEnv` and :class:`metafit.rl.HalfCheetahDirEnv` (``family.make_env``),
with the rewards of :mod:`metafit.rl.envs.gym_envs`. There is no batched torch environment: learners
step a pool of these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import check_int, check_nonnegative, check_range, require_gymnasium

__all__ = ["VelocityTask", "DirectionTask", "HalfCheetahVelFamily", "HalfCheetahDirFamily"]


@dataclass(frozen=True)
class VelocityTask:
    """The ``target`` forward velocity the cheetah is rewarded for running at."""

    target: float


@dataclass(frozen=True)
class DirectionTask:
    """Running direction: +1 (forward) or -1 (backward)."""

    direction: float


class _CheetahFamily:
    """What the HalfCheetah families share: HalfCheetah-v5's continuous observations (positions
    without the root x, velocities) and one torque per actuator, and the checks of ``horizon``
    and ``ctrl_cost_weight`` (the dataclass fields of each family)."""

    discrete_observations = False
    discrete_actions = False
    observation_size = 17
    action_size = 6
    action_bound = 1.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_int(name, "horizon", self.horizon, 1)
        check_nonnegative(name, "ctrl_cost_weight", self.ctrl_cost_weight)


@dataclass(frozen=True)
class HalfCheetahVelFamily(_CheetahFamily):
    """Target velocities ``U[target_range]`` (MAML: ``[0, 2]``); episodes of ``horizon`` steps,
    reward ``-|velocity - target| - ctrl_cost_weight * |action|^2``. Needs the ``mujoco`` extra
    for its environments."""

    target_range: tuple[float, float] = (0.0, 2.0)
    horizon: int = 200
    ctrl_cost_weight: float = 0.05

    task_type = VelocityTask

    def __post_init__(self) -> None:
        check_range("HalfCheetahVelFamily", "target_range", self.target_range)
        super().__post_init__()

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> list[VelocityTask]:
        """``n`` target velocities (:class:`VelocityTask`) drawn from ``generator`` (None: torch's
        global stream)."""
        check_int("HalfCheetahVelFamily", "n", n, 1)
        lo, hi = self.target_range
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return [VelocityTask(float(lo + (hi - lo) * x)) for x in u]

    def make_env(self, task: VelocityTask | None = None):
        """A single-task Gymnasium environment playing ``task`` (None: one sampled at the first
        reset); needs the ``mujoco`` extra."""
        require_gymnasium("HalfCheetahVelFamily.make_env")
        from .gym_envs import HalfCheetahVelEnv  # lazily: it imports gymnasium (and never this module)

        return HalfCheetahVelEnv(self, task)


@dataclass(frozen=True)
class HalfCheetahDirFamily(_CheetahFamily):
    """Directions ``+1`` / ``-1`` with equal probability; episodes of ``horizon`` steps, reward
    ``direction * velocity - ctrl_cost_weight * |action|^2``. Needs the ``mujoco`` extra for its
    environments."""

    horizon: int = 200
    ctrl_cost_weight: float = 0.05

    task_type = DirectionTask

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> list[DirectionTask]:
        """``n`` directions (:class:`DirectionTask`) drawn from ``generator`` (None: torch's global
        stream)."""
        check_int("HalfCheetahDirFamily", "n", n, 1)
        signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        return [DirectionTask(float(s)) for s in signs]

    def make_env(self, task: DirectionTask | None = None):
        """A single-task Gymnasium environment playing ``task`` (None: one sampled at the first
        reset); needs the ``mujoco`` extra."""
        require_gymnasium("HalfCheetahDirFamily.make_env")
        from .gym_envs import HalfCheetahDirEnv  # lazily: it imports gymnasium (and never this module)

        return HalfCheetahDirEnv(self, task)
