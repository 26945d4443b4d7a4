"""A tuning study on Omniglot 5-way 1-shot (Prototypical Networks) against the hand-written
default config, both under the same budget of meta-steps per training run.

    python benchmarks/tune_omniglot.py --trials 12 --steps 1500

The study searches the built-in space ``omniglot_protonet_5w1s`` (learning rate, schedule, decay,
weight decay, training ways, augmentation) with Optuna (TPE, median pruning from the validation
accuracy every ``steps/6`` steps); every trial trains ``--steps`` meta-steps with the step schedule
scaled to the run. The default config gets the same ``--steps``. Both winners are then tested on
the same 1,000 fixed test episodes. The budget is stated in meta-steps (not minutes), so the
result does not depend on how busy the machine is; the minutes it took are reported too.

Data: --data-dir, else METAFIT_DATA_DIR, else ../shared/data/omniglot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from metafit.tools import tune
from metafit.training import evaluate_checkpoint, load_config, train
from metafit.training import write_json

HERE = Path(__file__).resolve().parent
CONFIG, SPACE = "omniglot_protonet_5w1s", "omniglot_protonet_5w1s"


def budget_overrides(steps: int, data_dir: str) -> list[str]:
    return [f"train.meta_steps={steps}", f"train.lr_step_size={max(1, steps // 5)}",
            f"train.eval_every={max(1, steps // 6)}", f"train.save_interval={steps}",
            "train.progress=false", f"data.root={json.dumps(data_dir)}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--steps", type=int, default=1500, help="meta-steps of every training run")
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR", str(HERE.parent.parent / "shared/data/omniglot")))
    ap.add_argument("--out", default="runs/tune-bench")
    ap.add_argument("--json", default=str(HERE / "results" / "tune_omniglot.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    overrides = budget_overrides(args.steps, args.data_dir)

    t0 = time.perf_counter()
    study = tune(CONFIG, SPACE, args.trials, out_dir=out / "study", overrides=overrides, seed=args.seed)
    study_minutes = (time.perf_counter() - t0) / 60

    t1 = time.perf_counter()
    default_cfg = load_config(CONFIG, overrides + [f"out_dir={out / 'default'}", "eval.calibrate=false"])
    default = train(default_cfg, test=False, overwrite=True)  # a rerun retrains
    default_minutes = (time.perf_counter() - t1) / 60

    best = study["best"]
    best_ckpt = Path(best["trial_dir"]) / "best.safetensors"
    tests = {name: evaluate_checkpoint(ckpt, data_root=args.data_dir, episodes=1000)
             for name, ckpt in (("default", Path(default["best_checkpoint"])), ("tuned", best_ckpt))}
    history = out / "study" / "history.png"
    if history.is_file():
        shutil.copyfile(history, HERE / "results" / "tune_omniglot_history.png")

    rows = [("hand-written default", default["val"], tests["default"], default_minutes, {}),
            (f"tuned (trial {best['number']})", {"mean": best["metric_value"], "ci95": best["ci95"]},
             tests["tuned"], None, best["params"])]
    print(f"\nOmniglot 5-way 1-shot, ProtoNet, {args.steps} meta-steps per run; study: {args.trials} trials "
          f"({study['n_trials']}) in {study_minutes:.1f} min")
    print("| config | val acc (200 episodes) | test acc (1000 episodes) | params |")
    print("|---|---|---|---|")
    for name, val, test, _, params in rows:
        ci = f" +/- {100 * val['ci95']:.2f}" if val.get("ci95") is not None else ""
        print(f"| {name} | {100 * val['mean']:.2f}{ci} | {100 * test['mean']:.2f} +/- {100 * test['ci95']:.2f} | "
              f"{params or 'config as shipped'} |")
    write_json(args.json, {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "steps_per_run": args.steps,
        "trials": args.trials, "study_minutes": study_minutes, "default_minutes": default_minutes,
        "study": {k: v for k, v in study.items() if k != "trials"},
        "trial_table": study.get("trials"),
        "default": {"val": default["val"], "test": tests["default"]},
        "tuned": {"trial": best["number"], "params": best["params"], "val": best["metric_value"],
                  "val_ci95": best["ci95"], "test": tests["tuned"]},
        "overrides": overrides,
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
