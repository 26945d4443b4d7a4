"""MAML for reinforcement learning (Finn, Abbeel & Levine, 2017, section 5.3), with a ProMP-style
clipped outer objective (Rothfuss et al., 2019).

What is implemented (variant choices stated where the papers' code differ):

* **Policy**: Gaussian MLP, ``hidden=[100, 100]`` ReLU layers, a linear mean and a learned
  state-independent log standard deviation (initial std 1), Glorot-uniform weights and zero biases
  as in rllab. The policy acts in normalised units: the environment receives
  ``action_scale * a`` (navigation: ``action_scale = max_action = 0.1``, which is what rllab's
  ``normalize`` wrapper did for MAML's point environment; the environment then clips per axis).
* **Inner step**: vanilla policy gradient with a **linear feature baseline fitted per task** on
  the inner trajectories (rllab's ``LinearFeatureBaseline``: features ``[o, o^2, t/100, (t/100)^2,
  (t/100)^3, 1]`` with ``o`` clipped to ``[-10, 10]``, ridge ``1e-5`` on the normal equations),
  GAE advantages (``gae_lambda = 1``: discounted return minus the baseline), normalised per task.
  The loss is the per-task mean over the trajectories' steps; every parameter (log-std included)
  takes ``inner_lr * gradient``. Two inner objectives with the same gradient at the sampling
  policy: ``"reinforce"`` (``-mean(log pi(a|s) A)``, MAML's) and ``"lvc"`` (ProMP's low-variance
  curvature objective ``-mean(pi(a|s) / pi_old(a|s) A)`` with ``pi_old`` the sampling policy,
  whose second derivative also counts the dependence of the inner sampling distribution on the
  parameters, and which stays an importance-weighted policy gradient when later outer epochs move
  the parameters away from the sampling policy). Default: ``"lvc"``.
* **Second order**: per-task adapted parameters ``theta_i = theta - inner_lr * grad`` are built
  with ``create_graph=True``, so the meta-gradient differentiates through the inner step(s).
* **Outer step**: the paper used TRPO; here the PPO clipped surrogate on the post-adaptation
  trajectories (ratio to the policy that sampled them), ``ppo_epochs`` Adam steps per batch, the
  adaptation recomputed from the current parameters on the fixed inner trajectories at every
  epoch (ProMP's "MAML-PPO" outer loop, without its inner KL penalty). Why not TRPO: TRPO's
  Fisher-vector products through a second-order meta-gradient need third derivatives and a line
  search of extra meta-loss evaluations per iteration; ProMP reports the clipped objective is at
  least as sample-efficient on these tasks, and it reuses each batch for several steps.
* **Vectorised sampling**: all ``meta_batch_size x trajectories_per_task`` navigation episodes in
  one :class:`~metafit.rl.BatchedNavigation`; the policy runs on all of them at once with
  per-task parameters stacked along a leading task dimension (batched matmul, no vmap). Other
  continuous-control families (HalfCheetah) step a pool of Gymnasium environments in lock step
  with the same batched policy.

Evaluation (``evaluate``): for each task, the mean return of ``eval_trajectories_per_task``
fresh trajectories of the pre-update policy, then after each of ``eval_steps`` inner steps, each
step computed from the trajectories of the policy before it (the paper's Fig. 4 protocol).
Returns are undiscounted sums of rewards of stochastic-policy episodes.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ...errors import ConfigError, TaskError, TrainingError, constraint_message
from ...validation import parse_config
from ..envs.base import BatchedFamily, Family
from .base import RLLearner
from .maml_rl_config import MAMLRLConfig
from .maml_rl_ops import (
    LOG_2PI,
    Params,
    RolloutBatch,
    compute_advantages,
    expand_params,
    gaussian_kl,
    inner_update,
    masked_task_mean,
    outer_losses,
    policy_forward,
    task_major,
)

__all__ = ["MAMLRL", "MAMLRLConfig"]


class MAMLRL(RLLearner):
    """MAML-RL with a Gaussian MLP policy; see the module docstring. ``MAMLRL(config, family)``
    for a continuous-action family (navigation, halfcheetah-vel, halfcheetah-dir)."""

    name = "maml-rl"
    Config = MAMLRLConfig
    evaluate_without_grad = False  # the inner steps of evaluate() need gradients
    score_reduction = "last"

    def __init__(self, config: MAMLRLConfig | dict | None, family: Family) -> None:
        config = parse_config(MAMLRLConfig, config, "learner")
        super().__init__(config, family)
        self._envs: list = []
        if not isinstance(family, Family) or family.discrete_actions or family.discrete_observations:
            raise ConfigError(constraint_message(
                "MAMLRL", "family", "a continuous-action family (navigation, halfcheetah-vel, halfcheetah-dir)",
                type(family).__name__, "MAML-RL needs a Gaussian policy; for bandits and tabular MDPs use rl2."))
        if isinstance(family, BatchedFamily):  # navigation: one batched torch environment
            self.obs_dim, self.act_dim = int(family.observation_size), int(family.action_size)
            default_scale = float(family.action_bound)
        else:  # a pool of Gymnasium environments stepped in lock step; the spaces come from one of them
            env = family.make_env()
            obs_space, act_space = env.observation_space, env.action_space
            ok = (getattr(act_space, "shape", None) and len(act_space.shape) == 1 and hasattr(act_space, "high")
                  and getattr(obs_space, "shape", None) and len(obs_space.shape) == 1)
            if not ok:
                env.close()
                raise ConfigError(constraint_message(
                    "MAMLRL", "family", "a family with vector observations and a continuous (Box) action space",
                    type(family).__name__, "Use navigation, halfcheetah-vel or halfcheetah-dir; for bandits and "
                    "tabular MDPs use rl2."))
            self.obs_dim, self.act_dim = int(obs_space.shape[0]), int(act_space.shape[0])
            default_scale = float(np.max(np.abs(act_space.high)))
            self._envs.append(env)
        self.horizon = int(family.horizon)
        self.action_scale = float(config.action_scale) if config.action_scale is not None else default_scale
        sizes = [self.obs_dim, *config.hidden, self.act_dim]
        self.policy = nn.Module()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            w = torch.empty(fan_in, fan_out)
            nn.init.xavier_uniform_(w)
            self.policy.register_parameter(f"w{i}", nn.Parameter(w))
            self.policy.register_parameter(f"b{i}", nn.Parameter(torch.zeros(fan_out)))
        self.policy.register_parameter("log_std", nn.Parameter(torch.full((self.act_dim,), config.init_log_std)))
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=config.meta_lr)

    # -- parameters and optimizer state --
    def params(self) -> Params:
        """The meta-parameters (the policy's initial parameters) by name."""
        return dict(self.policy.named_parameters())

    def optimizer_state_dict(self) -> dict:
        """The outer Adam optimizer's ``state_dict()``."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Load ``state`` (from :meth:`optimizer_state_dict`) into the outer Adam optimizer."""
        self.optimizer.load_state_dict(state)

    def eval_points(self) -> list[str]:
        """``"0 steps"``, ``"1 step"``, ... ``"<eval_steps> steps"``: before adaptation and after each inner step."""
        return [f"{k} step" if k == 1 else f"{k} steps" for k in range(self.config.eval_steps + 1)]

    # -- sampling --
    def _check_tasks(self, tasks: Sequence) -> list:
        task_type = self.family.task_type if isinstance(self.family, BatchedFamily) else None
        if not isinstance(tasks, Sequence) or isinstance(tasks, (str, bytes)) or len(tasks) == 0 or (
                task_type is not None and not all(isinstance(t, task_type) for t in tasks)):
            raise TaskError(constraint_message(
                "MAMLRL", "tasks", "a non-empty list of the family's tasks",
                type(tasks).__name__ if not isinstance(tasks, Sequence) else f"{len(tasks)} items",
                "Pass the list returned by family.sample_tasks(n)."))
        return list(tasks)

    @torch.no_grad()
    def sample(self, params_t: Params, tasks: list, episodes: int, generator: torch.Generator) -> RolloutBatch:
        """``episodes`` trajectories per task of ``tasks`` with per-task parameters ``params_t``
        (leading task dimension ``len(tasks)``), the environment and action noise drawn from
        ``generator``; returns the :class:`RolloutBatch`, advantages from a per-task linear baseline."""
        params_t = {k: v.detach() for k, v in params_t.items()}
        if isinstance(self.family, BatchedFamily):
            raw = self._sample_batched(params_t, tasks, episodes, generator)
        else:
            raw = self._sample_gym(params_t, tasks, episodes, generator)
        obs, actions, rewards, mask, logp, means = raw
        cfg = self.config
        adv = compute_advantages(obs, rewards, mask, cfg.gamma, cfg.gae_lambda, cfg.baseline_reg,
                                 cfg.normalize_advantages)
        return RolloutBatch(obs, actions, rewards, mask, logp, adv, means, params_t["log_std"].clone())

    def _act(self, params_t, obs, generator):
        """obs [T, E, d] -> actions, log-probs, means (policy units)."""
        mean, log_std = policy_forward(params_t, obs)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        std = torch.exp(log_std).unsqueeze(1)
        actions = mean + std * noise
        logp = (-0.5 * noise * noise - log_std.unsqueeze(1) - 0.5 * LOG_2PI).sum(-1)
        return actions, logp, mean

    def _rollout_buffers(self, H: int, T: int, E: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Time-major rollout buffers: observations, actions, means ``[H, T, E, dim]``; rewards,
        masks, log-probabilities ``[H, T, E]``."""
        return (torch.zeros(H, T, E, self.obs_dim, dtype=dtype), torch.zeros(H, T, E, self.act_dim, dtype=dtype),
                torch.zeros(H, T, E, self.act_dim, dtype=dtype), torch.zeros(H, T, E, dtype=dtype),
                torch.zeros(H, T, E, dtype=dtype), torch.zeros(H, T, E, dtype=dtype))

    def _sample_batched(self, params_t, tasks, E, generator):
        T, H = len(tasks), self.horizon
        dtype = params_t["w0"].dtype
        env = self.family.batched(tasks, E, dtype=dtype, check_actions=False)
        N = T * E
        obs_buf, act_buf, mean_buf, rew_buf, mask_buf, logp_buf = self._rollout_buffers(H, T, E, dtype)
        obs = env.reset().view(T, E, self.obs_dim)
        alive = torch.ones(N, dtype=torch.bool)
        for t in range(H):
            actions, logp, mean = self._act(params_t, obs, generator)
            nxt, reward, terminated, truncated, _ = env.step((actions * self.action_scale).view(N, self.act_dim))
            a = alive.view(T, E).to(dtype)
            obs_buf[t], act_buf[t], mean_buf[t], logp_buf[t] = obs, actions, mean, logp
            rew_buf[t], mask_buf[t] = reward.view(T, E) * a, a
            alive = alive & ~(terminated | truncated)
            if not bool(alive.any()):
                break
            obs = nxt.view(T, E, self.obs_dim)
        return task_major(obs_buf, act_buf, rew_buf, mask_buf, logp_buf, mean_buf)

    def _sample_gym(self, params_t, tasks, E, generator):
        T, H, N = len(tasks), self.horizon, len(tasks) * E
        dtype = params_t["w0"].dtype
        while len(self._envs) < N:
            self._envs.append(self.family.make_env())
        envs = self._envs[:N]
        seeds = torch.randint(0, 2**31 - 1, (N,), generator=generator).tolist()
        first = []
        for i, env in enumerate(envs):
            try:
                env.set_task(tasks[i // E])
            except TaskError as err:
                raise TaskError(constraint_message(
                    "MAMLRL", "tasks", f"tasks of {type(self.family).__name__}", type(tasks[i // E]).__name__,
                    "Pass the list returned by family.sample_tasks(n).")) from err
            first.append(env.reset(seed=int(seeds[i]))[0])
        obs_np = np.stack(first).astype(np.float64)
        obs_buf, act_buf, mean_buf, rew_buf, mask_buf, logp_buf = self._rollout_buffers(H, T, E, dtype)
        alive = np.ones(N, dtype=bool)
        rewards = np.zeros(N)
        for t in range(H):
            obs = torch.as_tensor(obs_np, dtype=dtype).view(T, E, self.obs_dim)
            actions, logp, mean = self._act(params_t, obs, generator)
            env_actions = (actions * self.action_scale).view(N, self.act_dim).numpy().astype(np.float32)
            rewards[:] = 0.0
            mask_now = alive.copy()
            for i in np.flatnonzero(alive):
                o, r, terminated, truncated, _ = envs[i].step(env_actions[i])
                obs_np[i] = o
                rewards[i] = r
                if terminated or truncated:
                    alive[i] = False
            obs_buf[t], act_buf[t], mean_buf[t], logp_buf[t] = obs, actions, mean, logp
            rew_buf[t] = torch.as_tensor(rewards, dtype=dtype).view(T, E)
            mask_buf[t] = torch.as_tensor(mask_now, dtype=dtype).view(T, E)
            if not alive.any():
                break
        return task_major(obs_buf, act_buf, rew_buf, mask_buf, logp_buf, mean_buf)

    # -- adaptation and the meta-loss --
    def adapt(self, batches: Sequence[RolloutBatch], params: Params | None = None, create_graph: bool = True,
              objective: str | None = None) -> Params:
        """Per-task parameters after one inner step on each of ``batches`` in turn (0 batches: the
        initial parameters, expanded per task). Differentiable w.r.t. ``params`` (default: the
        meta-parameters) when ``create_graph``. ``objective`` is the inner loss, ``"lvc"`` or
        ``"reinforce"`` (None: the config's ``inner_objective``). No batches is a TaskError."""
        params = self.params() if params is None else params
        if not batches:
            raise TaskError(constraint_message("MAMLRL.adapt", "batches", "a non-empty sequence of RolloutBatch",
                                               batches, "Pass at least one batch (its tasks fix the task count)."))
        with torch.enable_grad():  # the inner gradients are needed even under torch.no_grad()
            p = {k: v if v.requires_grad else v.detach().clone().requires_grad_(True)
                 for k, v in expand_params(params, batches[0].num_tasks).items()}
            for batch in batches:
                p = inner_update(p, batch, self.config.inner_lr, objective or self.config.inner_objective,
                                 create_graph)
        return p

    def meta_loss(self, inner_batches: Sequence[RolloutBatch], outer_batch: RolloutBatch,
                  params: Params | None = None) -> torch.Tensor:
        """Mean over tasks of the clipped surrogate of ``outer_batch`` at the parameters adapted on
        ``inner_batches`` (one inner step each, differentiated: second order) from ``params``
        (default: the meta-parameters)."""
        params = self.params() if params is None else params
        p = self.adapt(inner_batches, params) if inner_batches else expand_params(params, outer_batch.num_tasks)
        return outer_losses(p, outer_batch, self.config.clip_ratio)[0].mean()

    # -- the learner interface --
    def train_iteration(self, generator: torch.Generator) -> dict[str, float]:
        """One outer update: ``meta_batch_size`` tasks sampled from ``generator``, ``inner_steps``
        inner steps on fresh trajectories each, then ``ppo_epochs`` Adam steps on the clipped
        surrogate of the post-adaptation trajectories. Returns the log's statistics: ``return``
        (after adaptation), ``return_before``, ``env_steps``, losses, gradient norm, KL divergences,
        policy std and timings."""
        cfg = self.config
        t0 = time.perf_counter()
        tasks = self.family.sample_tasks(cfg.meta_batch_size, generator)
        T, E = len(tasks), cfg.trajectories_per_task
        params = self.params()
        p = {k: v.detach() for k, v in expand_params(params, T).items()}
        batches, sample_s = [], 0.0
        for k in range(cfg.inner_steps + 1):
            ts = time.perf_counter()
            batches.append(self.sample(p, tasks, E, generator))
            sample_s += time.perf_counter() - ts
            if k < cfg.inner_steps:
                with torch.enable_grad():
                    leaf = {n: v.clone().requires_grad_(True) for n, v in p.items()}
                    p = {n: v.detach() for n, v in inner_update(leaf, batches[-1], cfg.inner_lr).items()}
        inner, outer = batches[:-1], batches[-1]
        losses, grad_norms = [], []
        with torch.enable_grad():
            for _ in range(cfg.ppo_epochs):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.meta_loss(inner, outer, params)
                if not bool(torch.isfinite(loss)):
                    raise TrainingError(
                        f"MAMLRL: the meta-loss must be finite; got {float(loss)}. Lower meta_lr or inner_lr, "
                        "or set max_grad_norm.")
                loss.backward()
                if cfg.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                else:
                    norm = torch.sqrt(sum((q.grad.double() ** 2).sum() for q in self.policy.parameters()))
                grad_norms.append(float(norm))
                losses.append(float(loss.detach()))
                self.optimizer.step()
        with torch.enable_grad():
            p_new = self.adapt(inner, params, create_graph=False) if inner else expand_params(params, T)
        with torch.no_grad():
            mean_new, log_std_new = policy_forward({k: v.detach() for k, v in p_new.items()}, outer.flat("obs"))
            kl = gaussian_kl(outer.flat("means"), outer.log_std.unsqueeze(1), mean_new, log_std_new.unsqueeze(1))
            kl_post = float(masked_task_mean(kl, outer.flat("mask")).mean())
            first = batches[0]
            mean0, log_std0 = policy_forward(expand_params({k: v.detach() for k, v in params.items()}, T),
                                             first.flat("obs"))
            kl0 = gaussian_kl(first.flat("means"), first.log_std.unsqueeze(1), mean0, log_std0.unsqueeze(1))
            kl_pre = float(masked_task_mean(kl0, first.flat("mask")).mean())
        env_steps = sum(b.steps() for b in batches)
        seconds = time.perf_counter() - t0
        return {
            "return": float(outer.episode_returns().mean()),
            "return_before": float(batches[0].episode_returns().mean()),
            "env_steps": float(env_steps),
            "loss": losses[0],
            "loss_final": losses[-1],
            "grad_norm": grad_norms[0],
            "kl_post": kl_post,
            "kl_pre": kl_pre,
            "std": float(torch.exp(params["log_std"].detach()).mean()),
            "seconds": seconds,
            "sample_seconds": sample_s,
            "env_steps_per_s": env_steps / max(sample_s, 1e-9),
        }

    def evaluate(self, tasks: list, generator: torch.Generator) -> torch.Tensor:
        """Mean return per task ``[len(tasks), 1 + eval_steps]``: before adaptation and after each
        inner step, each point from fresh trajectories of the policy adapted so far, on ``tasks``
        (adapted ``eval_task_chunk`` at a time) with the noise drawn from ``generator``."""
        tasks = self._check_tasks(tasks)
        cfg = self.config
        E = cfg.eval_trajectories_per_task or cfg.trajectories_per_task
        params = {k: v.detach() for k, v in self.params().items()}
        out = torch.zeros(len(tasks), cfg.eval_steps + 1, dtype=torch.float64)
        for start in range(0, len(tasks), cfg.eval_task_chunk):
            chunk = tasks[start:start + cfg.eval_task_chunk]
            p = {k: v.clone() for k, v in expand_params(params, len(chunk)).items()}
            for k in range(cfg.eval_steps + 1):
                batch = self.sample(p, chunk, E, generator)
                out[start:start + len(chunk), k] = batch.episode_returns().double().mean(1)
                if k < cfg.eval_steps:
                    with torch.enable_grad():
                        leaf = {n: v.requires_grad_(True) for n, v in p.items()}
                        p = {n: v.detach() for n, v in inner_update(leaf, batch, cfg.inner_lr).items()}
        return out

    def close(self) -> None:
        """Close the Gymnasium environments this learner opened."""
        for env in self._envs:
            env.close()
        self._envs = []
