"""Omniglot benchmark: train a built-in config of any algorithm (1200-character split with rotations,
<= 60 minutes wall-clock via train.max_minutes), then evaluate the best checkpoint on fixed test
episodes for several N-way K-shot settings. Prints a table and writes JSON.

    python benchmarks/omniglot.py --config omniglot_protonet_20w1s --eval 5,1 --eval 20,1

--members N trains the config N times (seeds seed, seed+1, ...; each in <out_dir>/member-<i>, each
with the config's budget), combines them (metafit ensemble) and evaluates the ensemble.

Data: --data-dir, else METAFIT_DATA_DIR, else ../shared/data/omniglot.
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

from metafit.training import ensemble_checkpoints, evaluate_checkpoint, load_config, train
from metafit.training import write_json

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="omniglot_protonet_20w1s")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--eval", action="append", default=[], metavar="WAYS,SHOTS",
                    help="extra test settings (default: the config's eval section)")
    ap.add_argument("--within-group", action="store_true", help="within-alphabet test episodes")
    ap.add_argument("--queries", type=int, default=None, help="queries per class (default: the config's)")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR", str(HERE.parent.parent / "shared/data/omniglot")))
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<config>.json)")
    ap.add_argument("--skip-train", action="store_true",
                    help="evaluate the existing run in out_dir only (its --set algorithm.KEY=VALUE change adaptation)")
    ap.add_argument("--name", default=None, help="result name (default: the config name)")
    ap.add_argument("--members", type=int, default=1, help="train this many seeds and evaluate their ensemble")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"data.root={args.data_dir}", "train.progress=false", *args.set])
    t0 = time.time()
    run, overrides = Path(cfg.out_dir), None
    if args.skip_train:  # the run's own summary, written when it trained; algorithm fields as set here
        report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else None
        keys = {kv.split("=", 1)[0].removeprefix("algorithm.") for kv in args.set if kv.startswith("algorithm.")}
        overrides = {k: v for k, v in cfg.algorithm.model_dump(mode="json").items() if k in keys}
    if args.members > 1:  # each member as its own run; the ensemble of their best checkpoints is evaluated
        members = [run / f"member-{i}" for i in range(args.members)]
        if not args.skip_train:
            for i, folder in enumerate(members):
                train(cfg.model_copy(update={"seed": cfg.seed + i, "out_dir": str(folder)}), test=False, overwrite=True)
        reports = [json.loads((m / "report.json").read_text()) for m in members]
        report = {"members": reports, "steps": sum(r["steps"] for r in reports),
                  "train_seconds": sum(r["train_seconds"] for r in reports)}
        ckpt = ensemble_checkpoints([m / "best.safetensors" for m in members], run / "ensemble.safetensors")
        report["val"] = evaluate_checkpoint(ckpt, split="val", data_root=args.data_dir, algorithm_overrides=overrides)
    else:
        if not args.skip_train:
            report = train(cfg, test=False, overwrite=True)  # a rerun retrains
        ckpt = run / "best.safetensors"
    settings = [tuple(int(v) for v in e.split(",")) for e in args.eval] or [(cfg.eval.n_ways, cfg.eval.k_shots)]
    rows = []
    for ways, shots in settings:
        r = evaluate_checkpoint(ckpt, n_ways=ways, k_shots=shots, n_queries=args.queries or cfg.eval.n_queries,
                                episodes=args.episodes, split="test", within_group=args.within_group or None,
                                data_root=args.data_dir, algorithm_overrides=overrides)
        rows.append(r)
    result = {
        "benchmark": "omniglot",
        "config": args.config,
        "overrides": args.set,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "train": report,
        "wall_seconds_total": time.time() - t0,
        "test": rows,
    }
    out = Path(args.out) if args.out else HERE / "results" / f"{args.name or args.config}.json"
    write_json(out, result)
    train_min = (report["train_seconds"] / 60) if report else float("nan")
    steps = report["steps"] if report else "-"
    print(f"\n{cfg.algorithm.name} Omniglot ({cfg.data.protocol}), config {args.config} {' '.join(args.set)}: {steps} steps, "
          f"{train_min:.1f} min training" + (f", an ensemble of {args.members}" if args.members > 1 else ""))
    if report and "val" in report and args.members > 1:
        v = report["val"]
        print(f"ensemble validation: {100 * v['mean']:.2f}% +/- {100 * v['ci95']:.2f}% ({v['episodes']} episodes)")
    print("| test setting | within group | rotations | episodes | accuracy | 95% CI | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_ways']}-way {r['k_shots']}-shot {r['n_queries']}-query | {r['within_group']} | {r['rotations']} | "
              f"{r['episodes']} | {100 * r['mean']:.2f}% | +/- {100 * r['ci95']:.2f}% | {100 * (1 - r['mean']):.2f}% |")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
