"""Few-shot sinusoid regression (Finn et al. 2017; Li et al. 2017): MAML's mean squared error
after 1 / 5 / 10 inner steps, and Meta-SGD against MAML at 5, 10 and 20 shots.

    python benchmarks/sinusoid.py [--steps 70000] [--shots 5,10,20]

Each model is meta-trained with the built-in ``sinusoid_maml`` config (1-40-40-1 ReLU MLP, one
inner step of 0.01, meta-batch 25, Adam 0.001, K support points and 10 query points per training
task), its best checkpoint picked on 200 validation tasks, and tested on 600 fixed unseen tasks:
K support points, MSE on 100 query points, mean and 95% CI over tasks. Meta-SGD uses the same
settings with learned per-parameter step sizes (initialised to 0.01). Writes
benchmarks/results/sinusoid.json; also runs as ``--steps 2000`` for a smoke check.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from metafit.training import evaluate_checkpoint, load_config, train
from metafit.training import write_json

HERE = Path(__file__).resolve().parent
# MAML, 5 shots, after 1 / 5 / 10 steps: read off Finn et al. (2017) Fig. 2 / appendix k=5 panel
PAPER_MAML_STEPS = {1: 0.67, 5: 0.38, 10: 0.35}
# Li et al. (2017), Table 1 (one inner step): shots -> (MAML, Meta-SGD)
PAPER_METASGD = {5: (1.13, 0.90), 10: (0.85, 0.53), 20: (0.71, 0.31)}


def run(algorithm: str, shots: int, steps: int, out: Path) -> dict:
    cfg = load_config("sinusoid_maml", [
        f"out_dir={out / f'{algorithm}-{shots}shot'}", f"algorithm.name={algorithm}", f"task.k_shots={shots}",
        f"eval.k_shots={shots}", f"train.meta_steps={steps}", f"train.eval_every={max(1, steps // 14)}",
        f"train.save_interval={steps}", "train.progress=false", f"train.log_every={max(1, steps // 20)}",
        "algorithm.eval_inner_steps=1",
    ])
    t0 = time.perf_counter()
    report = train(cfg, test=False, overwrite=True)  # a rerun retrains
    minutes = (time.perf_counter() - t0) / 60
    ckpt = report["best_checkpoint"]
    # Meta-SGD learns step sizes for exactly one step (repeating it diverges): test it at one step
    evals = {s: evaluate_checkpoint(ckpt, inner_steps=s) for s in ((1, 5, 10) if algorithm == "maml" else (1,))}
    return {"algorithm": algorithm, "shots": shots, "meta_steps": steps, "train_minutes": minutes,
            "best_step": report["best_step"],
            "mse": {s: {"mean": r["mean"], "ci95": r["ci95"]} for s, r in evals.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=70000)
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--out", default=str(HERE / "results" / "sinusoid.json"))
    args = ap.parse_args()
    shots = [int(s) for s in args.shots.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in shots:
            for alg in ("maml", "metasgd"):
                row = run(alg, k, args.steps, Path(tmp))
                rows.append(row)
                text = "  ".join(f"{s} step{'s' * (s > 1)} {m['mean']:.3f}+/-{m['ci95']:.3f}"
                                 for s, m in row["mse"].items())
                print(f"{alg:8s} {k:2d}-shot: MSE {text} ({row['train_minutes']:.1f} min)", flush=True)
    by = {(r["algorithm"], r["shots"]): r for r in rows}
    if 5 in shots:
        print("\nMAML 5-shot, MSE on 600 unseen tasks (95% CI) vs the MAML paper (read off Fig. 2):")
        for s, paper in PAPER_MAML_STEPS.items():
            m = by[("maml", 5)]["mse"][s]
            print(f"  {s:2d} steps: {m['mean']:.3f} +/- {m['ci95']:.3f}   paper {paper:.2f}   "
                  f"{'<=' if m['mean'] <= paper else '>'} paper")
    print("\nMeta-SGD vs MAML after one inner step (their training setting), MSE (95% CI):")
    print(f"  {'shots':>5s}  {'MAML':>15s}  {'Meta-SGD':>15s}  {'paper MAML':>10s}  {'paper Meta-SGD':>14s}")
    for k in shots:
        a, b = by[("maml", k)]["mse"][1], by[("metasgd", k)]["mse"][1]
        pm, ps = PAPER_METASGD.get(k, (float("nan"), float("nan")))
        print(f"  {k:5d}  {a['mean']:7.3f}+/-{a['ci95']:.3f}  {b['mean']:7.3f}+/-{b['ci95']:.3f}  {pm:10.2f}  {ps:14.2f}")
    write_json(Path(args.out), {
        "benchmark": "sinusoid", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "command": f"python benchmarks/sinusoid.py --steps {args.steps} --shots {args.shots}",
        "paper_maml_5shot_steps": PAPER_MAML_STEPS, "paper_metasgd_table1": PAPER_METASGD, "rows": rows,
    })
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
