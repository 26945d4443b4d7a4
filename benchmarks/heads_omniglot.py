"""Omniglot: SVM head (MetaOptNet), ridge head (R2D2), transfer baselines and ProtoNet on the same
fixed test episodes, same Conv4 backbone, same wall-clock training budget; plus per-episode
adaptation latency (20-way 5-shot) of every head. Prints Markdown tables and writes JSON.

    python benchmarks/heads_omniglot.py --protocol vinyals --minutes 10
    python benchmarks/heads_omniglot.py --protocol lake --minutes 10

Every method trains once (validation on 20-way 1-shot picks its best checkpoint) and is tested on
the settings of its protocol: vinyals (1200-character split, rotations): 5-way and 20-way 1-shot,
15 queries per class; lake (background -> evaluation alphabets): within-alphabet 20-way 1-shot,
one query per class, no rotations. Test episodes come from one seed, so every method sees the
same episodes. One transfer pretraining serves all its heads (linear, cosine, centroid, finetune);
Baseline++ pretrains with a cosine classifier.

Data: --data-dir, else METAFIT_DATA_DIR, else ../shared/data/omniglot.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from metafit.data import load_splits
from metafit.training import evaluate_checkpoint, load, load_config, make_sampler, train, with_algorithm_overrides
from metafit.training import write_json

HERE = Path(__file__).resolve().parent
TEST_SEED = 2025  # eval.seed + 1 of every config here: the trainer's test episodes

# name -> (config, extra overrides, evaluation heads (None: the algorithm as configured))
METHODS = {
    "protonet": ("omniglot_protonet_20w1s", [], [None]),
    "svm": ("omniglot_svm_20w1s", [], [None]),
    "ridge": ("omniglot_ridge_20w1s", [], [None]),
    "transfer": ("omniglot_transfer", [], ["linear", "cosine", "centroid", "finetune"]),
    "transfer++": ("omniglot_transfer", ["algorithm.classifier=cosine", "algorithm.head=cosine"], ["cosine"]),
}
PROTOCOLS = {
    "vinyals": dict(overrides=[], tests=[(5, 1, 15, False), (20, 1, 15, False)]),
    "lake": dict(overrides=["data.protocol=lake", "eval.within_group=true", "eval.rotations=false",
                            "eval.n_queries=1", "eval.val_episodes=300"],
                 tests=[(20, 1, 1, True)]),
}


def _latency(ckpt: Path, heads, data_root: str, episodes: int) -> list[dict]:
    """Median/p90 milliseconds of adapt and of predict on 20-way 5-shot 15-query test episodes."""
    base = load(ckpt)
    cfg = base.run_config.model_copy(update={"data": base.run_config.data.model_copy(update={"root": data_root})})
    ev = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=dict(n_ways=20, k_shots=5, n_queries=15,
                                                                         within_group=False, rotations=False))})
    sampler = make_sampler(load_splits(cfg.data)["test"], ev, "test", 0)
    tasks = [sampler.materialize([e])[0] for e in sampler.fixed_episodes(episodes + 2, TEST_SEED)]
    rows = []
    for head in heads:
        model = with_algorithm_overrides(base, {"head": head} if head else None).eval()
        model.to(memory_format=torch.channels_last)
        adapt_ms, predict_ms = [], []
        with torch.no_grad():
            for i, t in enumerate(tasks):
                sx = t.support_x.contiguous(memory_format=torch.channels_last)
                qx = t.query_x.contiguous(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                adapted = model.adapt(sx, t.support_y, t.n_ways)
                t1 = time.perf_counter()
                model.predict(adapted, qx)
                t2 = time.perf_counter()
                if i >= 2:  # warm-up
                    adapt_ms.append(1e3 * (t1 - t0))
                    predict_ms.append(1e3 * (t2 - t1))
        q = lambda v, p: sorted(v)[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
        rows.append({"head": head, "episodes": episodes, "adapt_ms_median": statistics.median(adapt_ms),
                     "adapt_ms_p90": q(adapt_ms, 0.9), "predict_ms_median": statistics.median(predict_ms)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="vinyals")
    ap.add_argument("--minutes", type=float, default=60.0, help="training budget of every method")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--episodes", type=int, default=1000, help="fixed test episodes per setting")
    ap.add_argument("--latency-episodes", type=int, default=30, help="20-way 5-shot episodes timed (0: skip)")
    ap.add_argument("--reuse", action="store_true", help="skip training where the run folder has a report")
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR", str(HERE.parent.parent / "shared/data/omniglot")))
    ap.add_argument("--runs-dir", default="runs/heads")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/heads_<protocol>.json)")
    args = ap.parse_args()
    proto = PROTOCOLS[args.protocol]
    results = []
    for name in args.methods.split(","):
        config, extra, heads = METHODS[name]
        out_dir = Path(args.runs_dir) / args.protocol / name.replace("+", "p")
        cfg = load_config(config, [f"data.root={args.data_dir}", "train.progress=false", f"out_dir={out_dir}",
                                   f"train.max_minutes={args.minutes}", "eval.n_ways=20", "eval.k_shots=1",
                                   *proto["overrides"], *extra])
        report_path = out_dir / "report.json"
        if args.reuse and report_path.is_file():
            import json
            report = json.loads(report_path.read_text())
        else:
            report = train(cfg, test=False, overwrite=True)  # a rerun retrains (--reuse keeps the run)
        ckpt = Path(report["best_checkpoint"])
        for head in heads:
            tests = []
            for ways, shots, queries, within in proto["tests"]:
                r = evaluate_checkpoint(ckpt, n_ways=ways, k_shots=shots, n_queries=queries, episodes=args.episodes,
                                        split="test", within_group=within, seed=TEST_SEED, data_root=args.data_dir,
                                        algorithm_overrides={"head": head} if head else None)
                tests.append(r)
                print(f"{name} {head or ''} {ways}w{shots}s: {100 * r['mean']:.2f} +/- {100 * r['ci95']:.2f}", flush=True)
            results.append({"method": name, "head": head, "config": config, "overrides": extra,
                            "steps": report["steps"], "train_minutes": report["train_seconds"] / 60,
                            "best_step": report["best_step"], "tests": tests})
        if args.latency_episodes and args.protocol == "vinyals":
            for row in _latency(ckpt, heads, args.data_dir, args.latency_episodes):
                next(r for r in results if r["method"] == name and r["head"] == row["head"])["latency_20w5s"] = row
    out = Path(args.out) if args.out else HERE / "results" / f"heads_{args.protocol}.json"
    write_json(out, {
        "benchmark": "heads_omniglot", "protocol": args.protocol, "minutes": args.minutes,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "results": results,
    })
    settings = proto["tests"]
    head_cols = " | ".join(f"{w}-way {s}-shot{' within-alphabet' if g else ''}" for w, s, _, g in settings)
    print(f"\nOmniglot ({args.protocol}), {args.minutes:g}-minute budget, {args.episodes} fixed test episodes, "
          "mean +/- 95% CI")
    print(f"| method | head | steps | train min | {head_cols} | adapt ms 20w5s (median) |")
    print("|---|---|---|---|" + "---|" * len(settings) + "---|")
    for r in results:
        accs = " | ".join(f"{100 * t['mean']:.2f} +/- {100 * t['ci95']:.2f}" for t in r["tests"])
        lat = r.get("latency_20w5s")
        print(f"| {r['method']} | {r['head'] or '-'} | {r['steps']} | {r['train_minutes']:.1f} | {accs} | "
              f"{lat['adapt_ms_median']:.1f} |" if lat else f"| {r['method']} | {r['head'] or '-'} | {r['steps']} | "
              f"{r['train_minutes']:.1f} | {accs} | - |")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
