"""The settings, instances and seeds of benchmarks/rl2.py, and reading the weights it keeps (shared
with rl2_bandit_diagnostics.py and rl2_mdp_diagnostics.py). Public API only: metafit.rl and
metafit.training.rl_run.

Kept weights come in two formats: a meta-RL checkpoint of ``metafit rl train`` (what the script
keeps since issue 37: the run's best.safetensors) and the older files of this script (safetensors
whose metadata names the ``setting`` and the RL2 ``config``; the weights in
benchmarks/results/weights/ are of this kind).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from metafit import rl
from metafit.training import write_json
from metafit.training import load_rl

# the baselines' seeds (benchmarks/rl_baselines.py)
EVAL_TASK_SEED, EVAL_ENV_SEED = 1000, 1001
TUNE_TASK_SEED = 2000
SEED = 0  # the run's seed: initialisation from SEED, training tasks from SEED + 1 (metafit rl train)

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


def family_section(name: str) -> dict:
    """The ``family`` section of a run config for a setting."""
    kind, _, k, _ = SETTINGS[name]
    if kind == "bandit":
        return {"name": "bandit", "settings": {"n_arms": k}}
    return {"name": "tabular-mdp", "settings": {}}


def task_seeds(name: str) -> tuple[int, int]:
    """(evaluation, tuning) task seeds of the baselines for a setting."""
    kind, _, k, _ = SETTINGS[name]
    return (EVAL_TASK_SEED + 31 * k, TUNE_TASK_SEED + 31 * k) if kind == "bandit" else (EVAL_TASK_SEED, TUNE_TASK_SEED)


def make_setting(name: str, val_instances: int, eval_instances: int):
    """(family, learner settings, evaluation tasks, validation tasks) of a setting: the validation
    tasks are the baselines' tuning instances (the first ``val_instances``), never the evaluation ones."""
    kind, n, _, _ = SETTINGS[name]
    section = family_section(name)
    family = rl.make_family(section["name"], **section["settings"])
    cfg = dict(BANDIT_CFG if kind == "bandit" else MDP_CFG, n_episodes=n)
    eval_seed, tune_seed = task_seeds(name)
    eval_tasks = family.sample_tasks(eval_instances, torch.Generator().manual_seed(eval_seed))
    val_tasks = family.sample_tasks(val_instances, torch.Generator().manual_seed(tune_seed))
    return family, cfg, eval_tasks, val_tasks


def setting_of(family: dict, n_episodes: int) -> str | None:
    """The setting a run config's family section and trial length describe (None: none does)."""
    for name, (_, n, _, _) in SETTINGS.items():
        section = {"name": family["name"], "settings": family.get("settings") or {}}
        if family_section(name) == section and n == n_episodes:
            return name
    return None


def _meta(path: Path | str) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("metafit", "{}"))
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path} must be weights benchmarks/rl2.py kept (a safetensors file); got {err}") from None


def is_run_checkpoint(path: Path | str) -> bool:
    """Whether kept weights are a checkpoint of metafit rl train (else: of an earlier version)."""
    return _meta(path).get("kind") == "rl"


def read_kept(path: Path | str) -> tuple[str | None, dict, dict[str, torch.Tensor]]:
    """(setting, RL2 settings, weights) of kept weights in either format."""
    meta = _meta(path)
    if meta.get("kind") == "rl":  # a checkpoint of metafit rl train
        learner = load_rl(path)
        config = learner.run_config
        cfg = config.learner.model_dump(mode="json")
        return setting_of(config.family.model_dump(mode="json"), cfg["n_episodes"]), cfg, learner.state_dict()
    if "setting" not in meta or "config" not in meta:
        raise SystemExit(f"{path} holds no weights of benchmarks/rl2.py (neither a metafit rl checkpoint nor a "
                         "--save-weights file of an earlier version)")
    cfg = dict(meta["config"])
    for key in ("prev_obs_input", "episode_time_input"):  # research inputs that left RL2Config in issue 37
        if cfg.pop(key, False):
            raise SystemExit(f"{path} was trained with {key}, which RL2 no longer has; score it with the version "
                             "of metafit that wrote it (git history)")
    weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith("optim.")}
    return meta["setting"], cfg, weights


def load_kept(name: str, weights: Path | str, family, overrides: dict | None = None) -> rl.RL2:
    """An RL2 learner (eval mode) with kept weights, playing trials of setting ``name`` (weights kept
    at another trial length of the same family are fine); refuses weights of another family or arms."""
    setting, cfg, state = read_kept(weights)
    if setting not in SETTINGS or not same_network(setting, name):
        fits = ", ".join(s for s in SETTINGS if same_network(s, name))
        raise SystemExit(f"--weights / --init-weights for {name} must be weights benchmarks/rl2.py kept for a setting "
                         f"with the same observations and actions ({fits}); {weights} is from {setting!r}")
    cfg.update(overrides or {}, n_episodes=SETTINGS[name][1])
    learner = rl.RL2(cfg, family)
    try:
        learner.load_state_dict(state)
    except RuntimeError as exc:
        raise SystemExit(f"{weights} does not fit this network ({str(exc).splitlines()[-1].strip()}). Pass the same "
                         f"--set options the run that kept it used: {cfg}") from None
    return learner.eval()


def score(learner: rl.RL2, eval_tasks: list) -> dict:
    """The figures of kept weights on the evaluation instances: actions sampled (the paper's protocol;
    generator EVAL_ENV_SEED through RL2.evaluate) and the most likely actions."""
    learner.eval()
    t0 = time.perf_counter()
    returns = learner.evaluate(eval_tasks, torch.Generator().manual_seed(EVAL_ENV_SEED))
    eval_s = time.perf_counter() - t0
    mean, ci = rl.mean_ci(returns.sum(1))
    with torch.no_grad():
        greedy = learner.rollout(eval_tasks, torch.Generator().manual_seed(EVAL_ENV_SEED), greedy=True)
    g_mean, g_ci = rl.mean_ci(greedy.episode_returns.cpu().sum(1))
    return {"eval": {"mean": mean, "ci95": ci, "instances": len(eval_tasks),
                     "per_episode_mean": [round(float(x), 4) for x in returns.double().mean(0)]},
            "eval_greedy": {"mean": g_mean, "ci95": g_ci}, "eval_seconds": round(eval_s, 2)}


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
