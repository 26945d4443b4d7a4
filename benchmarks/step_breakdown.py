"""Where a ProtoNet training step spends its time on Omniglot: episode sampling (data),
forward, backward, optimizer; and the sampler's own throughput (episodes/s).

    python benchmarks/step_breakdown.py [--steps 100]

Data: --data-dir, else METAFIT_DATA_DIR, else ../shared/data/omniglot. Prints a table and writes
benchmarks/results/step_breakdown.json. All settings are measured in one run, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from metafit.data import omniglot_splits
from metafit.training import Trainer, load_config, make_sampler

HERE = Path(__file__).resolve().parent
SETTINGS = [(20, 1, 5, "fp32"), (60, 1, 5, "fp32"), (60, 1, 5, "bf16"), (60, 5, 5, "fp32")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR", str(HERE.parent.parent / "shared/data/omniglot")))
    args = ap.parse_args()
    splits = omniglot_splits("vinyals", args.data_dir)
    rows = []
    for ways, shots, queries, precision in SETTINGS:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config("omniglot_protonet_20w1s", [
                f"data.root={args.data_dir}", f"out_dir={out}", f"task.n_ways={ways}", f"task.k_shots={shots}",
                f"task.n_queries={queries}", f"train.meta_steps={args.steps + 10}", "train.progress=false",
                f"train.precision={precision}",
                "train.eval_every=1000000", "train.save_interval=1000000", "eval.val_episodes=1"])
            # sampler alone
            sampler = make_sampler(splits["train"], cfg, "train", 0)
            for _ in range(20):
                sampler.sample(1)
            t0 = time.perf_counter()
            n = 200
            for _ in range(n):
                sampler.sample(1)
            eps = n / (time.perf_counter() - t0)
            # training steps: 10 warm-up steps, then the measured ones
            trainer = Trainer(cfg, splits=splits)
            warm = cfg.model_copy(update={"train": cfg.train.model_copy(update={"meta_steps": 10})})
            trainer.config = warm
            trainer.fit()
            before = dict(trainer.timing)
            trainer.config = cfg
            t0 = time.perf_counter()
            trainer.fit()  # continues the same trainer for `steps` more steps
            wall = time.perf_counter() - t0
            parts = {k: (trainer.timing[k] - before[k]) / args.steps for k in before}
            step = sum(parts.values())
            rows.append({"n_ways": ways, "k_shots": shots, "n_queries": queries, "precision": precision,
                         "images_per_step": ways * (shots + queries), "episodes_per_s": eps,
                         "step_ms": 1000 * step, **{k.replace("_s", "_ms"): 1000 * v for k, v in parts.items()},
                         "data_fraction": parts["data_s"] / step, "wall_s": wall})
    result = {"benchmark": "step_breakdown", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads", "steps": args.steps, "rows": rows}
    out = HERE / "results" / "step_breakdown.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("| episode (train) | precision | images | sampler episodes/s | step ms | data ms | forward ms | backward ms | optimizer ms | data share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_ways']}-way {r['k_shots']}-shot {r['n_queries']}-query | {r['precision']} | {r['images_per_step']} | "
              f"{r['episodes_per_s']:.0f} | {r['step_ms']:.1f} | {r['data_ms']:.2f} | {r['forward_ms']:.1f} | "
              f"{r['backward_ms']:.1f} | {r['optimizer_ms']:.2f} | {100 * r['data_fraction']:.2f}% |")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
