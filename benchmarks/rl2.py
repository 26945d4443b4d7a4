"""RL² (Duan et al. 2016) trained with PPO on Bernoulli bandits (table 1) and random tabular MDPs
(table 2), evaluated on the same 1000 evaluation instances as benchmarks/rl_baselines.py.

    python benchmarks/rl2.py                                   # every setting, default budgets
    python benchmarks/rl2.py --settings bandit-n10-k5,mdp-n10 --minutes 3
    python benchmarks/rl2.py --quick                            # smoke run: seconds per setting
    python benchmarks/rl2.py --settings bandit-n100-k5 --device cuda --set meta_batch_size=2000 \
        --out benchmarks/results/rl2_gpu.json                   # a GPU run with other hyperparameters

Protocol. Each setting trains a fresh learner for a wall-clock budget (``--minutes``, training
time only) on tasks sampled from the family. Every tenth of the budget the policy is scored on
*validation* instances -- the baselines' separate tuning instances (seed 2000 + 31 k for bandits,
2000 for MDPs), one trial each (``--val-seeds``: one per noise seed, averaged) -- and the
best-scoring weights are kept. Those weights then play one trial in
each of the 1000 evaluation instances of rl_baselines.py (tasks from seed 1000 + 31 k / 1000;
RL² samples its actions, as in the paper). The tasks are the baselines' tasks; the reward noise
is drawn from a generator seeded with 1001 through ``RL2.evaluate``, so it is not the same
noise sequence the baselines saw (their actions differ anyway, so the noise was never paired).
Cells are the mean total reward per trial with a 95% confidence half-width
(1.96 sd / sqrt(1000)). The same weights are also scored taking the most likely action
("greedy" column; not the paper's protocol), on the validation instances too, so that which way of
acting is better can be decided without the evaluation instances. Writes (and merges into)
benchmarks/results/rl2.json (``--out``) without losing an earlier run: a run becomes its setting's
main entry and the one it replaces is kept as a variant inside it (``--previous-as``), or it is
filed as a named variant (``--variant``); ``--merge`` records a run written to another file.

    python benchmarks/rl2.py --settings mdp-n25 --minutes 100 --out /tmp/mdp.json     # a run apart
    python benchmarks/rl2.py --settings mdp-n25 --merge /tmp/mdp.json --variant variant_long_run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from metafit import rl
from metafit.errors import ConfigError
from metafit.rl.rl2 import RL2
from metafit.training.checkpoint import (FORMAT, FORMAT_VERSION, join_optimizer_state, read_checkpoint,
                                         split_optimizer_state, write_checkpoint)
from metafit.training.metrics_log import write_json
from metafit.training.rl_run import WeightAverage

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "rl2.json"
BASELINES = HERE / "results" / "rl_baselines.json"

# the baselines' seeds (benchmarks/rl_baselines.py)
EVAL_TASK_SEED, EVAL_ENV_SEED = 1000, 1001
TUNE_TASK_SEED = 2000
INIT_SEED, TRAIN_SEED, VAL_SEED = 0, 1, 5

# RL² column of the paper: table 1 (bandits, total reward over n pulls) and table 2 (MDPs, total
# reward over n episodes)
PAPER = {"bandit-n10-k5": 6.7, "bandit-n10-k10": 6.7, "bandit-n10-k50": 6.8,
         "bandit-n100-k5": 78.7, "bandit-n100-k10": 83.5, "bandit-n100-k50": 84.9,
         "mdp-n10": 156.2, "mdp-n25": 445.7}

# Hyperparameters, chosen with 1.5-3 minute runs scored on the validation (tuning) instances of
# bandit n=10, k=5 and MDP n=10 only (never the evaluation instances). Bandits: 64 GRU units beat
# 128 and 256 per CPU second (6.68 vs 6.53 vs 6.40 after 90-120 s), entropy 0.03 beat 0.01/0.05,
# lr 1e-3 beat 3e-4/2e-3, 250 trials per update beat 1000, the elapsed-time input helped a little.
# MDPs: GAE lambda 0.9 beat the paper's 0.3 (120.6 vs 112 after 150 s), lr 2e-3 beat 1e-3 and 3e-3,
# 128 units were no better than 64 in that time. Everything else: RL2Config defaults
# (gamma 0.99, PPO clip 0.2, 4 epochs x 4 minibatches, value/advantage normalisation, grad norm 1).
BANDIT_CFG = dict(hidden_size=64, meta_batch_size=250, meta_lr=1e-3, entropy_coef=0.03, time_input=True)
MDP_CFG = dict(hidden_size=64, meta_batch_size=250, meta_lr=2e-3, entropy_coef=0.01, time_input=True,
               gae_lambda=0.9)

# setting -> (family kind, n, k, default training minutes); priorities first
SETTINGS = {
    "bandit-n10-k5": ("bandit", 10, 5, 4.0),
    "bandit-n10-k10": ("bandit", 10, 10, 4.0),
    "bandit-n10-k50": ("bandit", 10, 50, 4.0),
    "mdp-n10": ("mdp", 10, None, 15.0),
    "bandit-n100-k5": ("bandit", 100, 5, 8.0),
    "bandit-n100-k10": ("bandit", 100, 10, 8.0),
    "bandit-n100-k50": ("bandit", 100, 50, 8.0),
    "mdp-n25": ("mdp", 25, None, 12.0),
}


def baseline_key(name: str) -> tuple[str, str]:
    kind, n, k, _ = SETTINGS[name]
    return ("bandits", f"n={n},k={k}") if kind == "bandit" else ("mdps", f"n={n}")


def same_network(a: str, b: str) -> bool:
    """Whether settings ``a`` and ``b`` give the network the same inputs and outputs (the same family;
    for bandits the same number of arms): only the trial length differs, which no weight depends on,
    so weights kept at one can start the other (e.g. MDPs n=10 -> n=25, a curriculum)."""
    (ka, _, arms_a, _), (kb, _, arms_b, _) = SETTINGS[a], SETTINGS[b]
    return ka == kb and arms_a == arms_b


def make_setting(name: str, val_instances: int, eval_instances: int):
    kind, n, k, _ = SETTINGS[name]
    if kind == "bandit":
        family = rl.BanditFamily(n_arms=k)
        cfg = dict(BANDIT_CFG, n_episodes=n)
        eval_seed, tune_seed = EVAL_TASK_SEED + 31 * k, TUNE_TASK_SEED + 31 * k
    else:
        family = rl.TabularMDPFamily()
        cfg = dict(MDP_CFG, n_episodes=n)
        eval_seed, tune_seed = EVAL_TASK_SEED, TUNE_TASK_SEED
    eval_tasks = family.sample_tasks(eval_instances, torch.Generator().manual_seed(eval_seed))
    # the baselines' tuning instances (the first val_instances of them): never the evaluation ones
    val_tasks = family.sample_tasks(val_instances, torch.Generator().manual_seed(tune_seed))
    return family, cfg, eval_tasks, val_tasks


def load_kept(name: str, weights: Path | str, family) -> RL2:
    """An RL2 learner (eval mode) with the weights this script kept (``--save-weights``) for setting
    ``name``; refuses weights kept for another setting (SystemExit naming both)."""
    meta, tensors = read_checkpoint(weights)
    if meta.get("setting") != name:
        raise SystemExit(f"--weights {name}=... must be weights benchmarks/rl2.py kept for {name}; "
                         f"{weights} is from {meta.get('setting')!r}")
    learner = RL2(meta["config"], family)
    learner.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
    return learner.eval()


def diagnostics_main(script: str, doc: str, kind: str, default: dict, out: Path, default_seeds: int,
                     diagnose, print_table, extra: dict | None = None) -> None:
    """The command line shared by the diagnostics scripts of kept weights (rl2_bandit_diagnostics.py,
    rl2_mdp_diagnostics.py): ``--weights SETTING=PATH`` (settings of ``kind``; default ``default``),
    ``--seeds``, ``--threads``, ``--out``; runs ``diagnose(name, path, seeds)`` per setting, prints the
    table and writes the JSON (with ``extra`` fields)."""
    label = {"bandit": "a bandit", "mdp": "an MDP"}[kind]
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--weights", action="append", default=[], metavar="SETTING=PATH",
                    help=f"{kind} setting of benchmarks/rl2.py and the weights it kept (default: the main "
                         f"entries of {', '.join(default)})")
    ap.add_argument("--seeds", type=int, default=default_seeds,
                    help=f"noise seeds per agent (default {default_seeds})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(out))
    args = ap.parse_args()
    pairs = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or name not in SETTINGS or SETTINGS[name][0] != kind:
            ap.error(f"--weights must be SETTING=PATH with {label} setting of benchmarks/rl2.py; got {item!r}")
        pairs[name] = Path(path)
    pairs = pairs or default
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1; got {args.seeds}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {name: diagnose(name, Path(path), list(range(args.seeds))) for name, path in pairs.items()}
    print_table(results)
    write_json(args.out, {
        "benchmark": Path(script).stem,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": args.threads},
        "command": f"python benchmarks/{Path(script).name}"
                   + "".join(f" --weights {n}={p}" for n, p in pairs.items() if args.weights)
                   + (f" --seeds {args.seeds}" if args.seeds != default_seeds else ""),
        "seeds": args.seeds,
        **(extra or {}),
        "settings": results,
        "seconds": round(time.perf_counter() - t0, 1),
    })
    print(f"wrote {args.out}")


def run_setting(name: str, minutes: float, max_iterations: int | None, val_instances: int,
                eval_instances: int, val_points: int, overrides: dict | None = None,
                device: str = "cpu", ema_decay: float = 0.0, init_weights: str | None = None,
                save_weights: str | None = None, fresh_optimizer: bool = False, val_seeds: int = 1,
                widen: bool = False) -> dict:
    family, cfg, eval_tasks, val_tasks = make_setting(name, val_instances, eval_instances)
    cfg.update(overrides or {})
    torch.manual_seed(INIT_SEED)
    learner = RL2(cfg, family).to(device)
    init_setting, init_optimizer, init_hidden = None, None, None
    if init_weights:  # continue from weights an earlier run kept (with its Adam state, where it saved one)
        meta, tensors = read_checkpoint(init_weights)
        init_setting = meta.get("setting")
        if init_setting not in SETTINGS or not same_network(init_setting, name):
            raise SystemExit(f"--init-weights must come from a run of {name} or of another setting with the same "
                             f"observations and actions ({', '.join(s for s in SETTINGS if same_network(s, name))}); "
                             f"{init_weights} is from {init_setting}. Pass weights saved by --save-weights.")
        weights = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
        # Adam's moments as they were when the weights were kept: a continuation then goes on where the
        # run stopped instead of re-estimating them (a fresh Adam at 1e-3 cost 1-5 points for thousands
        # of updates at k=50). This run's param_groups stay (learning rate, betas, eps from its config).
        saved = meta.get("optimizer")
        opt_state = None
        if saved and not fresh_optimizer:
            groups = learner.optimizer_state_dict()["param_groups"]
            opt_state = join_optimizer_state(tensors, saved.get("scalars", {}), groups, device=learner.device)
            init_optimizer = "restored"
        else:
            init_optimizer = "fresh (--fresh-optimizer)" if saved else "fresh (none saved with the weights)"
        try:
            if widen:  # a narrower network's weights in this wider one, computing the same policy and value
                init_hidden = int(weights["gru.weight_hh_l0"].shape[1])
                learner.load_widened(weights, opt_state)
            else:
                learner.load_state_dict(weights)
                if opt_state is not None:
                    learner.load_optimizer_state_dict(opt_state)
        except (RuntimeError, ConfigError, KeyError) as exc:
            raise SystemExit(f"--init-weights {init_weights} does not fit this network ({exc}). Pass the same "
                             f"--set options the run that saved it used (with --widen: all but hidden_size): "
                             f"{meta.get('config')}") from None
        learner.start_new_run()  # the schedule (lr_decay_start...) counts this run's updates only
    # an exponential moving average of the weights, scored beside the live ones at every validation
    ema = WeightAverage(learner, ema_decay) if ema_decay else None
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    budget = 60.0 * minutes
    curve, val_curve, stats_curve = [], [], []
    best, best_state, best_iter, best_kind = -float("inf"), None, 0, "live"
    best_opt = None  # the optimizer's state when best_state was kept (for --save-weights)
    train_s, val_s, env_steps, it = 0.0, 0.0, 0, 0
    iter_seconds: list[float] = []
    next_val = budget / val_points

    def score(model: RL2) -> float:
        model.eval()
        # one trial per validation instance and noise seed: more seeds, less noise in which weights are kept
        value = sum(float(model.evaluate(val_tasks, torch.Generator().manual_seed(VAL_SEED + i)).sum(1).mean())
                    for i in range(val_seeds)) / val_seeds
        model.train()
        return value

    def keep_weights() -> None:
        """Write the weights kept so far (with Adam's state at that point) to --save-weights, atomically:
        a run stopped or lost part-way leaves its best weights behind, not nothing."""
        if not save_weights:
            return
        tensors = dict(best_state)
        opt_tensors, opt_scalars = split_optimizer_state(best_opt)
        tensors.update(opt_tensors)
        write_checkpoint(save_weights, tensors,
                         {"format": FORMAT, "format_version": FORMAT_VERSION, "setting": name,
                          "config": learner.config.model_dump(mode="json"), "iteration": best_iter,
                          "val_return": best, "weights": best_kind,
                          "optimizer": {"scalars": opt_scalars, "param_groups": best_opt["param_groups"]}})

    def validate() -> None:
        nonlocal best, best_state, best_iter, best_kind, best_opt, val_s
        t0 = time.perf_counter()
        point = {"iteration": it, "train_minutes": round(train_s / 60, 3), "val_return": round(score(learner), 4)}
        if ema is not None and it > 0:
            with ema.swapped_in():
                point["val_return_ema"] = round(score(learner), 4)
        val_curve.append(point)
        kept_before = best
        if point["val_return"] > best:
            best, best_iter, best_kind = point["val_return"], it, "live"
            best_state = copy.deepcopy(learner.state_dict())
            best_opt = copy.deepcopy(learner.optimizer_state_dict())
        if point.get("val_return_ema", -float("inf")) > best:
            best, best_iter, best_kind = point["val_return_ema"], it, "ema"
            with ema.swapped_in():  # the averaged weights with the live buffers (value statistics, update count)
                best_state = copy.deepcopy(learner.state_dict())
            best_opt = copy.deepcopy(learner.optimizer_state_dict())  # the live weights' moments: the closest there is
        if best != kept_before:
            keep_weights()
        val_s += time.perf_counter() - t0
        ema_s = f"  ema {point['val_return_ema']:8.3f}" if "val_return_ema" in point else ""
        print(f"    {name}: it {it:5d}  {train_s / 60:5.1f} min  train {curve[-1][1] if curve else float('nan'):8.3f}"
              f"  val {point['val_return']:8.3f}{ema_s}  (best {best:.3f} @ {best_iter} {best_kind})", flush=True)

    validate()
    while train_s < budget and (max_iterations is None or it < max_iterations):
        t0 = time.perf_counter()
        stats = learner.train_iteration(gen)
        if ema is not None:
            ema.update()
        iter_seconds.append(time.perf_counter() - t0)
        train_s += iter_seconds[-1]
        it += 1
        env_steps += int(stats["env_steps"])
        curve.append((it, round(stats["return"], 4)))
        stats_curve.append((it, round(stats["entropy"], 4), round(stats["approx_kl"], 5), int(stats["updates"])))
        if train_s >= next_val or train_s >= budget or (max_iterations is not None and it >= max_iterations):
            validate()
            next_val += budget / val_points
    learner.load_state_dict(best_state)  # --save-weights already holds these (written when they were kept)
    learner.eval()
    # the kept weights, validation instances, most likely actions: which way of acting to prefer
    with torch.no_grad():
        val_greedy = sum(float(learner.rollout(val_tasks, torch.Generator().manual_seed(VAL_SEED + i), greedy=True)
                               .episode_returns.sum(1).mean()) for i in range(val_seeds)) / val_seeds
    t0 = time.perf_counter()
    returns = learner.evaluate(eval_tasks, torch.Generator().manual_seed(EVAL_ENV_SEED))
    eval_s = time.perf_counter() - t0
    mean, ci = rl.mean_ci(returns.sum(1))
    with torch.no_grad():
        greedy_returns = learner.rollout(eval_tasks, torch.Generator().manual_seed(EVAL_ENV_SEED),
                                         greedy=True).episode_returns.cpu()
    g_mean, g_ci = rl.mean_ci(greedy_returns.sum(1))
    return {
        "family": "bandit" if isinstance(family, rl.BanditFamily) else "tabular-mdp",
        "family_settings": {"n_arms": family.n_arms} if isinstance(family, rl.BanditFamily) else {},
        "config": learner.config.model_dump(mode="json"),
        "iterations": it,
        "train_minutes": round(train_s / 60, 3),
        "validation_minutes": round(val_s / 60, 3),
        "eval_seconds": round(eval_s, 2),
        "env_steps": env_steps,
        "iteration_seconds": {"median": round(sorted(iter_seconds)[len(iter_seconds) // 2], 4),
                              "max": round(max(iter_seconds), 4)} if iter_seconds else None,
        "init_weights_setting": init_setting,  # the setting the starting weights were trained on (or None)
        "init_optimizer": init_optimizer,  # with --init-weights: "restored" (Adam's saved state) or why fresh
        "init_widened_from": init_hidden,  # with --widen: the kept network's GRU units (else None)
        "best_iteration": best_iter,
        "best_val_return": best,
        "best_weights": best_kind,  # "live", or "ema": the moving average (ema_decay) scored better
        "ema_decay": ema_decay,
        "val_points": val_points,
        "val_seeds": val_seeds,  # noise seeds per validation (VAL_SEED, VAL_SEED + 1, ...), averaged
        # (iteration, mean training return), at most ~1000 points: every stride-th iteration, and the last
        "learning_curve_stride": (stride := -(-len(curve) // 1000) or 1),
        "learning_curve": _thin(curve, stride),
        # at the same iterations: the policy's mean entropy and approximate KL over the update's
        # minibatch steps, and how many minibatch steps it took (target_kl stops an update early)
        "training_stats_columns": ["iteration", "entropy", "approx_kl", "minibatch_steps"],
        "training_stats_curve": _thin(stats_curve, stride),
        "validation_curve": val_curve,
        "eval": {"mean": mean, "ci95": ci, "instances": len(eval_tasks),
                 "per_episode_mean": [round(float(x), 4) for x in returns.double().mean(0)]},
        # the same weights taking the most likely action (not the paper's protocol); its validation
        # score against the sampled one (best_val_return) says which to prefer without the test set
        "eval_greedy": {"mean": g_mean, "ci95": g_ci, "val_return": val_greedy},
        "paper_rl2": PAPER[name],
    }


def _thin(points: list, stride: int) -> list:
    """Every stride-th point, and the last one."""
    return points[::stride] + ([points[-1]] if points and (len(points) - 1) % stride else [])


# a variant's learning and training-statistics curves are kept at about this many points (main
# entries keep up to ~1000): the file holds dozens of variants, their figures and validation curves whole
VARIANT_CURVE_POINTS = 250


def _is_entry(value) -> bool:
    """A run's entry (a main entry's nested variants are entries too)."""
    return isinstance(value, dict) and "eval" in value and "config" in value


def _own_fields(entry: dict) -> dict:
    """The run itself, without the variants nested in it."""
    return {k: v for k, v in entry.items() if not _is_entry(v)}


def thin_variant(entry: dict, max_points: int = VARIANT_CURVE_POINTS) -> dict:
    """A copy of a run's own fields with its per-update curves thinned to at most about
    ``max_points``: every ``learning_curve_stride``-th update (the stride grows by the factor
    applied) and the last; figures and the validation curve are kept whole."""
    out = copy.deepcopy(_own_fields(entry))
    curve = out.get("learning_curve") or []
    factor = -(-len(curve) // max_points)
    if factor > 1:
        for key in ("learning_curve", "training_stats_curve"):
            if key in out:
                out[key] = _thin(out[key], factor)
        out["learning_curve_stride"] = out.get("learning_curve_stride", 1) * factor
    return out


def record(results: dict, setting: str, entry: dict, variant: str | None = None,
           previous_as: str | None = None) -> str:
    """Put a run's ``entry`` into ``results`` (the ``settings`` of rl2.json) without losing any
    earlier run, and return the key it was filed under.

    With ``variant``, the run is filed (curves thinned) under that name inside the setting's main
    entry, which stays as it is. Without, it becomes the setting's main entry: the variants nested
    in the old one move to it, and the old main run itself becomes a variant named ``previous_as``
    (default ``previous_run``, or ``previous_run_2``, ... where taken). Names already in use are
    refused (``ValueError``)."""
    old = results.get(setting)
    if variant is not None:
        if old is None:
            raise ValueError(f"--variant {variant}: {setting} has no main entry in this file to file a variant "
                             "under; record the run as the main entry (leave out --variant)")
        if variant in old:
            raise ValueError(f"--variant must name a new key of {setting}; {variant!r} is taken. Choose another name")
        old[variant] = thin_variant(entry)
        return variant
    new = copy.deepcopy(_own_fields(entry))
    if old is not None:
        nested = {k: v for k, v in old.items() if _is_entry(v)}
        if _is_entry(old):
            name = previous_as
            if name is None:
                name, i = "previous_run", 2
                while name in nested:
                    name, i = f"previous_run_{i}", i + 1
            if name in nested or name in new:
                raise ValueError(f"--previous-as must name a new key of {setting}; {name!r} is taken. "
                                 "Choose another name")
            nested[name] = thin_variant(old)
        new.update(nested)
    results[setting] = new
    return setting


def _baselines() -> dict:
    try:
        return json.loads(BASELINES.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _best_baseline(row: dict) -> tuple[str, dict] | None:
    cells = [(k, v) for k, v in row.items()
             if not k.startswith("_") and isinstance(v, dict) and "mean" in v and not k.startswith("Oracle")]
    return max(cells, key=lambda kv: kv[1]["mean"]) if cells else None


def print_table(results: dict) -> None:
    base = _baselines()
    head = (f"{'setting':<17}{'RL2 (ours)':>15}{'greedy':>15}{'paper RL2':>11}{'best baseline (ours)':>36}{'Random':>9}"
            f"{'Oracle':>9}{'train min':>11}{'iters':>7}{'env steps':>12}")
    print("\n" + head)
    print("-" * len(head))
    for name in SETTINGS:
        if name not in results:
            continue
        r = results[name]
        section, key = baseline_key(name)
        row = base.get(section, {}).get(key, {})
        bb = _best_baseline(row)
        bb_s = f"{bb[0][:18]} {bb[1]['mean']:.1f}±{bb[1]['ci95']:.1f}" if bb else "n/a"
        rnd = row.get("Random", {}).get("mean")
        orc = next((v["mean"] for k, v in row.items() if k.startswith("Oracle")), None)
        gr = r.get("eval_greedy")
        gr_s = f"{gr['mean']:>9.2f}±{gr['ci95']:<5.2f}" if gr else f"{'n/a':>15}"
        print(f"{name:<17}{r['eval']['mean']:>9.2f}±{r['eval']['ci95']:<5.2f}{gr_s}{r['paper_rl2']:>11.1f}{bb_s:>36}"
              f"{(f'{rnd:.1f}' if rnd is not None else 'n/a'):>9}{(f'{orc:.1f}' if orc is not None else 'n/a'):>9}"
              f"{r['train_minutes']:>11.1f}{r['iterations']:>7}{r['env_steps']:>12,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    ap.add_argument("--minutes", type=float, default=None,
                    help="training minutes per setting (default: per setting, "
                         + ", ".join(f"{k} {v[3]:g}" for k, v in SETTINGS.items()) + ")")
    ap.add_argument("--iterations", type=int, default=None, help="also stop after this many PPO updates")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--val-instances", type=int, default=500, help="validation instances (baselines' tuning seed)")
    ap.add_argument("--instances", type=int, default=1000, help="evaluation instances")
    ap.add_argument("--val-points", type=int, default=10, help="validations per setting")
    ap.add_argument("--val-seeds", type=int, default=1,
                    help="noise seeds per validation, scores averaged (default 1): at n=100 one seed's score moves "
                         "by 0.3-1.0 with the seed alone (benchmarks/rl2_bandit_diagnostics.py), as much as the "
                         "differences between late checkpoints; each seed costs one more pass over the instances")
    ap.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                    help="also keep an exponential moving average of the weights (e.g. 0.995), score it at "
                         "every validation and keep it when it scores better (default 0: off)")
    ap.add_argument("--init-weights", default=None, metavar="PATH",
                    help="start from the weights a run saved (--save-weights): of the same setting, or of one with the "
                         "same family and arms (a shorter trial: a curriculum), and from Adam's state saved with "
                         "them; one setting only")
    ap.add_argument("--save-weights", default=None, metavar="PATH",
                    help="write the kept weights (safetensors) here, with Adam's state at that point, each time the "
                         "kept weights change (so a stopped run leaves its best so far); one setting only")
    ap.add_argument("--fresh-optimizer", action="store_true",
                    help="with --init-weights: start Adam afresh even where the weights came with its state "
                         "(weights saved before 2026-12-04 never do)")
    ap.add_argument("--widen", action="store_true",
                    help="with --init-weights and a larger --set hidden_size: load the narrower network's weights "
                         "into the wider one so that it plays exactly the same policy at the start "
                         "(RL2.load_widened); Adam's saved moments are widened with zeros")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 minutes, 100/200 instances")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an RL2Config field for every setting (e.g. hidden_size=128)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--variant", default=None, metavar="NAME",
                    help="file the run in --out as variant NAME of its setting (curves thinned to ~250 points), "
                         "leaving the setting's main entry as it is; default: the run becomes the main entry")
    ap.add_argument("--previous-as", default=None, metavar="NAME",
                    help="when the run becomes the main entry: the variant name the replaced main run is kept "
                         "under (default previous_run, previous_run_2, ...); its own variants stay with the setting")
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="train nothing: record the main entries of --settings from JSON (another run's --out) "
                         "into --out, by the same rules (--variant, --previous-as)")
    args = ap.parse_args()
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        ap.error(f"--settings must name settings from {', '.join(SETTINGS)}; got {', '.join(unknown)}")
    if (args.init_weights or args.save_weights) and len(names) != 1:
        ap.error("--init-weights and --save-weights need exactly one setting in --settings")
    if args.widen and not args.init_weights:
        ap.error("--widen needs --init-weights (the narrower network's weights) and a larger --set hidden_size")
    if args.val_seeds < 1:
        ap.error(f"--val-seeds must be at least 1; got {args.val_seeds}")
    if args.quick:
        args.minutes, args.val_instances, args.instances, args.val_points = 0.1, 100, 200, 2
    import yaml
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            ap.error(f"--set must be KEY=VALUE; got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        # full fp32 in the GRU and heads, as on the CPU: cuDNN's RNNs default to TF32 on recent GPUs,
        # which would make PPO's recomputed log-probabilities differ from the rollout's (ratio != 1)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out)
    try:
        report = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        report = {}
    results = report.get("settings", {})
    for name in names:  # refuse a name already in use before training, not after
        try:
            record(copy.deepcopy(results), name, {"eval": {}, "config": {}}, args.variant, args.previous_as)
        except ValueError as err:
            ap.error(str(err))
    if args.merge:
        try:
            source = json.loads(Path(args.merge).read_text())
        except (OSError, json.JSONDecodeError) as err:
            ap.error(f"--merge must name a JSON file that benchmarks/rl2.py wrote; {args.merge}: {err}")
        missing = [n for n in names if not _is_entry(source.get("settings", {}).get(n))]
        if missing:
            ap.error(f"--merge: {args.merge} has no run of {', '.join(missing)}; pass --settings with the settings "
                     f"it holds ({', '.join(source.get('settings', {})) or 'none'})")
        for name in names:
            key = record(results, name, source["settings"][name], args.variant, args.previous_as)
            print(f"{name}: recorded {'as the main entry' if key == name else 'as variant ' + key} in {out}")
        for field in ("benchmark", "date", "machine", "protocol", "paper_rl2"):
            report.setdefault(field, source.get(field))
        report["settings"] = results
        write_json(out, report)
        return
    t_all = time.perf_counter()
    ran = {}
    for name in names:
        minutes = args.minutes if args.minutes is not None else SETTINGS[name][3]
        print(f"{name}: training {minutes:g} min ...", flush=True)
        t0 = time.perf_counter()
        r = run_setting(name, minutes, args.iterations, args.val_instances, args.instances,
                        args.val_points, overrides, args.device, args.ema, args.init_weights,
                        args.save_weights, args.fresh_optimizer, args.val_seeds, args.widen)
        r["wall_minutes"] = round((time.perf_counter() - t0) / 60, 3)
        r["command"] = ("python benchmarks/rl2.py --settings " + name
                        + (f" --minutes {args.minutes:g}" if args.minutes is not None else "")
                        + (f" --iterations {args.iterations}" if args.iterations is not None else "")
                        + (f" --val-points {args.val_points}"
                           if args.val_points != 10 and not args.quick else "")
                        + (f" --val-instances {args.val_instances}"
                           if args.val_instances != 500 and not args.quick else "")
                        + (f" --instances {args.instances}"
                           if args.instances != 1000 and not args.quick else "")
                        + (f" --val-seeds {args.val_seeds}" if args.val_seeds != 1 else "")
                        + (f" --ema {args.ema:g}" if args.ema else "")
                        + (f" --init-weights {args.init_weights}" if args.init_weights else "")
                        + (f" --save-weights {args.save_weights}" if args.save_weights else "")
                        + (" --fresh-optimizer" if args.fresh_optimizer else "")
                        + (" --widen" if args.widen else "")
                        + (" --quick" if args.quick else "") + f" --threads {args.threads}"
                        + (f" --device {args.device}" if args.device != "cpu" else "")
                        + "".join(f" --set {item}" for item in args.set))
        r["device"] = args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device)
        ran[name] = r
        key = record(results, name, r, args.variant, args.previous_as)
        if key != name:
            print(f"  {name}: recorded as variant {key}", flush=True)
        print(f"  {name}: {r['eval']['mean']:.2f} ± {r['eval']['ci95']:.2f} (paper {PAPER[name]}) after "
              f"{r['iterations']} iterations, {r['train_minutes']:.1f} training min", flush=True)
        report.update({
            "benchmark": "rl2",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": args.threads},
            "protocol": {
                "eval_instances": args.instances, "val_instances": args.val_instances,
                "seeds": {"eval_tasks": f"{EVAL_TASK_SEED} + 31 k (bandits), {EVAL_TASK_SEED} (MDPs)",
                          "eval_generator": EVAL_ENV_SEED,
                          "val_tasks": f"{TUNE_TASK_SEED} + 31 k (bandits), {TUNE_TASK_SEED} (MDPs)",
                          "val_generator": VAL_SEED, "init": INIT_SEED, "training": TRAIN_SEED},
                "selection": "weights with the best validation score (val-points validations per budget)",
                "actions": "sampled from the policy at evaluation (as the paper)",
                "ci": "95% normal half-width over instances",
                "quick": args.quick,
            },
            "paper_rl2": PAPER,
            "settings": results,
        })
        write_json(out, report)
    print_table({**results, **ran})  # this run's rows, also where it was filed as a variant
    print(f"\ntotal {(time.perf_counter() - t_all) / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
