"""Classical baselines of RL² (Duan et al. 2016) on our environment families: total reward per
trial on Bernoulli bandits (table 1: n pulls, k arms) and random tabular MDPs (table 2: n
episodes of 10 steps, 10 states, 5 actions), plus the throughput of the batched environments.

    python benchmarks/rl_baselines.py            # full run (a few minutes on 2 cores)
    python benchmarks/rl_baselines.py --quick    # smoke run: fewer instances, coarse grids

Protocol: every agent plays the same 1000 evaluation instances (tasks and environment noise from
fixed seeds); tuned parameters (UCB1's c, epsilon, OPSRL's samples, UCRL2/BEB scaling) are chosen
on a grid using 500 *separate* tuning instances (another seed) -- the RL² authors' scripts tuned
on the evaluation seeds themselves, which flatters tuned baselines a little. Cells are the mean
total reward with a 95% confidence half-width (1.96 sd / sqrt(instances)). "Oracle" knows the
task (n * max p for bandits; n times the optimal episode value for MDPs). See
metafit.rl.baselines for each agent's exact variant. Writes benchmarks/results/rl_baselines.json.

Paper columns: tables 1 and 2 of the RL² paper for the settings run here, as transcribed in the
README of lucaslingle/pytorch_rl2 (an RL² re-implementation; its RL² column matches the figures
quoted in the issue exactly). Each of our rows is printed with the paper's value for the same
agent and the relative difference (ours / paper - 1); "paper RL2" rows give the paper's RL² column.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from metafit import rl
from metafit.training import write_json

HERE = Path(__file__).resolve().parent

# the paper's tables 1 and 2 (see the module docstring): {setting: {column: value}}
_B_COLS = ("Random", "Gittins", "TS", "OTS", "UCB1", "eps-Greedy", "Greedy", "RL2")
PAPER_BANDITS: dict[str, dict[str, float]] = {
    key: dict(zip(_B_COLS, values)) for key, values in {
        "n=10,k=5": (5.0, 6.6, 5.7, 6.5, 6.7, 6.6, 6.6, 6.7),
        "n=10,k=10": (5.0, 6.6, 5.5, 6.2, 6.7, 6.6, 6.6, 6.7),
        "n=10,k=50": (5.1, 6.5, 5.2, 5.5, 6.6, 6.5, 6.5, 6.8),
        "n=100,k=5": (49.9, 78.3, 74.7, 77.9, 78.0, 75.4, 74.8, 78.7),
        "n=100,k=10": (49.9, 82.8, 76.7, 81.4, 82.4, 77.4, 77.1, 83.5),
        "n=100,k=50": (49.8, 85.2, 64.5, 67.7, 84.3, 78.3, 78.0, 84.9),
    }.items()}
_M_COLS = ("Random", "PSRL", "OPSRL", "UCRL2", "BEB", "eps-Greedy", "Greedy", "RL2")
PAPER_MDPS: dict[str, dict[str, float]] = {
    key: dict(zip(_M_COLS, values)) for key, values in {
        "n=10": (100.1, 138.1, 144.1, 146.6, 150.2, 132.8, 134.8, 156.2),
        "n=25": (250.2, 408.8, 425.2, 424.1, 427.8, 377.3, 368.8, 445.7),
    }.items()}
# our row -> the paper's column for the same agent
PAPER_COLUMN = {"Random": "Random", "Gittins (finite horizon)": "Gittins", "Thompson": "TS",
                "Optimistic Thompson": "OTS", "UCB1": "UCB1",
                "epsilon-greedy": "eps-Greedy", "Greedy": "Greedy", "PSRL": "PSRL", "OPSRL": "OPSRL",
                "UCRL2": "UCRL2", "BEB": "BEB"}

EVAL_TASK_SEED, EVAL_ENV_SEED = 1000, 1001
TUNE_TASK_SEED, TUNE_ENV_SEED = 2000, 2001
AGENT_SEED = 7


def _bandit_agents(quick: bool):
    grid01 = [round(0.1 * i, 1) for i in range(11)]  # the authors' grids for c and epsilon
    ots_grid = [2, 3, 5, 7, 10, 15, 20, 30]  # draws per pull (the authors' script used 7)
    if quick:
        grid01, ots_grid = [0.0, 0.2, 0.5, 1.0], [3, 7]
    return [
        ("Random", lambda _: rl.RandomBandit(), None, None),
        ("Gittins (finite horizon)", lambda _: rl.GittinsBandit(), None, None),
        ("Thompson", lambda _: rl.ThompsonBandit(), None, None),
        ("Optimistic Thompson", lambda k: rl.ThompsonBandit(n_samples=int(k)), "n_samples", ots_grid),
        ("UCB1", lambda c: rl.UCB1Bandit(c=c), "c", grid01),
        ("epsilon-greedy", lambda e: rl.EpsilonGreedyBandit(epsilon=e), "epsilon", grid01),
        ("Greedy", lambda _: rl.EpsilonGreedyBandit(epsilon=0.0), None, None),
    ]


def _mdp_agents(quick: bool):
    log_grid = [float(x) for x in np.exp(np.linspace(np.log(1e-4), np.log(1.0), 21))]  # TabulaRL / authors
    samples = [1, 2, 3, 5, 7, 10, 15, 20]
    eps = [round(0.1 * i, 1) for i in range(1, 11)]
    bonus = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    if quick:
        log_grid, samples, eps, bonus = log_grid[::5], [1, 3, 10], [0.1, 0.3, 0.6], [0.0, 1.0]
    return [
        ("Random", lambda _: rl.RandomMDP(), None, None),
        ("PSRL", lambda _: rl.PSRL(), None, None),
        ("PSRL (matched prior mu0=1)", lambda _: rl.PSRL(reward_prior_mean=1.0), None, None),
        ("OPSRL", lambda k: rl.OptimisticPSRL(n_samples=int(k)), "n_samples", samples),
        ("UCRL2", lambda s: rl.UCRL2(scaling=s), "scaling", log_grid),
        ("BEB", lambda s: rl.BEB(scaling=s), "scaling", log_grid),
        ("epsilon-greedy", lambda e: rl.EpsilonGreedyMDP(epsilon=e), "epsilon", eps),
        ("Greedy", lambda _: rl.EpsilonGreedyMDP(epsilon=0.0), None, None),
        # not in the paper: per-state reward means only (matched prior N(1, 1)), with a tuned bonus
        ("Myopic (not in the paper)", lambda c: rl.MyopicMDP(bonus=c), "bonus", bonus),
    ]


def _trials(run, batched, n: int):
    """A function playing one n-step trial of every instance with an agent: its total rewards."""
    return lambda agent: run(batched(), agent, n, seed=AGENT_SEED)


def _cell(make, param, grid, run_tune, run_eval) -> dict:
    out: dict = {}
    value = None
    if grid is not None:
        value, scores = rl.tune(make, grid, run_tune)
        out["param"] = {param: value}
        out["tuning_means"] = {str(k): round(v, 4) for k, v in scores.items()}
    mean, ci = rl.mean_ci(run_eval(make(value)))
    out.update(mean=mean, ci95=ci)
    return out


def run_bandits(ns, ks, n_eval, n_tune, quick) -> dict:
    results = {}
    for n in ns:
        for k in ks:
            key = f"n={n},k={k}"
            fam = rl.BanditFamily(n_arms=k)
            eval_tasks = fam.sample_tasks(n_eval, torch.Generator().manual_seed(EVAL_TASK_SEED + 31 * k))
            tune_tasks = fam.sample_tasks(n_tune, torch.Generator().manual_seed(TUNE_TASK_SEED + 31 * k))

            run_eval = _trials(rl.run_bandit_trials, lambda t=eval_tasks: rl.BatchedBandit(t, seed=EVAL_ENV_SEED), n)
            run_tune = _trials(rl.run_bandit_trials, lambda t=tune_tasks: rl.BatchedBandit(t, seed=TUNE_ENV_SEED), n)
            t0 = time.perf_counter()
            row = {}
            for name, make, param, grid in _bandit_agents(quick):
                if name.startswith("Gittins") and n > rl.MAX_GITTINS_PULLS:
                    row[name] = {"skipped": f"the finite-horizon table is limited to {rl.MAX_GITTINS_PULLS} pulls"}
                    continue
                row[name] = _cell(make, param, grid, run_tune, run_eval)
            oracle = rl.BatchedBandit(eval_tasks).optimal_trial_reward(n)
            m, ci = rl.mean_ci(oracle)
            row["Oracle (knows p)"] = {"mean": m, "ci95": ci}
            row["_seconds"] = time.perf_counter() - t0
            results[key] = row
            print(f"  bandits {key}: {row['_seconds']:.1f}s", flush=True)
    return results


def run_mdps(ns, n_eval, n_tune, quick) -> dict:
    fam = rl.TabularMDPFamily()
    eval_tasks = fam.sample_tasks(n_eval, torch.Generator().manual_seed(EVAL_TASK_SEED))
    tune_tasks = fam.sample_tasks(n_tune, torch.Generator().manual_seed(TUNE_TASK_SEED))
    results = {}
    for n in ns:
        key = f"n={n}"

        run_eval = _trials(rl.run_mdp_trials, lambda: fam.batched(eval_tasks, seed=EVAL_ENV_SEED), n)
        run_tune = _trials(rl.run_mdp_trials, lambda: fam.batched(tune_tasks, seed=TUNE_ENV_SEED), n)
        t0 = time.perf_counter()
        row = {name: _cell(make, param, grid, run_tune, run_eval) for name, make, param, grid in _mdp_agents(quick)}
        m, ci = rl.mean_ci(n * fam.batched(eval_tasks).optimal_values().double())
        row["Oracle (knows the MDP)"] = {"mean": m, "ci95": ci}
        row["_seconds"] = time.perf_counter() - t0
        results[key] = row
        print(f"  MDPs {key}: {row['_seconds']:.1f}s", flush=True)
    return results


def _rate(step, n_envs: int, steps: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return n_envs * steps / (time.perf_counter() - t0)


def throughput(sizes, steps) -> dict:
    out: dict = {}
    g = torch.Generator().manual_seed(0)
    for n_envs in sizes:
        out[str(n_envs)] = {}
        for name, fam, action in (("bandit_k10", rl.BanditFamily(10), torch.randint(0, 10, (n_envs,), generator=g)),
                                  ("mdp_10x5", rl.TabularMDPFamily(), torch.randint(0, 5, (n_envs,), generator=g)),
                                  ("navigation", rl.NavigationFamily(), torch.rand(n_envs, 2, generator=g) * 0.2 - 0.1)):
            env = fam.batched(fam.sample_tasks(n_envs, g), seed=0)
            env.reset()
            out[str(n_envs)][name] = _rate(lambda env=env, action=action: env.step(action), n_envs, steps)
    return out


def _fmt(cell: dict) -> str:
    if "skipped" in cell:
        return "n/a"
    s = f"{cell['mean']:.1f}±{cell['ci95']:.1f}"
    if "param" in cell:
        (name, value), = cell["param"].items()
        s += f" ({name[:1] if name != 'n_samples' else 'K'}={value:.3g})"
    return s


def print_table(title: str, results: dict, paper: dict) -> None:
    settings = list(results)
    rows = [r for r in results[settings[0]] if not r.startswith("_")]
    width = max(len(r) for r in rows + ["paper RL2"]) + 2
    colw = max(24, *(len(s) + 2 for s in settings))
    print(f"\n{title}")
    print("".ljust(width) + "".join(s.rjust(colw) for s in settings))
    for r in rows:
        print(r.ljust(width) + "".join(_fmt(results[s][r]).rjust(colw) for s in settings))
        col = PAPER_COLUMN.get(r)
        if col and any(col in paper.get(s, {}) for s in settings):
            print(f"  paper {col}".ljust(width) + "".join(_vs_paper(results[s][r], paper.get(s, {}).get(col))
                                                          .rjust(colw) for s in settings))
    for c in sorted({c for s in settings for c in paper.get(s, {})} - set(PAPER_COLUMN.values())):
        print(f"paper {c}".ljust(width) + "".join(
            (f"{paper[s][c]:.1f}" if c in paper.get(s, {}) else "n/a").rjust(colw) for s in settings))


def _vs_paper(cell: dict, value: float | None) -> str:
    if value is None:
        return "n/a"
    if "mean" not in cell:
        return f"{value:.1f}"
    return f"{value:.1f} ({100 * (cell['mean'] / value - 1):+.1f}%)"


def paper_comparison(results: dict, paper: dict) -> dict:
    """{setting: {our row: {"paper": value, "ours": mean, "relative": ours / paper - 1}}}."""
    out: dict = {}
    for setting, row in results.items():
        for name, cell in row.items():
            value = paper.get(setting, {}).get(PAPER_COLUMN.get(name, ""))
            if value is not None and "mean" in cell:
                out.setdefault(setting, {})[name] = {"paper": value, "ours": round(cell["mean"], 3),
                                                     "relative": round(cell["mean"] / value - 1, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 evaluation / 100 tuning instances, coarse grids")
    ap.add_argument("--instances", type=int, default=1000, help="evaluation instances per setting")
    ap.add_argument("--tune-instances", type=int, default=500, help="tuning instances (a separate seed)")
    ap.add_argument("--bandit-n", default="10,100", help="pulls per trial (the paper also has 500)")
    ap.add_argument("--bandit-k", default="5,10,50", help="arms")
    ap.add_argument("--mdp-n", default="10,25", help="episodes per trial (the paper also has 50,75,100)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: these small tensors gain nothing from more, and a shared CPU thrashes)")
    ap.add_argument("--out", default=str(HERE / "results" / "rl_baselines.json"))
    args = ap.parse_args()
    if args.quick:
        args.instances, args.tune_instances = min(args.instances, 200), min(args.tune_instances, 100)
    torch.set_num_threads(args.threads)
    bandit_n = [int(x) for x in args.bandit_n.split(",")]
    bandit_k = [int(x) for x in args.bandit_k.split(",")]
    mdp_n = [int(x) for x in args.mdp_n.split(",")]

    t0 = time.perf_counter()
    print("throughput (env steps/s) ...", flush=True)
    speed = throughput([1000, 10000] if not args.quick else [1000], 200 if not args.quick else 50)
    print("bandits ...", flush=True)
    bandits = run_bandits(bandit_n, bandit_k, args.instances, args.tune_instances, args.quick)
    print("MDPs ...", flush=True)
    mdps = run_mdps(mdp_n, args.instances, args.tune_instances, args.quick)
    total = time.perf_counter() - t0

    print_table(f"Bernoulli bandits, total reward over n pulls ({args.instances} instances; tuned on "
                f"{args.tune_instances} others)", bandits, PAPER_BANDITS)
    print_table(f"Random tabular MDPs (10 states, 5 actions, horizon 10), total reward over n episodes "
                f"({args.instances} instances)", mdps, PAPER_MDPS)
    print("\nbatched environment throughput, env steps/s (torch threads = %d):" % args.threads)
    for n_envs, rates in speed.items():
        print(f"  {n_envs:>22}: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()))
    print(f"\ntotal {total:.0f}s")

    report = {
        "benchmark": "rl_baselines",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/rl_baselines.py" + (" --quick" if args.quick else ""),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads},
        "protocol": {"eval_instances": args.instances, "tune_instances": args.tune_instances,
                     "seeds": {"eval_tasks": EVAL_TASK_SEED, "eval_env": EVAL_ENV_SEED, "tune_tasks": TUNE_TASK_SEED,
                               "tune_env": TUNE_ENV_SEED, "agents": AGENT_SEED},
                     "ci": "95% normal half-width over instances", "quick": args.quick},
        "bandits": bandits,
        "mdps": mdps,
        "paper": {"bandits": PAPER_BANDITS, "mdps": PAPER_MDPS,
                  "source": "RL² paper tables 1 and 2 as transcribed in the README of lucaslingle/pytorch_rl2",
                  "vs_ours": {"bandits": paper_comparison(bandits, PAPER_BANDITS),
                              "mdps": paper_comparison(mdps, PAPER_MDPS)}},
        "throughput_env_steps_per_s": speed,
        "seconds": total,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
