"""Evaluation throughput: the 1,000-episode report one episode at a time (the previous path) against
evaluate_episodes, which embeds every distinct image once and scores many episodes at a time
(metafit.training.embedded_eval), measured side by side on the same episodes, with the
per-episode accuracies of both compared.

    python benchmarks/eval_speed.py [--episodes 1000] [--configs omniglot_protonet_20w1s,...]

A config may carry overrides after "@" (e.g. omniglot_transfer@algorithm.head=centroid).
Each config's model is built untrained from its seed (speed does not depend on the weights; the
BatchNorm running statistics are moved off their defaults by a few training-mode passes) and
evaluated on its eval setting (the test split, rotations as configured). Data: --data-dir, else
METAFIT_DATA_DIR, else ../shared/data/omniglot. Writes benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from metafit.data import load_splits
from metafit.training import build_model, evaluate_episodes, evaluate_tasks, load_config, make_sampler, write_json

HERE = Path(__file__).resolve().parent
CONFIGS = ("omniglot_protonet_20w1s,omniglot_svm_20w1s,omniglot_ridge_20w1s,omniglot_transfer@eval.n_ways=20,"
           "omniglot_transfer@algorithm.head=centroid@eval.n_ways=20,omniglot_transfer")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=CONFIGS, help="comma-separated built-in configs")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR",
                                                         str(HERE.parent.parent / "shared/data/omniglot")))
    ap.add_argument("--out", default=str(HERE / "results" / "eval_speed.json"))
    args = ap.parse_args()
    rows, splits = [], {}
    for spec in args.configs.split(","):
        name, *overrides = spec.split("@")
        overrides.append(f"data.root={args.data_dir}")
        cfg = load_config(name, overrides)
        key = cfg.data.model_dump_json()
        if key not in splits:
            splits[key] = load_splits(cfg.data)
        if cfg.algorithm.name == "transfer":  # the pretraining classifier's size (the trainer fills it in)
            cfg = load_config(name, [*overrides, f"algorithm.n_base_classes={splits[key]['train'].n_classes}"])
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        sampler = make_sampler(splits[key]["test"], cfg, "test", 0)
        with torch.no_grad():  # BatchNorm running statistics off their defaults
            model.train()
            model.backbone(sampler.materialize(sampler.fixed_episodes(4, 99)).support_x.flatten(0, 1))
        episodes = sampler.fixed_episodes(args.episodes, cfg.eval.seed)
        slow, slow_s = _timed(lambda: evaluate_tasks(model, sampler.tasks(episodes)))
        fast, fast_s = _timed(lambda: evaluate_episodes(model, sampler, episodes))
        same = fast.per_episode == slow.per_episode
        rows.append({"config": spec, "algorithm": cfg.algorithm.name, "n_ways": cfg.eval.n_ways,
                     "k_shots": cfg.eval.k_shots, "n_queries": cfg.eval.n_queries, "episodes": args.episodes,
                     "one_at_a_time_s": round(slow_s, 3), "batched_s": round(fast_s, 3),
                     "speedup": round(slow_s / fast_s, 2), "accuracy_one_at_a_time": slow.mean,
                     "accuracy_batched": fast.mean, "max_abs_difference": abs(fast.mean - slow.mean),
                     "per_episode_identical": same})
        r = rows[-1]
        print(f"{spec:44s} {r['n_ways']}-way {r['k_shots']}-shot: one at a time {slow_s:7.1f} s, batched "
              f"{fast_s:6.1f} s = {r['speedup']:5.1f}x; accuracy {100 * slow.mean:.3f}% vs {100 * fast.mean:.3f}% "
              f"(per episode identical: {same})", flush=True)
    out = {"benchmark": "eval_speed", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "command": "python benchmarks/eval_speed.py --episodes "
           f"{args.episodes} --configs {args.configs}", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_json(args.out, out)}")


if __name__ == "__main__":
    main()
