"""Where kept RL² weights lose reward on tabular MDPs, episode by episode, beside the classical
agents on the same instances: is the gap to a good agent in exploring (early episodes) or in
exploiting what was found (late ones)?

    python benchmarks/rl2_mdp_diagnostics.py                      # the kept weights of the n=10 and n=25 main entries
    python benchmarks/rl2_mdp_diagnostics.py --weights mdp-n10=PATH --seeds 3

For each agent (RL² sampling its actions as in the paper, RL² taking the most likely action, the
myopic agent and BEB with the parameters tuned in benchmarks/results/rl_baselines.json) one trial is
played in each of the 1000 evaluation instances of benchmarks/rl_baselines.py, once per
reward-and-transition noise seed. Per episode of the trial:

- ``reward``: mean total reward of the episode (what the paper's figure sums over episodes);
- ``regret``: the expected loss of the actions taken against the optimal policy of the true MDP,
  ``sum_t V*_h(s_t) - Q*_h(s_t, a_t)`` over the episode's steps (``h`` the step in the episode;
  by the performance-difference identity its mean is the oracle's expected episode return minus the
  agent's, without the reward noise and with the agent's own state distribution);
- ``optimal``: the fraction of steps whose action is optimal for the true MDP at that state and step.

Writes benchmarks/results/rl2_mdp_diagnostics.json. Nothing here trains; about a minute for the
default on one core.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import rl2_setup as rl2_bench  # noqa: E402  (the settings, instances and seeds of benchmarks/rl2.py)

from metafit import rl  # noqa: E402
from metafit.rl import solve_finite_horizon  # noqa: E402

DEFAULT = {  # the main entries of benchmarks/results/rl2.json (docs/benchmarks.md, section 11)
    "mdp-n10": HERE / "results" / "weights" / "rl2_mdp-n10_transition_head64.safetensors",
    "mdp-n25": HERE / "results" / "weights" / "rl2_mdp-n25_entropy0_1000_trials.safetensors",
}
OUT = HERE / "results" / "rl2_mdp_diagnostics.json"
BASELINES = HERE / "results" / "rl_baselines.json"
BANDS = ((1, 5), (6, 15), (16, 25))  # episode ranges summarised (1-based, inclusive), cut to the trial


def play_rl2(learner, tasks: list, seed: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """States, actions and rewards ``[T, N]`` of one trial per task (``T`` = episodes x horizon)."""
    with torch.no_grad():
        ro = learner.rollout(tasks, torch.Generator().manual_seed(seed), greedy=greedy)
    states = ro.inputs[..., :learner.spec.obs_dim].argmax(-1)  # the one-hot observation each step read
    return states.cpu(), ro.actions.cpu(), ro.rewards.cpu().double()


def play_agent(agent, family, tasks: list, n_episodes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The same for a classical agent of metafit.rl.baselines (run_mdp_trials, recorded)."""
    steps = []
    rl.run_mdp_trials(family.batched(tasks, seed=seed), agent, n_episodes, seed=seed,
                      on_step=lambda s, a, r: steps.append((s, a, r.double())))
    return tuple(torch.stack(x) for x in zip(*steps))


def describe(states: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, Q: torch.Tensor,
             horizon: int) -> dict:
    """Per-episode means over instances of reward, expected regret and optimal-action fraction, from
    one trial per instance (``[T, N]`` each) and the true MDPs' ``Q [N, H, S, A]``."""
    T, N = actions.shape
    h = torch.arange(T) % horizon
    rows = torch.arange(N)
    q = Q[rows.unsqueeze(0), h.unsqueeze(1), states]  # [T, N, A]: Q*_h(s_t, .)
    best = q.amax(-1)
    taken = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    per_episode = lambda x: x.reshape(T // horizon, horizon, N).sum(1).mean(1)  # noqa: E731
    return {"reward": per_episode(rewards), "regret": per_episode(best - taken),
            "optimal": per_episode((taken >= best - 1e-9).double()) / horizon}


def diagnose(name: str, weights: Path, seeds: list[int]) -> dict:
    family, cfg, eval_tasks, _ = rl2_bench.make_setting(name, 1, 1000)
    learner = rl2_bench.load_kept(name, weights, family)
    n_episodes = cfg["n_episodes"]
    R = torch.stack([t.rewards_mean for t in eval_tasks]).double()
    P = torch.stack([t.transitions for t in eval_tasks]).double()
    Q, V = solve_finite_horizon(R, P, family.horizon)
    tuned = json.loads(BASELINES.read_text())["mdps"][f"n={n_episodes}"]
    agents = {
        "rl2_sampled": lambda s: play_rl2(learner, eval_tasks, s, greedy=False),
        "rl2_greedy": lambda s: play_rl2(learner, eval_tasks, s, greedy=True),
        "myopic": lambda s: play_agent(rl.MyopicMDP(**tuned["Myopic (not in the paper)"]["param"]), family,
                                       eval_tasks, n_episodes, s),
        "beb": lambda s: play_agent(rl.BEB(**tuned["BEB"]["param"]), family, eval_tasks, n_episodes, s),
    }
    rows = {}
    for agent, play in agents.items():
        per_seed = [describe(*play(1001 + s), Q, family.horizon) for s in seeds]
        row = {k: [round(float(torch.stack([d[k] for d in per_seed]).mean(0)[e]), 4) for e in range(n_episodes)]
               for k in per_seed[0]}
        row["total_reward"] = round(sum(row["reward"]), 2)
        row["total_regret"] = round(sum(row["regret"]), 2)
        row["regret_by_episodes"] = {f"{a}-{min(b, n_episodes)}": round(sum(row["regret"][a - 1:b]), 2)
                                     for a, b in BANDS if a <= n_episodes}
        rows[agent] = row
    oracle = float(V[:, 0, 0].mean())
    return {"weights": str(weights.relative_to(HERE.parent) if weights.is_relative_to(HERE.parent) else weights),
            "instances": len(eval_tasks), "oracle_episode_return": round(oracle, 4), "agents": rows}


def print_table(results: dict) -> None:
    for name, res in results.items():
        bands = list(next(iter(res["agents"].values()))["regret_by_episodes"])
        print(f"\n{name}: expected episode return of the optimal policy {res['oracle_episode_return']:.2f}")
        print(f"{'agent':12s} {'total reward':>12s} {'regret':>8s} " + " ".join(f"{'ep ' + b:>9s}" for b in bands)
              + f" {'first ep':>9s} {'last ep':>8s} {'optimal, last ep':>17s}")
        for agent, r in res["agents"].items():
            print(f"{agent:12s} {r['total_reward']:12.2f} {r['total_regret']:8.2f} "
                  + " ".join(f"{v:9.2f}" for v in r["regret_by_episodes"].values())
                  + f" {r['reward'][0]:9.2f} {r['reward'][-1]:8.2f} {r['optimal'][-1]:17.3f}")


def main() -> None:
    rl2_bench.diagnostics_main(__file__, __doc__, "mdp", DEFAULT, OUT, 2, diagnose, print_table)


if __name__ == "__main__":
    main()
