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
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, TaskError, constraint_message
from ...nn.recurrent import make_recurrent_core
from ...validation import parse_config
from ..envs.base import BatchedFamily, Family
from .base import RLLearner
from .ppo import RL2Rollout, gae, ppo_loss
from .rl2_config import RL2Config

__all__ = ["RL2", "RL2Config", "RL2Rollout", "gae", "ppo_loss"]

OWNER = "RL2"
_SUPPORTED = "family with a batched environment (BanditFamily, TabularMDPFamily or NavigationFamily)"


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


def _family_spec(family: Family) -> _Spec:
    """Read through the :class:`~metafit.rl.envs.base.BatchedFamily` protocol: any family with a
    batched environment works (bandits have the single state 0 and one-step episodes)."""
    if not isinstance(family, BatchedFamily):
        raise ConfigError(constraint_message(OWNER, "family", f"a {_SUPPORTED}", type(family).__name__,
                                             "Build RL2 with one of these families (metafit.rl.make_family)."))
    return _Spec(int(family.observation_size), bool(family.discrete_observations), int(family.action_size),
                 bool(family.discrete_actions), int(family.horizon), family.task_type, float(family.action_bound))


class RL2(RLLearner):
    """RL² on a bandit, tabular-MDP or navigation family (see the module docstring).

    ``evaluate(tasks, generator)`` plays one trial per task and returns the per-episode returns
    ``[len(tasks), n_episodes]``; actions are sampled from the policy unless
    ``eval_actions="greedy"``. The score of a trial is the sum over its episodes
    (``score_reduction = "sum"``), as in the paper's tables.

    ``RL2(config, family)``: ``config`` is an :class:`RL2Config` or a mapping of its fields
    (validated), ``family`` a family with a batched environment; settings that do not fit the
    family (e.g. ``transition_input`` with continuous observations) are a ConfigError."""

    name = "rl2"
    Config = RL2Config
    score_reduction = "sum"
    devices = ("cpu", "cuda")

    def __init__(self, config: RL2Config | dict, family: Family) -> None:
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
        self.input_dim = spec.obs_dim + spec.action_dim + 2 + 2 * self.pair_dim + int(config.time_input)
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
        """``"episode 1"`` ... ``"episode <n_episodes>"``: the episodes of a trial."""
        return [f"episode {i + 1}" for i in range(self.config.n_episodes)]

    def optimizer_state_dict(self) -> dict:
        """The Adam optimizer's ``state_dict()``."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Load ``state`` (from :meth:`optimizer_state_dict`) into the Adam optimizer."""
        self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def evaluate(self, tasks: list, generator: torch.Generator) -> torch.Tensor:
        """Per-episode returns ``[len(tasks), n_episodes]`` (on the CPU) of one trial in each of
        ``tasks``, the environment seed and sampled actions drawn from ``generator``."""
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
        """Restart the learning-rate schedule's iteration count (see :meth:`RLLearner.start_new_run`)."""
        self.iterations_done.zero_()  # the value statistics stay: they describe the returns, not the run

    def current_lr(self) -> float:
        """The learning rate the next update uses (``meta_lr``, or its linear decay)."""
        cfg = self.config
        if cfg.lr_decay_iterations == 0:
            return cfg.meta_lr
        frac = min(max(int(self.iterations_done) - cfg.lr_decay_start, 0) / cfg.lr_decay_iterations, 1.0)
        return cfg.meta_lr * (1.0 - (1.0 - cfg.final_lr_fraction) * frac)

    @property
    def device(self) -> torch.device:
        return self._out(self.value_head).weight.device

    def train_iteration(self, generator: torch.Generator) -> dict[str, float]:
        """Collect ``meta_batch_size`` trials on tasks freshly sampled from ``generator`` (which also
        draws the environment noise, actions and minibatch order) and make one PPO update; returns
        the log's statistics (losses, ``return``, ``env_steps``, ``updates``, ``lr``, ``seconds``)."""
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
        """The observations ``obs`` (``[N]`` state indices or ``[N, obs_dim]``) as the network reads
        them, ``[N, obs_dim]`` (one-hot for discrete states)."""
        dtype = self._out(self.value_head).weight.dtype
        if self.spec.discrete_obs:
            return nn.functional.one_hot(obs.long(), self.spec.obs_dim).to(dtype)
        return obs.to(dtype)

    def encode(self, obs: torch.Tensor, prev_action: torch.Tensor, prev_reward: torch.Tensor,
               prev_done: torch.Tensor, t: int, prev_obs: torch.Tensor | None = None) -> torch.Tensor:
        """The GRU input ``[N, input_dim]`` of one step ``t`` of the trial: the observation ``obs``,
        ``prev_action`` (one-hot, or the clipped continuous action / max_action; already encoded
        ``[N, action_dim]``), ``prev_reward`` and ``prev_done`` (``[N]`` each), and optionally the
        elapsed fraction of the trial ``t / max_steps`` (time_input). With
        transition_input, also the one-hot of the pair (``prev_obs``, the previous observation already
        encoded ``[N, obs_dim]``; previous action), flattened observation-major, and the previous reward
        times that one-hot."""
        dtype = self._out(self.value_head).weight.dtype
        o = self.encode_obs(obs)
        parts = [o, prev_action.to(dtype), prev_reward.to(dtype).unsqueeze(1), prev_done.to(dtype).unsqueeze(1)]
        if self.config.transition_input:
            pair = (prev_obs.to(dtype).unsqueeze(2) * prev_action.to(dtype).unsqueeze(1)).flatten(1)
            parts += [pair, pair * prev_reward.to(dtype).unsqueeze(1)]
        if self.config.time_input:
            parts.append(o.new_full((o.shape[0], 1), t / self.max_steps))
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
        """One step of the policy's recurrent core on inputs ``x [N, input_dim]`` from state
        ``h [N, H]``; returns the next state (for ``cell="gru"`` what ``nn.GRUCell`` computes)."""
        return self.gru.step(x, h)

    def sequence(self, inputs: torch.Tensor) -> torch.Tensor:
        """Recurrent states ``[T, N, H]`` of whole trials from stored inputs ``[T, N, D]`` (zero
        initial state: a trial starts from scratch)."""
        return self.gru.sequence(inputs)

    @torch.no_grad()
    def rollout(self, tasks: list, generator: torch.Generator, greedy: bool = False) -> RL2Rollout:
        """Play one trial of ``n_episodes`` episodes in every one of ``tasks``, all in parallel, and
        return the :class:`RL2Rollout` (inputs, actions, log-probabilities, values, rewards, masks,
        per-episode returns). ``generator`` draws the environment seed and the actions; with
        ``greedy`` the most likely action (or the Gaussian mean) is taken instead of a sample."""
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
        # read only with transition_input
        prev_o = torch.zeros(N, spec.obs_dim, dtype=dtype, device=dev)
        prev_r = torch.zeros(N, dtype=dtype, device=dev)
        prev_d = torch.zeros(N, dtype=dtype, device=dev)
        alive = torch.ones(N, dtype=torch.bool, device=dev)
        ep_returns = torch.zeros(N, n_ep, dtype=torch.float32, device=dev)
        xs, acts, logps, vals, rews, masks = [], [], [], [], [], []
        for t in range(self.max_steps):
            x = self.encode(obs, prev_a, prev_r, prev_d, t, prev_o)
            if self.config.transition_input:
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
        """The PPO loss on the trials ``idx`` of the rollout ``ro`` (all when None), recomputing the
        GRU over the whole trials, with the trials' ``advantages`` and value ``targets``
        (``[T, N]`` each); returns ``(loss, statistics)``."""
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
