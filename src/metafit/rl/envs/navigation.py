"""2D point navigation (Finn et al. 2017, MAML, section 5.3), the variant of the MAML code.

The agent starts at the origin; a task is a goal drawn uniformly from ``[-0.5, 0.5]^2``. An
action is a 2D displacement, **clipped per axis** to ``[-0.1, 0.1]`` (MAML wraps the env in
rllab's ``normalize``, which maps the policy's ``[-1, 1]`` output onto the box and clips each
coordinate; here the action is the displacement itself); the new position is
``pos + action`` and the reward is minus the L2 distance from the *new* position to the goal.
The episode terminates when the goal is reached -- ``|dx| < 0.01 and |dy| < 0.01``, a box test as
in MAML's ``PointEnvRandGoal`` (not an L2 ball) -- and is truncated after ``horizon = 100`` steps.

Reference returns (see :func:`expected_standing_still_return` and the tests): standing still
earns ``-100 * E||g|| = -100 * 0.5 * (sqrt(2) + ln(1 + sqrt(2))) / 3 = -38.26`` in expectation; the
-38.1 quoted in the issue is this expectation on a finite set of goals (the per-goal standard
deviation is about 14, so 1000 goals give a standard error of about 0.45). The straight-line
oracle is computed for both clipping conventions by :func:`oracle_action`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ...errors import TaskError, constraint_message
from ._common import check_int, check_nonnegative, check_positive, require_gymnasium, stack_tasks

__all__ = ["NavTask", "NavigationFamily", "BatchedNavigation", "oracle_action", "expected_standing_still_return"]


@dataclass(frozen=True)
class NavTask:
    """The goal position ``[2]`` (or ``[B, 2]`` for a batch)."""

    goal: torch.Tensor


@dataclass(frozen=True)
class NavigationFamily:
    """Goals ``U[-goal_range, goal_range]^2``; actions clipped per axis to ``max_action``;
    ``horizon`` steps; done when both coordinates are within ``goal_tolerance`` of the goal."""

    goal_range: float = 0.5
    max_action: float = 0.1
    horizon: int = 100
    goal_tolerance: float = 0.01

    task_type = NavTask
    discrete_observations = False
    discrete_actions = False
    observation_size = 2  # the position
    action_size = 2  # a displacement

    @property
    def action_bound(self) -> float:
        return float(self.max_action)

    def __post_init__(self) -> None:
        owner = "NavigationFamily"
        check_positive(owner, "goal_range", self.goal_range)
        check_positive(owner, "max_action", self.max_action)
        check_int(owner, "horizon", self.horizon, 1)
        check_nonnegative(owner, "goal_tolerance", self.goal_tolerance)

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> list[NavTask]:
        """``n`` goals (:class:`NavTask`) drawn from ``generator`` (None: torch's global stream)."""
        check_int("NavigationFamily", "n", n, 1)
        goals = (2 * torch.rand(n, 2, generator=generator, dtype=torch.float64) - 1) * self.goal_range
        return [NavTask(g) for g in goals]

    def batched(self, tasks: Sequence[NavTask] | NavTask, envs_per_task: int = 1, *, seed: int | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                check_actions: bool = True) -> "BatchedNavigation":
        """A :class:`BatchedNavigation` with this family's settings playing ``tasks``, each in
        ``envs_per_task`` copies, on ``device`` in floating-point ``dtype``; ``check_actions``
        validates every step's actions. ``seed`` is accepted for the
        :class:`~metafit.rl.envs.base.BatchedFamily` protocol and unused: the dynamics are deterministic."""
        return BatchedNavigation(tasks, envs_per_task, max_action=self.max_action, horizon=self.horizon,
                                 goal_tolerance=self.goal_tolerance, device=device, dtype=dtype,
                                 check_actions=check_actions)

    def make_env(self, task: NavTask | None = None):
        """A single-task Gymnasium environment (needs the ``rl`` extra)."""
        require_gymnasium("NavigationFamily.make_env")
        from .gym_envs import NavigationEnv  # lazily: it imports gymnasium (and never this module)

        return NavigationEnv(self, task)


def expected_standing_still_return(goal_range: float = 0.5, horizon: int = 100) -> float:
    """The expected return of a policy that never moves, over ``horizon`` steps, for a goal uniform in
    ``[-r, r]^2`` with ``r = goal_range``: ``-horizon * E||g||``, ``E||g|| = r (sqrt2 + ln(1+sqrt2)) / 3``."""
    return -horizon * goal_range * (math.sqrt(2) + math.log(1 + math.sqrt(2))) / 3


def oracle_action(position: torch.Tensor, goal: torch.Tensor, max_action: float = 0.1,
                  mode: Literal["axis", "vector"] = "axis") -> torch.Tensor:
    """The action that moves from ``position`` toward ``goal`` (``[..., 2]`` each) as fast as the
    action limit ``max_action`` allows, under ``mode``:

    ``"axis"``: ``clip(goal - pos, -max_action, max_action)`` per coordinate (the fastest policy
    under the per-axis clipping of this environment; diagonal steps are up to ``sqrt(2)`` times
    longer). ``"vector"``: a step along the straight line of length ``min(max_action, distance)``
    (the oracle for an L2-bounded action)."""
    delta = goal - position
    if mode == "axis":
        return delta.clamp(-max_action, max_action)
    if mode == "vector":
        norm = delta.norm(dim=-1, keepdim=True)
        return delta * torch.clamp(max_action / norm.clamp_min(1e-12), max=1.0)
    raise TaskError(constraint_message("oracle_action", "mode", "'axis' or 'vector'", mode, "Pick one of the two."))


class BatchedNavigation:
    """``B`` navigation tasks x ``envs_per_task`` copies, stepped together (deterministic dynamics).

    Observations are positions ``[N, 2]``. Finished episodes (goal reached: ``terminated``;
    ``horizon`` steps: ``truncated``) restart at the origin in the same step;
    ``info["final_obs"]`` holds the position each step reached.

    ``tasks`` are :class:`NavTask` objects (or one with a leading task dimension), each played by
    ``envs_per_task`` environments on ``device`` with positions in ``dtype``. Actions are clipped
    per axis to ``max_action``; an episode ends after ``horizon`` steps or when both coordinates
    are within ``goal_tolerance`` of the goal. ``check_actions`` validates the actions of every
    step (shape and finiteness)."""

    def __init__(self, tasks: Sequence[NavTask] | NavTask, envs_per_task: int = 1, *, max_action: float = 0.1,
                 horizon: int = 100, goal_tolerance: float = 0.01, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, check_actions: bool = True) -> None:
        owner = "BatchedNavigation"
        self.envs_per_task = check_int(owner, "envs_per_task", envs_per_task, 1)
        self.max_action = check_positive(owner, "max_action", max_action)
        self.horizon = check_int(owner, "horizon", horizon, 1)
        self.goal_tolerance = check_nonnegative(owner, "goal_tolerance", goal_tolerance)
        self.device, self.dtype = torch.device(device), dtype
        self.check = check_actions
        self.set_tasks(tasks)

    def set_tasks(self, tasks: Sequence[NavTask] | NavTask) -> None:
        """Swap in new ``tasks`` (any number); call :meth:`reset` afterwards."""
        goals = stack_tasks("BatchedNavigation", tasks, NavTask, {"goal": 1})["goal"]
        if goals.shape[-1] != 2 or not bool(torch.isfinite(goals).all()):
            raise TaskError(constraint_message("BatchedNavigation", "tasks.goal", "finite 2D points",
                                               tuple(goals.shape),
                                               "Sample tasks with NavigationFamily.sample_tasks()."))
        self.goals = goals.to(self.device, self.dtype)
        self.num_tasks = int(self.goals.shape[0])
        self.num_envs = self.num_tasks * self.envs_per_task
        self.task_index = torch.arange(self.num_tasks, device=self.device).repeat_interleave(self.envs_per_task)
        self.env_goals = self.goals[self.task_index]
        self.position = torch.zeros(self.num_envs, 2, device=self.device, dtype=self.dtype)
        self.t = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self.episode_count = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)

    def reset(self) -> torch.Tensor:
        """Start a trial: every environment at the origin, step and episode counters 0; returns
        the positions ``[N, 2]``."""
        self.position.zero_()
        self.t.zero_()
        self.episode_count.zero_()
        return self.position.clone()

    def step(self, actions: torch.Tensor):
        """Move every environment by ``actions`` (``[N, 2]`` floats, clipped per axis to
        ``max_action``); returns ``(obs [N, 2], reward [N], terminated [N], truncated [N], info)``,
        the reward being minus the distance to the goal after the move."""
        actions = torch.as_tensor(actions, device=self.device)
        if self.check and (actions.shape != (self.num_envs, 2) or not actions.dtype.is_floating_point
                           or not bool(torch.isfinite(actions).all())):
            raise TaskError(constraint_message(
                "BatchedNavigation", "actions", f"a finite float tensor of shape ({self.num_envs}, 2)",
                f"{actions.dtype} tensor of shape {tuple(actions.shape)}",
                "Pass one finite 2D action per environment."))
        a = actions.to(self.dtype).clamp(-self.max_action, self.max_action)
        pos = self.position + a
        delta = pos - self.env_goals
        reward = -torch.sqrt(delta[:, 0] * delta[:, 0] + delta[:, 1] * delta[:, 1])
        reached = (delta.abs() < self.goal_tolerance).all(dim=1)
        self.t += 1
        truncated = (self.t >= self.horizon) & ~reached
        done = reached | truncated
        self.position = torch.where(done.unsqueeze(1), torch.zeros_like(pos), pos)
        self.t = torch.where(done, torch.zeros_like(self.t), self.t)
        self.episode_count += done
        return self.position.clone(), reward, reached, truncated, {"final_obs": pos}
