"""Single-task environments with the Gymnasium API plus the meta-RL task interface:
``sample_tasks(n, generator=None)``, ``set_task(task)``, ``get_task()``.

Built by a family's ``make_env(task)`` (the environment reads its settings from ``family``; this
module never imports the families, which import it lazily). These follow the same rules as the
batched torch environments (see each family's module) but are written independently in numpy on
Gymnasium's seeded ``np_random``, one step at a time; the tests check that both agree. A task
stays fixed until ``set_task``; an environment built without a task draws one from its family at
the first ``reset`` (from the seeded RNG, so ``reset(seed=s)`` is
reproducible). Needs ``pip install "metafit[rl]"`` (HalfCheetah: ``"metafit[mujoco]"``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from ...errors import TaskError, constraint_message
from ._common import require_mujoco

__all__ = ["BanditEnv", "TabularMDPEnv", "NavigationEnv", "HalfCheetahVelEnv", "HalfCheetahDirEnv", "velocity_reward",
           "direction_reward"]


def velocity_reward(forward_velocity: float, action: np.ndarray, target: float, ctrl_cost_weight: float = 0.05):
    ctrl = ctrl_cost_weight * float(np.square(action).sum())
    return -abs(forward_velocity - target) - ctrl, ctrl


def direction_reward(forward_velocity: float, action: np.ndarray, direction: float, ctrl_cost_weight: float = 0.05):
    ctrl = ctrl_cost_weight * float(np.square(action).sum())
    return direction * forward_velocity - ctrl, ctrl


class _TaskEnv(gym.Env):
    """Task bookkeeping shared by the single-task environments."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, family: Any, task: Any = None) -> None:
        super().__init__()
        self.family = family
        self._task = None
        self._needs_reset = True
        if task is not None:
            self.set_task(task)

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> list:
        return self.family.sample_tasks(n, generator)

    def get_task(self):
        return self._task

    def set_task(self, task) -> None:
        """Switch to ``task``; a running episode ends here, so call ``reset()`` next."""
        task_type = self.family.task_type
        if not isinstance(task, task_type):
            raise TaskError(constraint_message(type(self).__name__, "task", f"a {task_type.__name__}",
                                               type(task).__name__, "Pass a task from this env's sample_tasks()."))
        self._load_task(task)
        self._task = task
        self._needs_reset = True

    def _load_task(self, task) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _begin_episode(self, seed: int | None) -> None:
        super().reset(seed=seed)
        if self._task is None:
            g = torch.Generator().manual_seed(int(self.np_random.integers(2**62)))
            self.set_task(self.family.sample_tasks(1, g)[0])
        self._needs_reset = False
        self._t = 0

    def _check_step(self, action) -> None:
        if self._needs_reset:
            raise TaskError(f"{type(self).__name__}: step() needs a running episode; the episode has ended or "
                            "reset() was never called (or the task changed). Call reset() first.")
        self._check_action(action)

    def _check_action(self, action) -> None:
        if not self.action_space.contains(action):
            raise TaskError(constraint_message(type(self).__name__, "action", f"in {self.action_space}", action,
                                               "Pass an action from the action space."))


class BanditEnv(_TaskEnv):
    """One Bernoulli bandit of ``family`` (a :class:`~metafit.rl.envs.bandits.BanditFamily`); each
    pull is a one-step episode (``terminated=True``). It plays ``task`` (None: a task sampled at the
    first reset); ``set_task`` switches tasks."""

    def __init__(self, family: Any, task: Any = None) -> None:
        self.observation_space = spaces.Discrete(1)
        self.action_space = spaces.Discrete(family.n_arms)
        super().__init__(family, task)

    def _load_task(self, task: Any) -> None:
        p = np.asarray(torch.as_tensor(task.probs, dtype=torch.float64))
        if p.shape != (self.family.n_arms,) or not ((p >= 0) & (p <= 1)).all():
            raise TaskError(constraint_message("BanditEnv", "task.probs",
                                               f"{self.family.n_arms} probabilities in [0, 1]", p.shape,
                                               "Sample the task from this env's family."))
        self._probs = p.astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._begin_episode(seed)
        return 0, {}

    def step(self, action):
        self._check_step(action)
        reward = float(self.np_random.random(dtype=np.float32) < self._probs[int(action)])
        self._needs_reset = True
        return 0, reward, True, False, {}


class TabularMDPEnv(_TaskEnv):
    """One tabular MDP of ``family`` (a :class:`~metafit.rl.envs.mdp.TabularMDPFamily`); episodes of
    ``family.horizon`` steps from ``family.start_state``. It plays ``task`` (None: a task sampled at
    the first reset); ``set_task`` switches tasks."""

    def __init__(self, family: Any, task: Any = None) -> None:
        self.observation_space = spaces.Discrete(family.n_states)
        self.action_space = spaces.Discrete(family.n_actions)
        super().__init__(family, task)

    def _load_task(self, task: Any) -> None:
        S, A = self.family.n_states, self.family.n_actions
        R = np.asarray(torch.as_tensor(task.rewards_mean, dtype=torch.float64))
        P = np.asarray(torch.as_tensor(task.transitions, dtype=torch.float64))
        if R.shape != (S, A) or P.shape != (S, A, S) or (P < 0).any() or not np.allclose(P.sum(-1), 1, atol=1e-5):
            raise TaskError(constraint_message(
                "TabularMDPEnv", "task", f"rewards_mean [{S}, {A}] and transition rows [{S}, {A}, {S}] summing to 1",
                (R.shape, P.shape), "Sample the task from this env's family."))
        self._R = R.astype(np.float32)
        cdf = P.cumsum(-1)
        cdf[..., -1] = 1.0
        self._cdf = cdf.astype(np.float32)
        self._std = np.float32(float(task.reward_std))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._begin_episode(seed)
        self._state = self.family.start_state
        return self._state, {}

    def step(self, action):
        self._check_step(action)
        s, a = self._state, int(action)
        reward = float(self._R[s, a] + self._std * np.float32(self.np_random.standard_normal()))
        u = self.np_random.random(dtype=np.float32)
        nxt = min(int((self._cdf[s, a] <= u).sum()), self.family.n_states - 1)
        self._state = nxt
        self._t += 1
        terminated = self._t >= self.family.horizon
        self._needs_reset = terminated
        return nxt, reward, terminated, False, {}


