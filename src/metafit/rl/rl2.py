"""RL²: fast reinforcement learning via slow reinforcement learning (Duan et al. 2016).

A recurrent policy plays a *trial* -- ``n_episodes`` episodes in one task -- and its GRU state is
carried across the episodes of the trial (it is reset only when a new trial starts), so the
network itself has to learn to explore in the first episodes and exploit what it found in the
later ones. At every step the GRU reads

    (observation, previous action, previous reward, previous done flag)

with discrete observations and actions one-hot encoded (bandits have the single state 0; tabular
MDPs the state index; navigation the 2D position and, for the previous action, the clipped 2D
displacement divided by ``max_action``). At the first step of a trial the previous action,
reward and done flag are zeros. A linear head on the GRU state gives the policy (categorical
logits, or the mean of a Gaussian with a learned state-independent standard deviation for
navigation) and another one the value. Two options change the network, not the protocol:
``cell="ln-gru"`` replaces torch's GRU by a layer-normalised GRU with a ReLU candidate
(:class:`metafit.nn.recurrent.LayerNormGRU`), and ``value_network="separate"`` gives the value
head its own recurrent network reading the same inputs (the policy's memory is then shaped by the
policy loss alone; the RL² replication lucaslingle/pytorch_rl2 trains two networks this way).

The "slow" learner is PPO (the paper used TRPO) with generalised advantage estimation over whole
trials: the trial is the RL episode, so only its end is terminal -- the end of an inner episode
is not (the value keeps bootstrapping across episodes; that is what rewards exploration).
``meta_batch_size`` trials are played in parallel in the batched environment (one task per
environment), the GRU is stepped one step at a time while collecting, and the PPO epochs
recompute the whole trial with ``nn.GRU`` (back-propagation through the full trial) on the
stored inputs, with the same weights.

Determinism: every random choice (tasks, environment noise, actions, minibatch order) comes from
the ``torch.Generator`` passed in; the environment's seed is drawn from it.

Devices: move the learner with ``.to(device)``; environments, rollouts and the PPO update then
run there (tasks are sampled on the CPU and copied once). On a GPU the action noise comes from a
generator on that device seeded from the one passed in, so runs are reproducible per device but
not bit-identical across devices.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError, TaskError, constraint_message
from ..nn.recurrent import make_recurrent_core
from ..validation import ConfigModel, parse_config
from .bandits import BanditFamily, BanditTask
from .learner import RLLearner, register_rl_learner
from .mdp import MDPTask, TabularMDPFamily
from .navigation import NavigationFamily, NavTask

__all__ = ["RL2", "RL2Config", "RL2Rollout", "gae", "ppo_loss"]

OWNER = "RL2"
_SUPPORTED = "BanditFamily, TabularMDPFamily or NavigationFamily"


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
    prev_obs_input: bool = Field(
        False, description="also feed the previous step's observation (one-hot state; zeros at a trial's first "
                           "step), so that the state, action and reward of the last transition arrive together "
                           "instead of the state having to be remembered for one step (not in the paper)")
    transition_input: bool = Field(
        False, description="discrete observations and actions only: also feed the previous transition's "
                           "(observation, action) pair one-hot, and the previous reward at that pair's index "
                           "(zeros elsewhere and at a trial's first step), so that a reward arrives already "
                           "filed under the pair that earned it -- the keys of a table of running means (tabular "
                           "MDPs: 2 x 50 inputs; bandits: 2 x arms). Nothing the agent had not seen a step "
                           "earlier (not in the paper)")
    episode_time_input: bool = Field(
        False, description="also feed the fraction of the current episode elapsed (step in the episode / the "
                           "family's horizon), so that the policy need not count steps to plan within a "
                           "finite-horizon episode (not in the paper)")
    eval_actions: Literal["sample", "greedy"] = Field(
        "sample", description="evaluate() samples actions from the policy (as the paper) or takes the most "
                              "likely action (the Gaussian mean for continuous actions)")
    action_std_init: float = Field(0.1, gt=0.0, description="initial standard deviation of the Gaussian policy "
                                                            "(continuous actions, navigation only)")


@dataclass(frozen=True)
class _Spec:
    """What the network sees of a family: sizes, kinds and the longest trial."""

    obs_dim: int
    discrete_obs: bool
    action_dim: int  # number of discrete actions, or the dimension of a continuous action
    discrete_actions: bool
    horizon: int  # steps per episode (at most, for navigation)
    task_cls: type
    max_action: float = 1.0


def _family_spec(family: Any) -> _Spec:
    if isinstance(family, BanditFamily):
        return _Spec(1, True, family.n_arms, True, 1, BanditTask)
    if isinstance(family, TabularMDPFamily):
        return _Spec(family.n_states, True, family.n_actions, True, family.horizon, MDPTask)
    if isinstance(family, NavigationFamily):
        return _Spec(2, False, 2, False, family.horizon, NavTask, float(family.max_action))
    raise ConfigError(constraint_message(OWNER, "family", f"a {_SUPPORTED}", type(family).__name__,
                                         "Build RL2 with one of these families (metafit.rl.make_family)."))


@dataclass
class RL2Rollout:
    """One trial per environment, time-major. ``inputs [T, N, D]`` (what the GRU read),
    ``actions [T, N]`` (long) or ``[T, N, A]`` (float), ``log_probs``/``values``/``rewards``
    ``[T, N]`` (values in return units), ``mask [T, N]`` (True while the trial lasts),
    ``episode_returns [N, n_episodes]``."""

    inputs: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    episode_returns: torch.Tensor

    @property
    def env_steps(self) -> int:
        return int(self.mask.sum())


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over time-major ``[T, N]`` tensors.

    ``mask[t, i]`` is True while trial ``i`` lasts (a prefix of the time axis); the last step of a
    trial is terminal (no bootstrap), nothing else is. Returns ``(advantages, value_targets)``,
    zero where ``mask`` is False."""
    T = rewards.shape[0]
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in range(T - 1, -1, -1):
        nxt_m = m[t + 1] if t + 1 < T else torch.zeros_like(m[t])
        nxt_v = values[t + 1] if t + 1 < T else torch.zeros_like(values[t])
        delta = rewards[t] + gamma * nxt_v * nxt_m - values[t]
        last = (delta + gamma * lam * nxt_m * last) * m[t]
        adv[t] = last
    return adv, (adv + values) * m


