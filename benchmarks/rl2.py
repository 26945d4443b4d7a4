"""RL² (Duan et al. 2016) trained with PPO on Bernoulli bandits (table 1) and random tabular MDPs
(table 2), evaluated on the same 1000 evaluation instances as benchmarks/rl_baselines.py.

    python benchmarks/rl2.py                                   # every setting, default budgets
    python benchmarks/rl2.py --settings bandit-n10-k5,mdp-n10 --minutes 3
    python benchmarks/rl2.py --quick                            # smoke run: seconds per setting
    python benchmarks/rl2.py --settings bandit-n100-k10 --iterations 0 \
        --init-weights benchmarks/results/weights/rl2_bandit-n100-k10_lambda0.97_gamma1_continued.safetensors \
        --out /tmp/rescore.json                                 # re-score kept weights (seconds)

Protocol. Each setting trains with the entry point a user calls, ``metafit rl train``
(:func:`metafit.training.rl_run.train_rl`), from a run config this script writes into the run's
folder (``--run-dir``): family and trial length of the setting, the learner settings below plus
``--set``, a budget of ``--minutes`` (training time) and ``--iterations``. Every ``--val-every``
updates the run scores the policy on *validation* instances -- the baselines' separate tuning
instances (seed 2000 + 31 k for bandits, 2000 for MDPs; ``train.eval_seed``), one trial each -- and
keeps the best-scoring weights (``--ema``: also a moving average of the weights,
``train.weight_average``). Those weights then play one trial in each of the 1000 evaluation
instances of rl_baselines.py (tasks from seed 1000 + 31 k / 1000; reward noise and sampled
actions from a generator seeded with 1001 through ``RL2.evaluate``, as in the paper). Cells are
the mean total reward per trial with a 95% confidence half-width (1.96 sd / sqrt(1000)); the same
weights taking the most likely action give the "greedy" column (not the paper's protocol).
``--init-weights`` starts a run from kept weights (``train.init_from``: a fresh optimizer; weights of
another trial length of the same family are a curriculum). Runs are recorded in
benchmarks/results/rl2.json (``--out``) by benchmarks/rl2_record.py's rules (``--variant``,
``--previous-as``, ``--merge``).

Runs recorded before issue 37 used this script's own training loop (git history): validations
spaced by training time, several noise seeds per validation, Adam's state carried over by
``--init-weights``, and widening a kept network to more units; benchmarks/results/weights/MANIFEST.json
says which figure came from which command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from metafit.training import write_json
from metafit.training import load_rl_config, train_rl
from rl2_record import _is_entry, _thin, print_table, record
from rl2_setup import (EVAL_ENV_SEED, EVAL_TASK_SEED, PAPER, SEED, SETTINGS, TUNE_TASK_SEED, family_section,
                       is_run_checkpoint, load_kept, make_setting, read_kept, score, task_seeds)

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "rl2.json"


def run_config(name: str, args, overrides: dict, run_dir: Path, minutes: float) -> dict:
    """The ``metafit rl train`` config of one setting's run."""
    _, cfg, _, _ = make_setting(name, 1, 1)
    iterations = args.iterations or 10**7  # the time budget stops it otherwise
    train = {"iterations": iterations, "eval_every": min(args.val_every, iterations), "save_interval": iterations,
             "eval_tasks": args.val_instances, "eval_seed": task_seeds(name)[1], "max_minutes": minutes,
             "weight_average": args.ema, "init_from": args.init_weights, "device": args.device,
             "num_threads": args.threads, "progress": False, "tensorboard": False}
    return {"seed": SEED, "out_dir": str(run_dir), "family": family_section(name),
            "learner": {"name": "rl2", **cfg, **overrides}, "train": train}


