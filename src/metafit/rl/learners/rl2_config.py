"""The settings of :class:`~metafit.rl.RL2` (each field's default, constraint and help in one place;
the CLI, YAML schema and invalid-value tests are generated from them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...validation import ConfigModel

__all__ = ["RL2Config"]


class RL2Config(ConfigModel):
    """RL² hyperparameters. Discount 0.99 and GAE lambda 0.3 as used for RL² bandits (the
    replications edlanglois/relearn and lucaslingle/pytorch_rl2); PPO replaces the paper's TRPO
    with common PPO settings; the GRU is smaller than the paper's 256 units because it learns
    faster per CPU second (see benchmarks/rl2.py for the values each benchmark used)."""

    name: Literal["rl2"] = "rl2"
    n_episodes: int = Field(10, ge=1, description="episodes per trial (bandits: pulls per trial); the GRU state "
                                                  "is carried across them and reset between trials")
    hidden_size: int = Field(64, ge=1, description="GRU units (the paper used 256 for bandits and MDPs; 64 "
                                                   "learned faster per CPU second in benchmarks/rl2.py)")
    cell: Literal["gru", "ln-gru"] = Field(
        "gru", description="recurrent cell: 'gru' (torch's GRU) or 'ln-gru' (layer-normalised gates, a ReLU "
                           "candidate and an update gate biased to keep the state, as in the replication "
                           "lucaslingle/pytorch_rl2; metafit.nn.recurrent.LayerNormGRU; ~2.7x slower per pass "
                           "on a CPU)")
    head_hidden_size: int = Field(
        0, ge=0, description="units of a hidden ReLU layer in the policy and value heads (0: linear heads on the "
                             "recurrent state, as in the paper)")
    value_network: Literal["shared", "separate"] = Field(
        "shared", description="the value head reads the policy's recurrent state ('shared') or a second "
                              "recurrent network of the same cell and size ('separate': the value loss no longer "
                              "shapes the policy's memory; twice the cost)")
    meta_batch_size: int = Field(250, ge=1, description="trials (one task each) collected per PPO update")
    meta_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the slow (outer) learner")
    adam_eps: float = Field(1e-5, gt=0.0, description="Adam epsilon")
    lr_decay_iterations: int = Field(
        0, ge=0, description="decay the learning rate linearly from meta_lr to final_lr_fraction * meta_lr over "
                             "this many training iterations (one PPO update each), then hold it (0: constant)")
    lr_decay_start: int = Field(0, ge=0, description="training iterations at the constant meta_lr before the "
                                                     "decay begins")
    final_lr_fraction: float = Field(0.0, ge=0.0, le=1.0, description="the learning rate after lr_decay_iterations, "
                                                                     "as a fraction of meta_lr")
    ppo_epochs: int = Field(4, ge=1, description="passes over the collected trials per update")
    ppo_minibatches: int = Field(4, ge=1, description="minibatches per epoch (whole trials each; "
                                                      "must be <= meta_batch_size)")
    ppo_clip: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clipping range of the probability ratio")
    target_kl: float = Field(0.0, ge=0.0, description="stop the epochs of an update early when the approximate "
                                                     "KL to the collecting policy exceeds this (0: never)")
    gamma: float = Field(0.99, ge=0.0, le=1.0, description="discount over the whole trial (paper: 0.99)")
    gae_lambda: float = Field(0.3, ge=0.0, le=1.0, description="GAE lambda (paper: 0.3)")
    value_coef: float = Field(0.5, ge=0.0, description="weight of the value loss")
    entropy_coef: float = Field(0.01, ge=0.0, description="weight of the entropy bonus")
    max_grad_norm: float = Field(1.0, ge=0.0, description="clip the global gradient norm to this (0: no clipping)")
    normalize_advantages: bool = Field(True, description="standardise advantages over each batch")
    normalize_values: bool = Field(True, description="the value head predicts returns standardised by running "
                                                     "statistics of the value targets (robust to reward scale)")
    time_input: bool = Field(False, description="also feed the fraction of the trial elapsed (not in the paper)")
    transition_input: bool = Field(
        False, description="discrete observations and actions only: also feed the previous transition's "
                           "(observation, action) pair one-hot, and the previous reward at that pair's index "
                           "(zeros elsewhere and at a trial's first step), so that a reward arrives already "
                           "filed under the pair that earned it -- the keys of a table of running means (tabular "
                           "MDPs: 2 x 50 inputs; bandits: 2 x arms). Nothing the agent had not seen a step "
                           "earlier (not in the paper)")
    eval_actions: Literal["sample", "greedy"] = Field(
        "sample", description="evaluate() samples actions from the policy (as the paper) or takes the most "
                              "likely action (the Gaussian mean for continuous actions)")
    action_std_init: float = Field(0.1, gt=0.0, description="initial standard deviation of the Gaussian policy "
                                                            "(continuous actions, navigation only)")
