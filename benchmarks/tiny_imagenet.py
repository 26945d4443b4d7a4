"""Tiny ImageNet few-shot benchmark: train a built-in config (within its train.max_minutes),
then score the best checkpoint on 1,000 fixed 5-way 1-shot and 5-way 5-shot test episodes of
the published split's 40 test classes. Optional: more adaptation variants of the same model
(``--variant head=centroid,normalize=center_l2``; ``--head X`` is ``--variant head=X``), each
also scored on validation episodes so the one to report is chosen there, and fine-tuning at
adaptation (``--finetune-lrs``: each rate scored on validation episodes, the best one tested).
Merges one entry into a JSON file and prints a table.

    python benchmarks/tiny_imagenet.py --config tiny_imagenet_transfer --name transfer_conv4 \\
        [--head cosine --variant head=centroid,normalize=center_l2] [--finetune-lrs 0.001,0.01] [--skip-train]

Data: --data-dir, else METAFIT_TINY_IMAGENET, else ../shared/data/tiny-imagenet.
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
import yaml

from metafit.training import evaluate_checkpoint, load_config, train
from metafit.training import write_json

HERE = Path(__file__).resolve().parent
SHOTS = (1, 5)


def score(ckpt: Path, shots: int, split: str, episodes: int, data_dir: str, overrides: dict) -> dict:
    r = evaluate_checkpoint(ckpt, n_ways=5, k_shots=shots, n_queries=15, episodes=episodes, split=split,
                            data_root=data_dir, algorithm_overrides=overrides or None)
    return {k: r[k] for k in ("split", "n_ways", "k_shots", "n_queries", "episodes", "seed", "mean", "ci95",
                              "seconds")} | {"overrides": overrides}


def val_curve(run: Path, points: int = 40) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [{"step": r["step"], "minutes": round(r["elapsed_s"] / 60, 2), "accuracy": round(r["accuracy"], 4)}
           for r in rows if r.get("split") == "val"]
    stride = max(1, len(val) // points)
    return val[::stride] + ([val[-1]] if val and (len(val) - 1) % stride else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny_imagenet_transfer")
    ap.add_argument("--name", default=None, help="entry name in the JSON (default: the config name)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--head", action="append", default=[], help="transfer: more heads to score (algorithm.head)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="more adaptation settings to score (algorithm fields)")
    ap.add_argument("--finetune-lrs", default="", help="comma-separated fine-tuning rates to choose from on val")
    ap.add_argument("--finetune-steps", type=int, default=20)
    ap.add_argument("--val-episodes", type=int, default=200, help="validation episodes choosing the rate")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--skip-train", action="store_true", help="score the existing run in out_dir")
    ap.add_argument("--test-all", action="store_true", help="score every variant on the test episodes")
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_TINY_IMAGENET",
                                                         str(HERE.parent.parent / "shared/data/tiny-imagenet")))
    ap.add_argument("--out", default=str(HERE / "results" / "tiny_imagenet.json"))
    args = ap.parse_args()

    cfg = load_config(args.config, [f"data.root={args.data_dir}", "train.progress=false", *args.set])
    name = args.name or args.config
    t0 = time.time()
    run = Path(cfg.out_dir)
    if args.skip_train:  # the run's own summary, written when it trained
        report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else None
    else:
        report = train(cfg, test=False, overwrite=True)  # a rerun retrains (--skip-train keeps the run)
    ckpt = run / "best.safetensors"
    specs = [f"head={h}" for h in args.head] + args.variant
    variants: list[tuple[str, dict]] = [("default", {})] + [
        (spec, {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in spec.split(","))}) for spec in specs]
    val_scores = {}
    if len(variants) > 1:  # the variant to report is chosen on validation episodes, not on the test
        for label, overrides in variants:
            r = score(ckpt, 1, "val", args.val_episodes, args.data_dir, overrides)
            val_scores[label] = {"mean": r["mean"], "ci95": r["ci95"], "episodes": r["episodes"]}
            print(f"  val 5-way 1-shot, {label}: {100 * r['mean']:.2f}% +/- {100 * r['ci95']:.2f}%")
    chosen = None
    if args.finetune_lrs:
        ft_key = "finetune_steps"
        val = []
        for lr in [float(v) for v in args.finetune_lrs.split(",")]:
            o = {ft_key: args.finetune_steps, "finetune_lr": lr} if lr > 0 else {}
            if cfg.algorithm.name == "transfer" and lr > 0:
                o["head"] = "finetune"
            r = score(ckpt, 1, "val", args.val_episodes, args.data_dir, o)
            val.append({"finetune_lr": lr, **r})
            print(f"  val 5-way 1-shot, fine-tune lr {lr}: {100 * r['mean']:.2f}% +/- {100 * r['ci95']:.2f}%")
        chosen = max(val, key=lambda r: r["mean"])
        if chosen["finetune_lr"] > 0:
            variants.append((f"finetune lr={chosen['finetune_lr']} steps={args.finetune_steps}", chosen["overrides"]))
    # the test scores the default and the variant validation chose (every variant with --test-all)
    best_val = max(val_scores, key=lambda k: val_scores[k]["mean"]) if val_scores else "default"
    tested = [v for v in variants if args.test_all or v[0] in ("default", best_val) or v[0].startswith("finetune")]
    rows = []
    for label, overrides in tested:
        for shots in SHOTS:
            r = score(ckpt, shots, "test", args.episodes, args.data_dir, overrides)
            rows.append({"variant": label, **r})
            print(f"  {label:40s} 5-way {shots}-shot: {100 * r['mean']:.2f}% +/- {100 * r['ci95']:.2f}%")
    entry = {
        "config": args.config, "overrides": args.set,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "algorithm": cfg.algorithm.name, "backbone": cfg.backbone.name,
        "train_minutes": round(report["train_seconds"] / 60, 2) if report else None,
        "train_steps": report["steps"] if report else None,
        "best_step": report["best_step"] if report else None,
        "val_curve": val_curve(run) if (run / "metrics.jsonl").is_file() else [],
        "variant_selection": val_scores or None,
        "chosen_by_val": best_val,
        "finetune_selection": [{k: r[k] for k in ("finetune_lr", "mean", "ci95", "episodes")} for r in val]
        if args.finetune_lrs else None,
        "test": rows, "wall_seconds_total": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"benchmark": "tiny_imagenet", "entries": {}}
    results["entries"][name] = entry
    write_json(out, results)
    print(f"\n{name}: {cfg.algorithm.name}/{cfg.backbone.name}, "
          f"{entry['train_minutes']} min training, best step {entry['best_step']}")
    print("| variant | 5-way 1-shot | 5-way 5-shot |")
    print("|---|---|---|")
    for label, _ in tested:
        cells = [next(r for r in rows if r["variant"] == label and r["k_shots"] == s) for s in SHOTS]
        print(f"| {label} | " + " | ".join(f"{100 * c['mean']:.2f} +/- {100 * c['ci95']:.2f}" for c in cells) + " |")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
