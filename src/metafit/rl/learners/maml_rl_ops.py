"""The functional parts of MAML-RL (see :mod:`metafit.rl.learners.maml_rl`): a Gaussian MLP policy
batched over tasks, rllab's linear feature baseline and GAE advantages, and the inner
(policy-gradient) and outer (PPO-clipped) objectives. Pure functions of tensors and parameter
dicts, so that the meta-gradient can be checked against finite differences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LOG_2PI",
    "Params",
    "RolloutBatch",
    "compute_advantages",
    "discounted_returns",
    "expand_params",
    "gaussian_kl",
    "fit_linear_baseline",
    "gaussian_log_prob",
    "inner_losses",
    "inner_update",
    "linear_baseline_features",
    "masked_task_mean",
    "outer_losses",
    "policy_forward",
    "policy_log_prob",
    "task_major",
]

Params = dict[str, torch.Tensor]
LOG_2PI = math.log(2 * math.pi)


def task_major(obs, act, rew, mask, logp, mean) -> tuple[torch.Tensor, ...]:
    """Time-major ``[H, T, E, ...]`` buffers to task-major ``[T, E, H, ...]`` (contiguous)."""
    return (obs.permute(1, 2, 0, 3).contiguous(), act.permute(1, 2, 0, 3).contiguous(),
            rew.permute(1, 2, 0).contiguous(), mask.permute(1, 2, 0).contiguous(),
            logp.permute(1, 2, 0).contiguous(), mean.permute(1, 2, 0, 3).contiguous())


@dataclass
class RolloutBatch:
    """Trajectories of ``T`` tasks x ``E`` episodes x ``H`` steps (steps after an episode ended are
    padding with ``mask = 0``). Actions are in policy (normalised) units, before clipping."""

    obs: torch.Tensor         # [T, E, H, obs_dim]
    actions: torch.Tensor     # [T, E, H, act_dim]
    rewards: torch.Tensor     # [T, E, H]
    mask: torch.Tensor        # [T, E, H] 1.0 where a step happened
    logp: torch.Tensor        # [T, E, H] log-probability under the sampling policy
    advantages: torch.Tensor  # [T, E, H]
    means: torch.Tensor | None = None    # [T, E, H, act_dim] sampling policy's mean (for the KL)
    log_std: torch.Tensor | None = None  # [T, act_dim] sampling policy's log std

    @property
    def num_tasks(self) -> int:
        return int(self.obs.shape[0])

    def flat(self, name: str) -> torch.Tensor:
        v = getattr(self, name)
        return v.reshape(v.shape[0], v.shape[1] * v.shape[2], *v.shape[3:])

    def episode_returns(self) -> torch.Tensor:
        """Undiscounted return of every episode ``[T, E]``."""
        return (self.rewards * self.mask).sum(-1)

    def steps(self) -> int:
        return int(self.mask.sum())


# ---- the policy, functional and batched over tasks ---------------------------------------------

def expand_params(params: Params, num_tasks: int) -> Params:
    """One copy of every parameter per task: ``[num_tasks, *shape]`` (an expanded view; gradients
    flow back to ``params``)."""
    return {k: v.unsqueeze(0).expand(num_tasks, *v.shape) for k, v in params.items()}


def policy_forward(params: Params, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[..., N, act_dim]`` and log-std of the Gaussian MLP policy.

    ``params`` holds ``w0, b0, ..., wL, bL`` (weights stored ``[in, out]``) and ``log_std``, either
    unbatched or with a leading task dimension ``T`` (then ``obs`` is ``[T, N, obs_dim]`` and task
    ``i``'s observations go through task ``i``'s parameters, one batched matmul per layer)."""
    n_layers = sum(1 for k in params if k.startswith("w"))
    h = obs
    for i in range(n_layers):
        w, b = params[f"w{i}"], params[f"b{i}"]
        h = torch.baddbmm(b.unsqueeze(-2), h, w) if w.dim() == 3 else torch.matmul(h, w) + b
        if i < n_layers - 1:
            h = F.relu(h)
    return h, params["log_std"]


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over the last dimension; ``log_std`` is ``[act_dim]``
    or ``[T, act_dim]`` (broadcast over the ``N`` samples of ``mean [T, N, act_dim]``)."""
    if log_std.dim() == 2 and mean.dim() == 3:
        log_std = log_std.unsqueeze(1)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - 0.5 * LOG_2PI).sum(-1)


def policy_log_prob(params: Params, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    mean, log_std = policy_forward(params, obs)
    return gaussian_log_prob(mean, log_std, actions)


# ---- returns, the linear feature baseline, advantages -------------------------------------------

def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_t = sum_k gamma^k r_{t+k}`` within each episode (last dimension = time)."""
    out = torch.zeros_like(rewards)
    acc = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        acc = rewards[..., t] * mask[..., t] + gamma * acc * mask[..., t]
        out[..., t] = acc
    return out


