"""Meta-RL learners (this room: what learns across tasks). One module per learner and the explicit
registry :data:`RL_LEARNERS`, as :mod:`metafit.algorithms` does for few-shot learners: adding a
learner is one module plus one line here, and ``metafit rl train``, checkpoints and the contract
tests pick it up. Every learner implements :class:`~metafit.rl.learners.base.RLLearner`. This room
may import the base modules, :mod:`metafit.nn` and :mod:`metafit.rl.envs`.
"""

from __future__ import annotations

from ...validation import named_section
from .base import RLLearner
from .maml_rl import MAMLRL, MAMLRLConfig
from .rl2 import RL2, RL2Config

__all__ = ["MAMLRL", "MAMLRLConfig", "RL2", "RL2Config", "RLLearner", "RL_LEARNERS", "get_rl_learner"]

#: learner name (the ``learner.name`` of an RL run config) -> class
RL_LEARNERS: dict[str, type[RLLearner]] = {
    RL2.name: RL2,
    MAMLRL.name: MAMLRL,
}


def get_rl_learner(name: str) -> type[RLLearner]:
    """The learner class registered under ``name``; a one-line ConfigError naming the choices otherwise."""
    if not isinstance(name, str) or name not in RL_LEARNERS:
        named_section({"name": name}, "learner", RL_LEARNERS, "rl2")  # the one-line error
    return RL_LEARNERS[name]