def train_setting(name: str, args, overrides: dict, minutes: float) -> dict:
    """Train one setting through metafit rl train and score the weights it kept."""
    run_dir = Path(args.run_dir) / name
    if args.init_weights:
        load_kept(name, args.init_weights, make_setting(name, 1, 1)[0], overrides)  # refuses another family's
        if not is_run_checkpoint(args.init_weights):
            raise SystemExit(f"--init-weights {args.init_weights} is a weights file of an earlier version of this "
                             "script: it can be re-scored (--iterations 0) but a run starts from metafit rl "
                             "checkpoints only (the best.safetensors of a run, or --save-weights of this version)")
    config = load_rl_config(run_config(name, args, overrides, run_dir, minutes))
    report = train_rl(config, test=False, overwrite=True)
    best = Path(report["best_checkpoint"])
    if args.save_weights:
        Path(args.save_weights).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, args.save_weights)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["iteration"], round(r["return"], 4)) for r in rows if r["split"] == "train"]
    stats = [(r["iteration"], round(r["entropy"], 4), round(r["approx_kl"], 5), int(r["updates"]))
             for r in rows if r["split"] == "train"]
    stride = -(-len(curve) // 1000) or 1
    family, _, eval_tasks, _ = make_setting(name, 1, args.instances)
    learner = load_kept(name, best, family)
    return {
        "family": config.family.name, "family_settings": config.family.settings,
        "config": config.learner.model_dump(mode="json"), "run_config": config.to_dict(),
        "iterations": report["iterations"], "train_minutes": round(report["train_seconds"] / 60, 3),
        "env_steps": report["env_steps"],
        "init_weights_setting": read_kept(args.init_weights)[0] if args.init_weights else None,
        "best_iteration": report["best_iteration"], "best_val_return": report["val"]["score"],
        "best_weights": report["best_weights"], "ema_decay": args.ema, "val_every": args.val_every,
        "learning_curve_stride": stride, "learning_curve": _thin(curve, stride),
        "training_stats_columns": ["iteration", "entropy", "approx_kl", "minibatch_steps"],
        "training_stats_curve": _thin(stats, stride),
        "validation_curve": [{"iteration": r["iteration"], "val_return": r["score"],
                              **({"val_return_ema": r["score_average"]} if "score_average" in r else {})}
                             for r in rows if r["split"] == "val"],
        **score(learner, eval_tasks), "paper_rl2": PAPER[name],
    }


def rescore_setting(name: str, args, overrides: dict) -> dict:
    """``--iterations 0``: score kept weights on the validation and evaluation instances, training nothing."""
    family, _, eval_tasks, val_tasks = make_setting(name, args.val_instances, args.instances)
    learner = load_kept(name, args.init_weights, family, overrides)
    val = learner.evaluate(val_tasks, torch.Generator().manual_seed(task_seeds(name)[1] + 7)).sum(1).mean()
    return {"family": family_section(name)["name"], "family_settings": family_section(name)["settings"],
            "config": learner.config.model_dump(mode="json"), "iterations": 0, "train_minutes": 0.0, "env_steps": 0,
            "init_weights_setting": read_kept(args.init_weights)[0], "best_iteration": 0,
            "best_val_return": round(float(val), 4), "best_weights": "init", "validation_curve": [],
            **score(learner, eval_tasks), "paper_rl2": PAPER[name]}


def command(name: str, args) -> str:
    """The command line that reproduces one setting's run."""
    parts = ["python benchmarks/rl2.py --settings", name]
    defaults = {"minutes": None, "iterations": None, "val_every": 100, "val_instances": 500, "instances": 1000,
                "ema": 0.0, "init_weights": None, "save_weights": None, "device": "cpu"}
    for key, default in defaults.items():
        value = getattr(args, key)
        if value != default and not (args.quick and key in ("minutes", "val_instances", "instances")):
            parts.append(f"--{key.replace('_', '-')} {value:g}" if isinstance(value, float) else
                         f"--{key.replace('_', '-')} {value}")
    parts += ["--quick"] * args.quick + [f"--threads {args.threads}"] + [f"--set {item}" for item in args.set]
    return " ".join(parts)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of: {', '.join(SETTINGS)}")
    ap.add_argument("--minutes", type=float, default=None,
                    help="training minutes per setting (train.max_minutes; default: per setting, "
                         + ", ".join(f"{k} {v[3]:g}" for k, v in SETTINGS.items()) + ")")
    ap.add_argument("--iterations", type=int, default=None,
                    help="also stop after this many PPO updates; 0: train nothing, re-score --init-weights")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--val-instances", type=int, default=500, help="validation instances (baselines' tuning seed)")
    ap.add_argument("--instances", type=int, default=1000, help="evaluation instances")
    ap.add_argument("--val-every", type=int, default=100, help="validate every this many updates (train.eval_every)")
    ap.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                    help="also keep a moving average of the weights and keep it when it scores better "
                         "(train.weight_average, e.g. 0.995; default 0: off)")
    ap.add_argument("--init-weights", default=None, metavar="PATH",
                    help="start from kept weights (train.init_from; of the same setting, or of one with the same family "
                         "and arms: a curriculum), or with --iterations 0 re-score them; one setting only")
    ap.add_argument("--save-weights", default=None, metavar="PATH",
                    help="copy the kept weights (the run's best.safetensors) here; one setting only")
    ap.add_argument("--run-dir", default="runs/benchmarks/rl2",
                    help="folder of the runs (one sub-folder per setting, replaced by a new run)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 minutes, 100/200 instances")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto (train.device)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an RL2Config field for every setting (e.g. hidden_size=128)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--variant", default=None, metavar="NAME",
                    help="file the run in --out as variant NAME of its setting (curves thinned to ~250 points), "
                         "leaving the setting's main entry as it is; default: the run becomes the main entry")
    ap.add_argument("--previous-as", default=None, metavar="NAME",
                    help="when the run becomes the main entry: the variant name the replaced main run is kept under")
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="train nothing: record the main entries of --settings from JSON (another run's --out) "
                         "into --out, by the same rules (--variant, --previous-as)")
    args = ap.parse_args()
    args.names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.names if s not in SETTINGS]
    if unknown:
        ap.error(f"--settings must name settings from {', '.join(SETTINGS)}; got {', '.join(unknown)}")
    if (args.init_weights or args.save_weights) and len(args.names) != 1:
        ap.error("--init-weights and --save-weights need exactly one setting in --settings")
    if args.iterations == 0 and not args.init_weights and not args.merge:
        ap.error("--iterations 0 re-scores kept weights: pass --init-weights PATH")
    if args.quick:
        args.minutes, args.val_instances, args.instances, args.val_every = 0.1, 100, 200, 10
    args.overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            ap.error(f"--set must be KEY=VALUE; got {item!r}")
        args.overrides[key.strip()] = yaml.safe_load(value)
    args.error = ap.error
    return args