def linear_baseline_features(obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rllab's ``LinearFeatureBaseline`` features ``[o, o^2, al, al^2, al^3, 1]`` with ``o``
    clipped to ``[-10, 10]`` and ``al = t / 100``; ``obs [..., H, d]`` -> ``[..., H, 2d + 4]``
    (zero rows where ``mask`` is 0)."""
    o = obs.clamp(-10, 10)
    H = obs.shape[-2]
    al = (torch.arange(H, dtype=obs.dtype, device=obs.device) / 100.0).expand(*obs.shape[:-1]).unsqueeze(-1)
    feats = torch.cat([o, o * o, al, al * al, al * al * al, torch.ones_like(al)], dim=-1)
    return feats * mask.unsqueeze(-1)


def fit_linear_baseline(features: torch.Tensor, targets: torch.Tensor, reg: float = 1e-5) -> torch.Tensor:
    """Ridge regression per task: ``w_i = (F_i^T F_i + reg I)^{-1} F_i^T y_i`` for ``features
    [T, M, k]`` and ``targets [T, M]`` (masked rows are zero and drop out), in float64; like rllab,
    the ridge grows tenfold (up to five times) while the solution is not finite."""
    f = features.double()
    y = targets.double()
    gram = f.transpose(1, 2) @ f
    rhs = (f.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(f.shape[-1], dtype=torch.float64, device=f.device)
    for _ in range(5):
        w = torch.linalg.solve(gram + reg * eye, rhs)
        if bool(torch.isfinite(w).all()):
            break
        reg *= 10
    return w


def compute_advantages(obs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                       gae_lambda: float, reg: float, normalize: bool) -> torch.Tensor:
    """Per-task linear baseline fitted on these trajectories' discounted returns, then GAE
    advantages ``sum_k (gamma lambda)^k delta_{t+k}``, ``delta_t = r_t + gamma b_{t+1} - b_t``
    (``b = 0`` after the last step, as rllab), standardised per task over the valid steps."""
    T, E, H = rewards.shape
    m = mask.double()
    r = rewards.double() * m
    returns = discounted_returns(r, m, gamma)
    feats = linear_baseline_features(obs.double(), m)
    w = fit_linear_baseline(feats.reshape(T, E * H, -1), returns.reshape(T, E * H), reg)
    b = (feats @ w.view(T, 1, -1, 1)).squeeze(-1) * m
    b_next = torch.cat([b[..., 1:], torch.zeros_like(b[..., :1])], dim=-1)
    delta = (r + gamma * b_next - b) * m
    adv = torch.zeros_like(delta)
    acc = torch.zeros_like(delta[..., 0])
    for t in range(H - 1, -1, -1):
        acc = delta[..., t] + gamma * gae_lambda * acc * m[..., t]
        adv[..., t] = acc
    adv = adv * m
    if normalize:
        n = m.sum((1, 2), keepdim=True).clamp_min(1)
        mean = adv.sum((1, 2), keepdim=True) / n
        var = (((adv - mean) * m) ** 2).sum((1, 2), keepdim=True) / n
        adv = (adv - mean) / (var.sqrt() + 1e-8) * m
    return adv.to(rewards.dtype)


# ---- inner and outer objectives -----------------------------------------------------------------

def masked_task_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1)


def inner_losses(params_t: Params, batch: RolloutBatch, objective: str) -> torch.Tensor:
    """Per-task inner policy-gradient loss ``[T]`` for per-task parameters ``params_t``."""
    logp = policy_log_prob(params_t, batch.flat("obs"), batch.flat("actions"))
    mask, adv = batch.flat("mask"), batch.flat("advantages")
    weight = torch.exp(logp - batch.flat("logp")) if objective == "lvc" else logp
    return -masked_task_mean(weight * adv, mask)


def inner_update(params_t: Params, batch: RolloutBatch, inner_lr: float, objective: str = "reinforce",
                 create_graph: bool = False) -> Params:
    """One policy-gradient step per task: ``theta_i - inner_lr * grad_i`` (``params_t`` has a
    leading task dimension). With ``create_graph=True`` the result stays differentiable with
    respect to ``params_t`` (second order)."""
    names = list(params_t)
    loss = inner_losses(params_t, batch, objective).sum()  # tasks are independent: sum = per-task grads
    grads = torch.autograd.grad(loss, [params_t[k] for k in names], create_graph=create_graph)
    return {k: params_t[k] - inner_lr * g for k, g in zip(names, grads)}


def outer_losses(params_t: Params, batch: RolloutBatch, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per task ``[T]`` and the log-probabilities ``[T, M]`` it used."""
    logp = policy_log_prob(params_t, batch.flat("obs"), batch.flat("actions"))
    mask, adv = batch.flat("mask"), batch.flat("advantages")
    ratio = torch.exp(logp - batch.flat("logp"))
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * adv)
    return -masked_task_mean(surr, mask), logp


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q) -> torch.Tensor:
    """KL(p || q) of diagonal Gaussians, summed over the last dimension."""
    var_p, var_q = torch.exp(2 * log_std_p), torch.exp(2 * log_std_q)
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)