class NavigationEnv(_TaskEnv):
    """One point-navigation task (MAML variant; see :mod:`metafit.rl.envs.navigation`) of ``family``
    (a :class:`~metafit.rl.envs.navigation.NavigationFamily`). It plays ``task`` (None: a task
    sampled at the first reset); ``set_task`` switches tasks."""

    def __init__(self, family: Any, task: Any = None) -> None:
        # the point starts at the origin and moves at most max_action per axis and step, so it never leaves
        # [-horizon * max_action, horizon * max_action]^2 (the slack covers float32 rounding of the running sum)
        bound = np.float32(family.horizon * family.max_action * (1 + 1e-4))
        self.observation_space = spaces.Box(-bound, bound, (2,), np.float32)
        m = np.float32(family.max_action)
        self.action_space = spaces.Box(-m, m, (2,), np.float32)
        super().__init__(family, task)

    def _load_task(self, task: Any) -> None:
        g = np.asarray(torch.as_tensor(task.goal, dtype=torch.float64))
        if g.shape != (2,) or not np.isfinite(g).all():
            raise TaskError(constraint_message("NavigationEnv", "task.goal", "a finite 2D point", g.shape,
                                               "Sample the task from this env's family."))
        self._goal = g.astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._begin_episode(seed)
        self._pos = np.zeros(2, np.float32)
        return self._pos.copy(), {}

    def _check_action(self, action) -> None:
        a = np.asarray(action)
        if a.shape != (2,) or not np.isfinite(a).all():  # out-of-box actions are clipped, not rejected
            raise TaskError(constraint_message("NavigationEnv", "action", "a finite 2D vector", action,
                                               "Pass an array of two numbers."))

    def step(self, action):
        self._check_step(action)
        m = np.float32(self.family.max_action)
        a = np.clip(np.asarray(action, dtype=np.float32), -m, m)
        self._pos = (self._pos + a).astype(np.float32)
        d = self._pos - self._goal
        distance = float(np.sqrt(d[0] * d[0] + d[1] * d[1]))
        self._t += 1
        terminated = bool((np.abs(d) < np.float32(self.family.goal_tolerance)).all())
        truncated = (self._t >= self.family.horizon) and not terminated
        self._needs_reset = terminated or truncated
        return self._pos.copy(), -distance, terminated, truncated, {"distance": distance}


class _HalfCheetahTaskEnv(_TaskEnv):
    def __init__(self, family: Any, task: Any = None) -> None:
        cheetah_cls = require_mujoco(type(self).__name__)
        self._inner = cheetah_cls(ctrl_cost_weight=family.ctrl_cost_weight)
        self.observation_space = self._inner.observation_space
        self.action_space = self._inner.action_space
        super().__init__(family, task)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._begin_episode(seed)
        obs, _ = self._inner.reset(seed=seed)
        return obs, {}

    def _check_action(self, action) -> None:
        a = np.asarray(action)
        if a.shape != self.action_space.shape or not np.isfinite(a).all():  # out-of-box actions are clipped
            raise TaskError(constraint_message(type(self).__name__, "action",
                                               f"a finite vector of shape {self.action_space.shape}", a.shape,
                                               "Pass one number per actuator."))

    def step(self, action):
        self._check_step(action)
        a = np.clip(np.asarray(action, dtype=np.float32), self.action_space.low, self.action_space.high)
        obs, _, terminated, _, inner_info = self._inner.step(a)
        velocity = float(inner_info["x_velocity"])
        reward, ctrl = self._reward(velocity, a)
        self._t += 1
        truncated = self._t >= self.family.horizon
        self._needs_reset = bool(terminated or truncated)
        info = {"forward_velocity": velocity, "reward_ctrl": -ctrl, "x_position": float(inner_info["x_position"])}
        return obs, float(reward), bool(terminated), bool(truncated), info

    def close(self) -> None:
        self._inner.close()
        super().close()


class HalfCheetahVelEnv(_HalfCheetahTaskEnv):
    """HalfCheetah-v5 rewarded for running at a target velocity (MAML/ProMP)."""

    def _load_task(self, task: Any) -> None:
        if not np.isfinite(task.target):
            raise TaskError(constraint_message("HalfCheetahVelEnv", "task.target", "finite", task.target,
                                               "Pass a finite target velocity."))
        self._target = float(task.target)

    def _reward(self, velocity: float, action: np.ndarray):
        return velocity_reward(velocity, action, self._target, self.family.ctrl_cost_weight)


class HalfCheetahDirEnv(_HalfCheetahTaskEnv):
    """HalfCheetah-v5 rewarded for running forward (+1) or backward (-1) (MAML)."""

    def _load_task(self, task: Any) -> None:
        if task.direction not in (-1.0, 1.0):
            raise TaskError(constraint_message("HalfCheetahDirEnv", "task.direction", "+1 or -1", task.direction,
                                               "Pass 1.0 (forward) or -1.0 (backward)."))
        self._direction = float(task.direction)

    def _reward(self, velocity: float, action: np.ndarray):
        return direction_reward(velocity, action, self._direction, self.family.ctrl_cost_weight)
