"""The settings of :class:`~metafit.rl.MAMLRL` (each field's default, constraint and help in one
place; the CLI, YAML schema and invalid-value tests are generated from them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ...validation import ConfigModel

__all__ = ["MAMLRLConfig"]


class MAMLRLConfig(ConfigModel):
    """The ``learner`` section of a MAML-RL run (``name: maml-rl``): the policy network, the inner
    and outer updates, sampling and evaluation budgets (see :class:`~metafit.rl.MAMLRL`)."""

    name: Literal["maml-rl"] = "maml-rl"
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [100, 100], min_length=1, max_length=8,
        description="widths of the policy's ReLU hidden layers (paper: two of 100)")
    init_log_std: float = Field(0.0, ge=-5.0, le=2.0, description="initial log standard deviation of the policy "
                                                                  "(in normalised action units)")
    action_scale: float | None = Field(None, gt=0.0, description="environment action = action_scale * policy "
                                       "action; None: the family's action bound (navigation max_action, "
                                       "else the action space's high)")
    inner_lr: float = Field(0.1, gt=0.0, description="inner policy-gradient step size (paper: 0.1 for navigation)")
    inner_steps: int = Field(1, ge=0, le=10, description="inner policy-gradient steps during meta-training "
                                                        "(0: plain multi-task policy, no adaptation)")
    eval_steps: int = Field(3, ge=0, le=20, description="inner steps evaluate() reports after (points 0..eval_steps)")
    inner_objective: Literal["lvc", "reinforce"] = Field(
        "lvc", description="inner loss: 'reinforce' -mean(log pi * A) (MAML), 'lvc' -mean(pi / pi_old * A) "
                           "(ProMP; same gradient, curvature includes the sampling distribution)")
    meta_batch_size: int = Field(20, ge=1, description="tasks per outer update (paper: 20 for navigation)")
    trajectories_per_task: int = Field(20, ge=1, description="trajectories per task and inner step (paper: 20)")
    eval_trajectories_per_task: int | None = Field(None, ge=1, description="trajectories per task and point in "
                                                   "evaluate(); None: trajectories_per_task")
    eval_task_chunk: int = Field(50, ge=1, description="tasks adapted together in evaluate() (memory bound)")
    gamma: float = Field(0.99, gt=0.0, le=1.0, description="discount factor")
    gae_lambda: float = Field(1.0, ge=0.0, le=1.0, description="GAE lambda (1: discounted return minus baseline)")
    baseline_reg: float = Field(1e-5, gt=0.0, description="ridge coefficient of the linear feature baseline")
    normalize_advantages: bool = Field(True, description="standardise advantages per task (rllab center_adv)")
    meta_lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the outer update")
    ppo_epochs: int = Field(5, ge=1, description="outer Adam steps per sampled meta-batch")
    clip_ratio: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clipping of the post-update likelihood ratio")
    max_grad_norm: float | None = Field(None, gt=0.0, description="clip the meta-gradient norm (None: no clipping)")