def ppo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
             values: torch.Tensor, value_targets: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
             clip: float, value_coef: float, entropy_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO objective to minimise, averaged over the steps where ``mask`` is True:
    ``-min(r A, clip(r, 1-eps, 1+eps) A) + value_coef * 0.5 (V - target)^2 - entropy_coef * H``
    with ``r = exp(log_probs - old_log_probs)``. Returns the loss and detached statistics."""
    m = mask.to(log_probs.dtype)
    n = m.sum().clamp_min(1.0)
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    policy_loss = -(surrogate * m).sum() / n
    value_loss = 0.5 * (((values - value_targets) ** 2) * m).sum() / n
    ent = (entropy * m).sum() / n
    loss = policy_loss + value_coef * value_loss - entropy_coef * ent
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
            "entropy": ent.detach(),
            "approx_kl": (((ratio - 1.0) - log_ratio) * m).sum() / n,  # the low-variance k3 estimator
            "clip_fraction": (((ratio - 1.0).abs() > clip).to(m.dtype) * m).sum() / n,
        }
    return loss, stats


@register_rl_learner
class RL2(RLLearner):
    """RL² on a bandit, tabular-MDP or navigation family (see the module docstring).

    ``evaluate(tasks, generator)`` plays one trial per task and returns the per-episode returns
    ``[len(tasks), n_episodes]``; actions are sampled from the policy unless
    ``eval_actions="greedy"``. The score of a trial is the sum over its episodes
    (``score_reduction = "sum"``), as in the paper's tables."""

    name = "rl2"
    Config = RL2Config
    score_reduction = "sum"
    devices = ("cpu", "cuda")

    def __init__(self, config: RL2Config | dict, family: Any) -> None:
        config = parse_config(RL2Config, config, "learner")
        super().__init__(config, family)
        self.spec = spec = _family_spec(family)
        if config.ppo_minibatches > config.meta_batch_size:
            raise ConfigError(constraint_message(
                OWNER, "ppo_minibatches", f"<= meta_batch_size ({config.meta_batch_size})", config.ppo_minibatches,
                "Lower ppo_minibatches or raise meta_batch_size (each minibatch holds whole trials)."))
        if config.transition_input and not (spec.discrete_obs and spec.discrete_actions):
            raise ConfigError(constraint_message(
                OWNER, "transition_input", "false for a family with continuous observations or actions", True,
                "Use transition_input with bandits or tabular MDPs only (it one-hot encodes state-action pairs)."))
        self.max_steps = config.n_episodes * spec.horizon
        self.pair_dim = spec.obs_dim * spec.action_dim if config.transition_input else 0
        self.input_dim = (spec.obs_dim * (1 + int(config.prev_obs_input)) + spec.action_dim + 2
                          + 2 * self.pair_dim + int(config.time_input) + int(config.episode_time_input))
        H = config.hidden_size
        self.gru = make_recurrent_core(config.cell, self.input_dim, H)
        # the critic's own recurrent network (value_network="separate"), else None: it reads the policy's
        self.value_gru = make_recurrent_core(config.cell, self.input_dim, H) \
            if config.value_network == "separate" else None
        self.policy_head = self._head(H, spec.action_dim, config.head_hidden_size)
        self.value_head = self._head(H, 1, config.head_hidden_size)
        if spec.discrete_actions:
            self.register_parameter("log_std", None)
        else:
            self.log_std = nn.Parameter(torch.full((spec.action_dim,), math.log(config.action_std_init)))
        with torch.no_grad():  # small initial policy and value outputs (near-uniform actions)
            self._out(self.policy_head).weight.mul_(0.01)
            self._out(self.policy_head).bias.zero_()
            self._out(self.value_head).weight.mul_(0.1)
            self._out(self.value_head).bias.zero_()
        # running statistics of the value targets (normalize_values); part of the state dict
        self.register_buffer("value_mean", torch.zeros(()))
        self.register_buffer("value_std", torch.ones(()))
        self.register_buffer("value_stats_count", torch.zeros((), dtype=torch.long))
        # training iterations made so far: drives the learning-rate schedule, so a resumed run continues it
        self.register_buffer("iterations_done", torch.zeros((), dtype=torch.long))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.meta_lr, eps=config.adam_eps)

    @staticmethod
    def _head(in_features: int, out_features: int, hidden: int) -> nn.Module:
        """A linear head, or with ``hidden > 0`` one hidden ReLU layer before it."""
        if hidden == 0:
            return nn.Linear(in_features, out_features)
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    @staticmethod
    def _out(head: nn.Module) -> nn.Linear:
        """The output layer of a head."""
        return head[-1] if isinstance(head, nn.Sequential) else head

    # -------------------------------------------------------------------------------- interface

    def eval_points(self) -> list[str]:
        return [f"episode {i + 1}" for i in range(self.config.n_episodes)]

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def evaluate(self, tasks: list, generator: torch.Generator) -> torch.Tensor:
        """Per-episode returns ``[len(tasks), n_episodes]`` (on the CPU) of one trial in each task."""
        greedy = self.config.eval_actions == "greedy"
        return self.rollout(tasks, generator, greedy=greedy).episode_returns.cpu()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the learning-rate schedule existed lack the counter: their
        # runs had a constant rate, so resuming them starts the count at zero
        key = prefix + "iterations_done"
        if key not in state_dict:
            state_dict = dict(state_dict)
            state_dict[key] = torch.zeros((), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def start_new_run(self) -> None:
        self.iterations_done.zero_()  # the value statistics stay: they describe the returns, not the run

    def current_lr(self) -> float:
        """The learning rate the next update uses (``meta_lr``, or its linear decay)."""
        cfg = self.config
        if cfg.lr_decay_iterations == 0:
            return cfg.meta_lr
        frac = min(max(int(self.iterations_done) - cfg.lr_decay_start, 0) / cfg.lr_decay_iterations, 1.0)
        return cfg.meta_lr * (1.0 - (1.0 - cfg.final_lr_fraction) * frac)

    def load_widened(self, state_dict: dict[str, torch.Tensor], optimizer_state: dict | None = None) -> None:
        """Load the weights of a *narrower* network (same config but ``hidden_size``) so that this
        network computes exactly what that one did (function-preserving widening; Net2Net, Chen et
        al. 2016, replicates units instead, here the new units' outgoing weights start at zero).

        The first ``h`` units of this GRU are the old network's units with its weights; the extra
        units keep this network's fresh initialisation for what they *read* (inputs and every unit's
        state), while everything they *write* is zero: the old units' recurrent weights from them and
        the heads' weights from them. The old units, the policy and the value are therefore unchanged
        at every step, whatever the new units hold, and the new units start learning at once (the
        gradient of a zero outgoing weight is the unit's state, which is not zero). ``optimizer_state``
        (an ``optimizer.state_dict()`` of the narrower network's Adam) is embedded the same way: the old
        entries' moments are kept and the new entries' are zero. Only ``cell="gru"`` with
        ``value_network="shared"``."""
        cfg = self.config
        if cfg.cell != "gru" or cfg.value_network != "shared":
            raise ConfigError(constraint_message(
                OWNER, "cell / value_network", "'gru' / 'shared' to widen kept weights",
                f"{cfg.cell!r} / {cfg.value_network!r}", "Widen a network with the default cell and a shared critic."))
        H2 = cfg.hidden_size
        key = "gru.weight_hh_l0"
        if key not in state_dict:
            raise ConfigError(f"{OWNER}: the weights to widen have no {key!r}: they are not an RL2 network with "
                              "cell='gru'. Pass the state dict of an RL2 learner of the same family.")
        H = state_dict[key].shape[1]
        if H >= H2:
            raise ConfigError(constraint_message(
                OWNER, "hidden_size", f"larger than the kept weights' {H} units to widen them", H2,
                "Set hidden_size above the kept network's, or load the weights with load_state_dict."))
        gate_rows = torch.cat([torch.arange(g * H2, g * H2 + H) for g in range(3)])
        first_head_layers = [f"{h}.0.weight" if cfg.head_hidden_size else f"{h}.weight"
                             for h in ("policy_head", "value_head")]

        def old_index(name: str) -> tuple:
            """Where the old tensor's entries sit in this network's tensor ``name``."""
            if name == "gru.weight_hh_l0":
                return (gate_rows, slice(0, H))
            if name.startswith("gru."):
                return (gate_rows,)
            if name in first_head_layers:
                return (slice(None), slice(0, H))
            return (Ellipsis,)

        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        if missing:
            raise ConfigError(f"{OWNER}: the weights to widen lack {missing}: they come from a network with other "
                              "options. Pass the same options (except hidden_size) the run that kept them used.")
        new_state = {}
        with torch.no_grad():
            for name, mine in own.items():
                old = state_dict[name]
                idx = old_index(name)
                if old.shape != mine[idx].shape:
                    raise ConfigError(f"{OWNER}: {name!r} has shape {tuple(old.shape)} in the weights to widen, "
                                      f"{tuple(mine[idx].shape)} expected here: the networks differ in more than "
                                      "hidden_size. Pass the options the run that kept them used.")
                if idx == (Ellipsis,):
                    new_state[name] = old.clone()
                    continue
                out = mine.clone()
                if name == "gru.weight_hh_l0":
                    out[gate_rows, H:] = 0  # the old units do not read the new ones
                elif name in first_head_layers:
                    out[:, H:] = 0          # the heads do not read the new units
                out[idx] = old.to(out)
                new_state[name] = out
        self.load_state_dict(new_state)
        if optimizer_state is None:
            return
        names = [n for n, _ in self.named_parameters()]
        params = dict(self.named_parameters())
        state = {}
        for pid, st in optimizer_state.get("state", {}).items():
            name = names[int(pid)]
            p = params[name]
            idx = old_index(name)
            entry = {}
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                    out = torch.zeros_like(p)
                    out[idx] = v.to(out)
                    entry[k] = out
                else:
                    entry[k] = v.clone() if torch.is_tensor(v) else v
            state[int(pid)] = entry
        self.load_optimizer_state_dict({"state": state, "param_groups": self.optimizer_state_dict()["param_groups"]})

    @property
    def device(self) -> torch.device:
        return self._out(self.value_head).weight.device

    def train_iteration(self, generator: torch.Generator) -> dict[str, float]:
        """Collect ``meta_batch_size`` trials on freshly sampled tasks and make one PPO update."""
        cfg = self.config
        t0 = time.perf_counter()
        tasks = self.family.sample_tasks(cfg.meta_batch_size, generator)
        with torch.no_grad():
            ro = self.rollout(tasks, generator, greedy=False)
            adv, targets = gae(ro.rewards, ro.values, ro.mask, cfg.gamma, cfg.gae_lambda)
            if cfg.normalize_values:
                self._update_value_stats(targets[ro.mask])
            if cfg.normalize_advantages:
                valid = adv[ro.mask]
                adv = (adv - valid.mean()) / (valid.std(unbiased=False) + 1e-8) * ro.mask
        n = ro.mask.shape[1]
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}  # summed on the device: one sync per minibatch (target_kl) at most
        updates = 0
        stop = False
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for idx in order.to(self.device).chunk(cfg.ppo_minibatches):
                loss, stats = self.loss(ro, adv, targets, idx)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(self.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                updates += 1
                for k, v in stats.items():
                    sums[k] = sums[k] + v if k in sums else v
                if cfg.target_kl > 0 and float(stats["approx_kl"]) > cfg.target_kl:
                    stop = True
                    break
            if stop:
                break
        self.iterations_done.add_(1)
        out = {k: float(v) / updates for k, v in sums.items()}
        out.update({
            "return": float(ro.episode_returns.sum(1).mean()),
            "env_steps": float(ro.env_steps),
            "updates": float(updates),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        })
        return out

    # ------------------------------------------------------------------------------ the network

    def _check_tasks(self, tasks: Any) -> None:
        cls = self.spec.task_cls
        if not isinstance(tasks, (list, tuple)) or len(tasks) == 0 or not all(isinstance(t, cls) for t in tasks):
            got = type(tasks).__name__ if not isinstance(tasks, (list, tuple)) else \
                f"{len(tasks)} items of {sorted({type(t).__name__ for t in tasks})}"
            raise TaskError(constraint_message(OWNER, "tasks", f"a non-empty list of {cls.__name__}", got,
                                               "Pass tasks from the learner's family: family.sample_tasks(n)."))

    def _make_env(self, tasks: list, generator: torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if self.spec.discrete_obs:  # its own sampled actions are valid: no per-step check (a device sync)
            return self.family.batched(tasks, 1, seed=seed, device=self.device, check_actions=False)
        return self.family.batched(tasks, 1, device=self.device)  # navigation: deterministic dynamics

    def _action_generator(self, generator: torch.Generator) -> torch.Generator:
        """``generator`` itself on the CPU; on another device a generator there, seeded from it."""
        if self.device.type == "cpu":
            return generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.Generator(device=self.device).manual_seed(seed)

    def encode_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """An observation as the network reads it ``[N, obs_dim]`` (one-hot for discrete states)."""
        dtype = self._out(self.value_head).weight.dtype
        if self.spec.discrete_obs:
            return nn.functional.one_hot(obs.long(), self.spec.obs_dim).to(dtype)
        return obs.to(dtype)

    def encode(self, obs: torch.Tensor, prev_action: torch.Tensor, prev_reward: torch.Tensor,
               prev_done: torch.Tensor, t: int, episode_step: torch.Tensor | None = None,
               prev_obs: torch.Tensor | None = None) -> torch.Tensor:
        """The GRU input ``[N, input_dim]`` of one step: observation, optionally the previous
        observation (``prev_obs``, already encoded ``[N, obs_dim]``; prev_obs_input), previous action
        (one-hot, or the clipped continuous action / max_action), previous reward and done flag, and
        optionally the elapsed fraction of the trial and of the episode (``episode_step [N]``: steps
        taken in the current episode). ``prev_action`` is already encoded ``[N, action_dim]``. With
        transition_input, also the one-hot of the pair (``prev_obs``, previous action), flattened
        observation-major, and the previous reward times that one-hot."""
        dtype = self._out(self.value_head).weight.dtype
        o = self.encode_obs(obs)
        parts = [o] + ([prev_obs.to(dtype)] if self.config.prev_obs_input else [])
        parts += [prev_action.to(dtype), prev_reward.to(dtype).unsqueeze(1), prev_done.to(dtype).unsqueeze(1)]
        if self.config.transition_input:
            pair = (prev_obs.to(dtype).unsqueeze(2) * prev_action.to(dtype).unsqueeze(1)).flatten(1)
            parts += [pair, pair * prev_reward.to(dtype).unsqueeze(1)]
        if self.config.time_input:
            parts.append(o.new_full((o.shape[0], 1), t / self.max_steps))
        if self.config.episode_time_input:
            parts.append((episode_step.to(dtype) / self.spec.horizon).unsqueeze(1))
        return torch.cat(parts, dim=1)

    def _value(self, h: torch.Tensor) -> torch.Tensor:
        """Value in return units from GRU states ``[..., H]``."""
        v = self.value_head(h).squeeze(-1)
        if self.config.normalize_values:
            v = v * self.value_std + self.value_mean
        return v

    def _dist(self, h: torch.Tensor):
        out = self.policy_head(h)
        if self.spec.discrete_actions:
            return torch.distributions.Categorical(logits=out)
        return torch.distributions.Normal(out, self.log_std.exp().expand_as(out))

    def _log_prob_entropy(self, dist, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.discrete_actions:
            return dist.log_prob(actions), dist.entropy()
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)

    def _sample(self, dist, generator: torch.Generator, greedy: bool) -> torch.Tensor:
        if self.spec.discrete_actions:
            if greedy:
                return dist.logits.argmax(-1)
            return torch.multinomial(dist.probs, 1, generator=generator).squeeze(1)
        if greedy:
            return dist.mean
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype, device=dist.mean.device)
        return dist.mean + dist.stddev * noise

    def _encode_action(self, actions: torch.Tensor) -> torch.Tensor:
        if self.spec.discrete_actions:
            return nn.functional.one_hot(actions, self.spec.action_dim)
        m = self.spec.max_action
        return actions.clamp(-m, m) / m

    def step_hidden(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One step of the policy's recurrent core (for ``cell="gru"`` what ``nn.GRUCell`` computes)."""
        return self.gru.step(x, h)

    def sequence(self, inputs: torch.Tensor) -> torch.Tensor:
        """Recurrent states ``[T, N, H]`` of whole trials from stored inputs ``[T, N, D]`` (zero
        initial state: a trial starts from scratch)."""
        return self.gru.sequence(inputs)

    @torch.no_grad()
    def rollout(self, tasks: list, generator: torch.Generator, greedy: bool = False) -> RL2Rollout:
        """Play one trial of ``n_episodes`` episodes in every task, all in parallel."""
        self._check_tasks(tasks)
        spec, n_ep = self.spec, self.config.n_episodes
        env = self._make_env(list(tasks), generator)
        agen = self._action_generator(generator)
        N = env.num_envs
        dtype, dev = self._out(self.value_head).weight.dtype, self.device
        obs = env.reset()
        h = torch.zeros(N, self.config.hidden_size, dtype=dtype, device=dev)
        hv = h if self.value_gru is None else torch.zeros_like(h)  # the critic's state
        prev_a = torch.zeros(N, spec.action_dim, dtype=dtype, device=dev)
        # read only with prev_obs_input or transition_input
        prev_o = torch.zeros(N, spec.obs_dim, dtype=dtype, device=dev)
        prev_r = torch.zeros(N, dtype=dtype, device=dev)
        prev_d = torch.zeros(N, dtype=dtype, device=dev)
        alive = torch.ones(N, dtype=torch.bool, device=dev)
        ep_step = torch.zeros(N, dtype=torch.long, device=dev)  # steps taken in the current episode
        ep_returns = torch.zeros(N, n_ep, dtype=torch.float32, device=dev)
        xs, acts, logps, vals, rews, masks = [], [], [], [], [], []
        for t in range(self.max_steps):
            x = self.encode(obs, prev_a, prev_r, prev_d, t, ep_step, prev_o)
            if self.config.prev_obs_input or self.config.transition_input:
                prev_o = self.encode_obs(obs)
            h = self.step_hidden(x, h)
            if self.value_gru is not None:
                hv = self.value_gru.step(x, hv)
            dist = self._dist(h)
            a = self._sample(dist, agen, greedy)
            logp, _ = self._log_prob_entropy(dist, a)
            episode = env.episode_count.clone()
            obs, r, term, trunc, _ = env.step(a)
            r = r.to(torch.float32)
            ep_returns.scatter_add_(1, episode.clamp(max=n_ep - 1).unsqueeze(1), (r * alive).unsqueeze(1))
            xs.append(x)
            acts.append(a)
            logps.append(logp)
            vals.append(self._value(h if self.value_gru is None else hv))
            rews.append(r.to(dtype) * alive)
            masks.append(alive)
            prev_a = self._encode_action(a).to(dtype)
            prev_r = r.to(dtype)
            prev_d = (term | trunc).to(dtype)
            if self.config.episode_time_input:
                ep_step = torch.where(term | trunc, 0, ep_step + 1)
            alive = alive & (env.episode_count < n_ep)
            if not spec.discrete_obs and not bool(alive.any()):  # navigation: trials may end early
                break
        return RL2Rollout(torch.stack(xs), torch.stack(acts), torch.stack(logps), torch.stack(vals),
                          torch.stack(rews), torch.stack(masks), ep_returns)

    def _update_value_stats(self, targets: torch.Tensor) -> None:
        mean, std = targets.mean(), targets.std(unbiased=False).clamp_min(1e-4)
        if int(self.value_stats_count) == 0:
            self.value_mean.copy_(mean)
            self.value_std.copy_(std)
        else:  # slow exponential average, so the value head is not chasing a moving target
            w = 0.1
            self.value_mean.mul_(1 - w).add_(w * mean)
            self.value_std.mul_(1 - w).add_(w * std)
        self.value_stats_count.add_(1)

    def loss(self, ro: RL2Rollout, advantages: torch.Tensor, targets: torch.Tensor,
             idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The PPO loss on the trials ``idx`` of a rollout (all when None), recomputing the GRU
        over the whole trials."""
        if idx is None:
            idx = torch.arange(ro.mask.shape[1], device=ro.mask.device)
        x = ro.inputs[:, idx]
        h = self.sequence(x)
        dist = self._dist(h)
        logp, ent = self._log_prob_entropy(dist, ro.actions[:, idx])
        v = self.value_head(h if self.value_gru is None else self.value_gru.sequence(x)).squeeze(-1)
        tgt = targets[:, idx]
        if self.config.normalize_values:  # the value loss in standardised units
            tgt = (tgt - self.value_mean) / self.value_std
        return ppo_loss(logp, ro.log_probs[:, idx], advantages[:, idx], v, tgt, ent, ro.mask[:, idx],
                        self.config.ppo_clip, self.config.value_coef, self.config.entropy_coef)
