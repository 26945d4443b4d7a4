"""Environment families for meta-RL (this room: tasks and the environments that play them; no
learning). Each family is one module; :data:`FAMILIES` maps a config's ``family.name`` to its class.

A family (:class:`~metafit.rl.envs.base.Family`) samples tasks with ``sample_tasks(n, generator)``
and builds a single-task Gymnasium environment with ``make_env(task)`` (:mod:`.gym_envs`; needs
``pip install "metafit[rl]"``); the simple families also have a batched torch environment that
steps many tasks, and several copies of each, at once (``batched(tasks, envs_per_task)``).
Adding a family is one module plus one line in :data:`FAMILIES`; ``metafit rl train``, the
learners and the contract tests pick it up from there. This room may import the base modules only
(types, errors, validation, functional, stats).
"""

from __future__ import annotations

from ...errors import ConfigError, constraint_message
from ._common import MissingExtraError
from .bandits import BanditFamily, BanditTask, BatchedBandit
from .base import BatchedEnv, BatchedFamily, Family
from .mdp import BatchedMDP, MDPTask, TabularMDPFamily, solve_finite_horizon
from .mujoco import DirectionTask, HalfCheetahDirFamily, HalfCheetahVelFamily, VelocityTask
from .navigation import (
    BatchedNavigation,
    NavigationFamily,
    NavTask,
    expected_standing_still_return,
    oracle_action,
)

GYM_ENVS = ("BanditEnv", "TabularMDPEnv", "NavigationEnv", "HalfCheetahVelEnv", "HalfCheetahDirEnv")

#: name -> family class: adding an environment family is one module plus one line here
FAMILIES: dict[str, type] = {
    "bandit": BanditFamily,
    "tabular-mdp": TabularMDPFamily,
    "navigation": NavigationFamily,
    "halfcheetah-vel": HalfCheetahVelFamily,
    "halfcheetah-dir": HalfCheetahDirFamily,
}


def make_family(name: str, **settings) -> Family:
    """The family registered as ``name`` in :data:`FAMILIES`, built with ``settings`` (its dataclass
    fields), e.g. ``make_family("bandit", n_arms=10)``. An unknown name or setting is a ConfigError."""
    if name not in FAMILIES:
        raise ConfigError(constraint_message("make_family", "name", f"one of {sorted(FAMILIES)}", name,
                                             "Choose one of the listed families."))
    try:
        return FAMILIES[name](**settings)
    except TypeError as err:
        raise ConfigError(f"make_family: unknown setting for {name!r} ({err}). Valid settings: "
                          f"{', '.join(FAMILIES[name].__dataclass_fields__)}.") from err


__all__ = [
    "FAMILIES",
    "BanditFamily",
    "BanditTask",
    "BatchedBandit",
    "BatchedEnv",
    "BatchedFamily",
    "BatchedMDP",
    "BatchedNavigation",
    "DirectionTask",
    "Family",
    "HalfCheetahDirFamily",
    "HalfCheetahVelFamily",
    "MDPTask",
    "MissingExtraError",
    "NavTask",
    "NavigationFamily",
    "TabularMDPFamily",
    "VelocityTask",
    "expected_standing_still_return",
    "make_family",
    "oracle_action",
    "solve_finite_horizon",
    *GYM_ENVS,
]


def __getattr__(name: str):
    """The Gymnasium environments load on first use, so this package imports without gymnasium."""
    if name in GYM_ENVS:
        from ._common import require_gymnasium

        require_gymnasium(f"metafit.rl.{name}")
        from . import gym_envs

        return getattr(gym_envs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
