"""Time to accuracy: Omniglot recipes trained back to back on one machine; every checkpoint a run
keeps (one per save_interval, and its best-validation one) is scored on the same fixed test
episodes and set against the wall-clock minutes of training behind it.

    python benchmarks/time_to_accuracy.py [--recipes omniglot_protonet_20w1s,omniglot_protonet_20w1s_fast]

The ratio that matters is the recipes' training times, measured in the same run. Test accuracy of
the intermediate checkpoints is a curve to look at, never a choice: each recipe's result is its
best-validation checkpoint. Data: --data-dir, else METAFIT_DATA_DIR, else ../shared/data/omniglot.
Writes benchmarks/results/time_to_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from metafit.data import load_splits
from metafit.training import evaluate_checkpoint, load_config, train, write_json

HERE = Path(__file__).resolve().parent
SETTINGS = ((20, 1), (5, 1))


def _elapsed_by_step(out_dir: Path) -> dict[int, float]:
    """Seconds since the start of training at every logged training step (the run's metrics log)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["elapsed_s"] for r in rows if r.get("split") == "train" and "elapsed_s" in r}


def _score(ckpt: Path, splits: dict, args) -> dict:
    out = {}
    for ways, shots in SETTINGS:
        r = evaluate_checkpoint(ckpt, n_ways=ways, k_shots=shots, n_queries=15, episodes=args.episodes,
                                split="test", splits=splits)
        out[f"{ways}w{shots}s"] = {"mean": r["mean"], "ci95": r["ci95"]}
    return out


def run_recipe(name: str, args) -> dict:
    out_dir = Path(args.runs) / name
    cfg = load_config(name, [f"data.root={args.data_dir}", "train.progress=false", f"out_dir={out_dir}", *args.set])
    t0 = time.time()
    report = train(cfg, test=False, overwrite=True)
    wall = time.time() - t0
    elapsed = _elapsed_by_step(out_dir)
    splits = load_splits(cfg.data)  # read once, scored many times
    curve = []
    for ckpt in sorted(out_dir.glob("step-*.safetensors")):
        step = int(ckpt.stem.split("-")[1])
        seconds = elapsed.get(step, max((s for k, s in elapsed.items() if k <= step), default=0.0))
        curve.append({"step": step, "minutes": round(seconds / 60, 2), **_score(ckpt, splits, args)})
        print(f"{name}: step {step:6d} at {seconds / 60:5.1f} min: "
              + ", ".join(f"{k} {100 * v['mean']:.2f}%" for k, v in curve[-1].items() if isinstance(v, dict)), flush=True)
    best = _score(out_dir / "best.safetensors", splits, args)
    return {"recipe": name, "train_seconds": report["train_seconds"], "train_minutes": round(report["train_seconds"] / 60, 2),
            "wall_seconds": wall, "steps": report["steps"], "best_step": report["best_step"],
            "val": report["val"], "test": best, "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="omniglot_protonet_20w1s,omniglot_protonet_20w1s_fast",
                    help="comma-separated built-in configs, the reference first")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--runs", default="runs/time_to_accuracy", help="folder for the runs' checkpoints")
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR", str(HERE.parent.parent / "shared/data/omniglot")))
    ap.add_argument("--out", default=str(HERE / "results" / "time_to_accuracy.json"))
    args = ap.parse_args()
    results = [run_recipe(name, args) for name in args.recipes.split(",")]
    ref = results[0]["train_seconds"]
    print("| recipe | steps | training minutes | time vs first | test 20-way 1-shot | test 5-way 1-shot |")
    print("|---|---|---|---|---|---|")
    for r in results:
        r["time_ratio"] = round(r["train_seconds"] / ref, 3)
        t20, t5 = r["test"]["20w1s"], r["test"]["5w1s"]
        print(f"| {r['recipe']} | {r['steps']} | {r['train_minutes']:.1f} | {r['time_ratio']:.2f} | "
              f"{100 * t20['mean']:.2f}% +/- {100 * t20['ci95']:.2f}% | {100 * t5['mean']:.2f}% +/- {100 * t5['ci95']:.2f}% |")
    out = {"benchmark": "time_to_accuracy", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads",
           "command": f"python benchmarks/time_to_accuracy.py --recipes {args.recipes} --episodes {args.episodes}"
                      + "".join(f" --set {kv}" for kv in args.set),
           "results": results}
    print(f"wrote {write_json(args.out, out)}")


if __name__ == "__main__":
    main()
