"""How kept RL² bandit weights play, beside the Bayes-optimal Gittins index on the same instances:
what they explore, where their regret comes from, and how much of a total-reward figure is noise.

    python benchmarks/rl2_bandit_diagnostics.py                     # the kept weights of n=100, k=10 and k=50
    python benchmarks/rl2_bandit_diagnostics.py --weights bandit-n100-k50=PATH --seeds 3

For each setting and agent (RL² sampling its actions as in the paper, RL² taking the most likely action,
the finite-horizon Gittins index) one trial is played in each of the 1000 evaluation instances of
benchmarks/rl_baselines.py (and the 500 validation instances), once per reward-noise seed. Columns:

- ``reward``: the total reward per trial (the paper's figure), mean over instances and seeds, with the
  spread of the per-seed means (max - min): how far the figure moves with the noise seed alone;
- ``expected``: the sum of the chosen arms' success probabilities (the same trials without the
  Bernoulli noise of the rewards themselves): an unbiased, less noisy estimate of the same mean;
- ``arms tried``: distinct arms pulled at least once in the trial;
- ``regret``: the best arm's probability minus the chosen arm's, summed over the first 30 pulls and
  over the rest;
- ``last 20``: the mean success probability of the arms chosen in the last 20 pulls.

Writes benchmarks/results/rl2_bandit_diagnostics.json. Nothing here trains; a few seconds per setting and seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import rl2_setup as rl2_bench  # noqa: E402  (the settings, instances and seeds of benchmarks/rl2.py)

from metafit import rl  # noqa: E402
from metafit.rl.baselines import GittinsBandit  # noqa: E402
from metafit.rl import RL2  # noqa: E402

WEIGHTS = HERE / "results" / "weights"
DEFAULT = {  # the main entries of benchmarks/results/rl2.json (docs/benchmarks.md, section 11)
    "bandit-n100-k10": WEIGHTS / "rl2_bandit-n100-k10_lambda0.97_gamma1_continued.safetensors",
    "bandit-n100-k50": WEIGHTS / "rl2_bandit-n100-k50_entropy0.safetensors",
}
OUT = HERE / "results" / "rl2_bandit_diagnostics.json"
EARLY = 30  # pulls counted as the early part of the regret


def play_rl2(learner: RL2, tasks: list, seed: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Actions ``[T, N]`` and rewards ``[T, N]`` of one trial per task."""
    with torch.no_grad():
        ro = learner.rollout(tasks, torch.Generator().manual_seed(seed), greedy=greedy)
    return ro.actions.cpu(), ro.rewards.cpu().double()


def play_gittins(tasks: list, n_pulls: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    env = rl.BatchedBandit(tasks, seed=seed)
    agent = GittinsBandit()
    env.reset()
    agent.begin_trial(env.num_envs, env.n_arms, n_pulls, seed=seed)
    actions, rewards = [], []
    for _ in range(n_pulls):
        a = agent.act()
        _, r, _, _, _ = env.step(a)
        agent.observe(a, r)
        actions.append(a)
        rewards.append(r.double())
    return torch.stack(actions), torch.stack(rewards)


def describe(actions: torch.Tensor, rewards: torch.Tensor, probs: torch.Tensor) -> dict:
    """Per-trial statistics of actions ``[T, N]`` in tasks with success probabilities ``probs [N, k]``."""
    chosen = probs.gather(1, actions.T)  # [N, T]
    gap = probs.max(1, keepdim=True).values - chosen
    tried = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, actions.T, True).sum(1)
    return {"reward": rewards.sum(0), "expected": chosen.sum(1), "arms_tried": tried.double(),
            "regret_early": gap[:, :EARLY].sum(1), "regret_late": gap[:, EARLY:].sum(1),
            "last20_p": chosen[:, -20:].mean(1)}


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for key in per_seed[0]:
        means = torch.stack([d[key].double().mean() for d in per_seed])
        out[key] = round(float(means.mean()), 4)
        if key in ("reward", "expected"):
            out[key + "_ci95_one_seed"] = round(rl.mean_ci(per_seed[0][key].double())[1], 4)  # over instances
            out[key + "_seed_spread"] = round(float(means.max() - means.min()), 4)
    return out


def diagnose(name: str, weights: Path, seeds: list[int]) -> dict:
    family, cfg, eval_tasks, val_tasks = rl2_bench.make_setting(name, 500, 1000)
    learner = rl2_bench.load_kept(name, weights, family)
    n_pulls = cfg["n_episodes"]
    result = {"weights": str(weights.relative_to(HERE.parent) if weights.is_relative_to(HERE.parent) else weights),
              "instances": {}}
    for split, tasks in (("validation", val_tasks), ("test", eval_tasks)):
        probs = torch.stack([t.probs for t in tasks]).double()
        rows = {}
        for agent in ("rl2_sampled", "rl2_greedy", "gittins"):
            per_seed = []
            for seed in seeds:
                if agent == "gittins":
                    actions, rewards = play_gittins(tasks, n_pulls, seed)
                else:
                    actions, rewards = play_rl2(learner, tasks, seed, greedy=agent == "rl2_greedy")
                per_seed.append(describe(actions, rewards, probs))
            rows[agent] = summarise(per_seed)
        result["instances"][split] = {"count": len(tasks), "agents": rows}
    return result


def print_table(results: dict) -> None:
    print(f"{'setting':16s} {'split':10s} {'agent':12s} {'reward (spread)':>16s} {'expected':>9s} "
          f"{'arms tried':>10s} {'regret <30':>10s} {'>=30':>6s} {'last 20':>8s}")
    for name, res in results.items():
        for split, block in res["instances"].items():
            for agent, r in block["agents"].items():
                print(f"{name:16s} {split:10s} {agent:12s} {r['reward']:8.2f} ({r['reward_seed_spread']:4.2f})  "
                      f"{r['expected']:9.2f} {r['arms_tried']:10.2f} {r['regret_early']:10.2f} "
                      f"{r['regret_late']:6.2f} {r['last20_p']:8.4f}")


def main() -> None:
    rl2_bench.diagnostics_main(__file__, __doc__, "bandit", DEFAULT, OUT, 5, diagnose, print_table,
                               extra={"early_pulls": EARLY})


if __name__ == "__main__":
    main()
