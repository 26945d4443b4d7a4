"""The PPO pieces of RL² (Schulman et al. 2017): a trial batch, generalised advantage estimation
over whole trials and the clipped objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RL2Rollout", "gae", "ppo_loss"]


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