def merge(args, report: dict, results: dict, out: Path) -> None:
    try:
        source = json.loads(Path(args.merge).read_text())
    except (OSError, json.JSONDecodeError) as err:
        args.error(f"--merge must name a JSON file that benchmarks/rl2.py wrote; {args.merge}: {err}")
    missing = [n for n in args.names if not _is_entry(source.get("settings", {}).get(n))]
    if missing:
        args.error(f"--merge: {args.merge} has no run of {', '.join(missing)}; pass --settings with the settings "
                   f"it holds ({', '.join(source.get('settings', {})) or 'none'})")
    for name in args.names:
        key = record(results, name, source["settings"][name], args.variant, args.previous_as)
        print(f"{name}: recorded {'as the main entry' if key == name else 'as variant ' + key} in {out}")
    for field in ("benchmark", "date", "machine", "protocol", "paper_rl2"):
        report.setdefault(field, source.get(field))
    report["settings"] = results
    write_json(out, report)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    try:
        report = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        report = {}
    results = report.get("settings", {})
    for name in args.names:  # refuse a name already in use before training, not after
        try:
            record(copy.deepcopy(results), name, {"eval": {}, "config": {}}, args.variant, args.previous_as)
        except ValueError as err:
            args.error(str(err))
    if args.merge:
        return merge(args, report, results, out)
    torch.set_num_threads(args.threads)
    t_all, ran = time.perf_counter(), {}
    for name in args.names:
        minutes = args.minutes if args.minutes is not None else SETTINGS[name][3]
        t0 = time.perf_counter()
        if args.iterations == 0:
            r = rescore_setting(name, args, args.overrides)
        else:
            print(f"{name}: training {minutes:g} min ...", flush=True)
            r = train_setting(name, args, args.overrides, minutes)
        r.update(wall_minutes=round((time.perf_counter() - t0) / 60, 3), command=command(name, args),
                 device=args.device if args.device == "cpu" else torch.cuda.get_device_name())
        ran[name] = r
        key = record(results, name, r, args.variant, args.previous_as)
        if key != name:
            print(f"  {name}: recorded as variant {key}", flush=True)
        print(f"  {name}: {r['eval']['mean']:.2f} ± {r['eval']['ci95']:.2f} (greedy {r['eval_greedy']['mean']:.2f} ± "
              f"{r['eval_greedy']['ci95']:.2f}; paper {PAPER[name]}) after {r['iterations']} updates", flush=True)
        report.update({
            "benchmark": "rl2", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": args.threads},
            "protocol": {
                "eval_instances": args.instances, "val_instances": args.val_instances,
                "seeds": {"eval_tasks": f"{EVAL_TASK_SEED} + 31 k (bandits), {EVAL_TASK_SEED} (MDPs)",
                          "eval_generator": EVAL_ENV_SEED,
                          "val_tasks": f"{TUNE_TASK_SEED} + 31 k (bandits), {TUNE_TASK_SEED} (MDPs)",
                          "val_generator": "the validation task seed + 7 (metafit rl train)", "run_seed": SEED},
                "selection": "weights with the best validation score (metafit rl train, every --val-every updates)",
                "actions": "sampled from the policy at evaluation (as the paper)",
                "ci": "95% normal half-width over instances", "quick": args.quick,
            },
            "paper_rl2": PAPER, "settings": results,
        })
        write_json(out, report)
    print_table({**results, **ran})  # this run's rows, also where it was filed as a variant
    print(f"\ntotal {(time.perf_counter() - t_all) / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
