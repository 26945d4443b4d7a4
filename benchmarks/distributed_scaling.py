"""Distributed meta-training on CPU: step time with 1 process against 2 processes (torchrun, gloo)
on the same global meta-batch, and how far apart the parameters end up.

    python benchmarks/distributed_scaling.py --steps 30

Each case trains ``metafit train`` on Omniglot from the same seed for ``--steps`` meta-steps:
once as one process (all cores: torch's threads, or metafit's thread executor for per-task
learners) and once under ``torchrun --nproc_per_node 2`` (one thread per process, each rank its
half of the meta-batch). Step time is the trainer's own per-step time (sampling, forward,
backward, all-reduce, optimizer; validation excluded), median over logging windows after the
first. The optimizer is SGD so that the parameter difference measures the arithmetic (Adam's
first steps amplify rounding noise of exactly-zero gradients, see tests/test_distributed.py).

Data: --data-dir, else METAFIT_DATA_DIR, else ../shared/data/omniglot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from metafit.training import read_checkpoint
from metafit.training import write_json

HERE = Path(__file__).resolve().parent
CASES = {
    # name: (config, overrides)
    # contiguous layout: the channels_last BatchNorm kernel sums in float32 (meta-gradient 5e-3 from
    # float64, docs section 5), which any change of summation order -- one process's thread split
    # included -- turns into 1e-4..1e-3 parameter differences after a few steps
    "MAML 5-way 1-shot, meta-batch 32, contiguous": ("omniglot_maml_5w1s", ["train.meta_batch_size=32",
                                                                            "train.channels_last=false"]),
    "MAML 5-way 1-shot, meta-batch 32, channels_last": ("omniglot_maml_5w1s", ["train.meta_batch_size=32"]),
    "ProtoNet 20-way 1-shot, meta-batch 8": ("omniglot_protonet_20w1s", ["train.meta_batch_size=8",
                                                                         "train.precision=fp32"]),
}


def run(config: str, overrides: list[str], out: Path, procs: int, steps: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    sets = [*overrides, f"train.meta_steps={steps}", "train.log_every=2", f"train.eval_every={steps}",
            f"train.save_interval={steps}", "train.optimizer=sgd", "train.meta_lr=0.05", "train.momentum=0.9",
            "train.lr_schedule=constant", "train.warmup_steps=0", "train.max_minutes=null", "train.progress=false",
            "train.tensorboard=false", "eval.val_episodes=20", "eval.calibrate=false", f"out_dir={out}"]
    cli = ["train", config, "--no-test", *[a for s in sets for a in ("--set", s)]]
    metafit = shutil.which("metafit")
    if procs == 1:
        cmd = [metafit, *cli]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "--no-python", metafit, *cli]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in rows if r["split"] == "train"][1:] or [r["step_s"] for r in rows if r["split"] == "train"]
    _, tensors = read_checkpoint(out / "last.safetensors")
    # learned parameters only: BatchNorm running statistics are averaged over ranks, not recomputed
    params = torch.cat([t.flatten().double() for k, t in sorted(tensors.items())
                        if k.startswith("model.") and t.is_floating_point() and ".running_" not in k])
    return {"step_s": statistics.median(step_s), "windows": len(step_s), "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR", str(HERE.parent.parent / "shared/data/omniglot")))
    ap.add_argument("--out", default="runs/distributed-bench")
    ap.add_argument("--json", default=str(HERE / "results" / "distributed_scaling.json"))
    args = ap.parse_args()
    os.environ["METAFIT_DATA_DIR"] = args.data_dir
    results = {}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.steps} meta-steps per run")
    print("| case | 1 process s/step | 2 processes s/step | speed-up | max abs param diff | relative |")
    print("|---|---|---|---|---|---|")
    for name, (config, overrides) in CASES.items():
        slug = config.replace("omniglot_", "") + ("-cl" if "channels_last" in name else "")
        one = run(config, [*overrides, f"data.root={json.dumps(args.data_dir)}"], Path(args.out) / f"{slug}-1", 1, args.steps)
        two = run(config, [*overrides, f"data.root={json.dumps(args.data_dir)}"], Path(args.out) / f"{slug}-2", 2, args.steps)
        diff = float((one["params"] - two["params"]).abs().max())
        rel = diff / float(one["params"].abs().max())
        results[name] = {"config": config, "overrides": overrides, "one_process_step_s": one["step_s"],
                         "two_process_step_s": two["step_s"], "speedup": one["step_s"] / two["step_s"],
                         "max_abs_param_diff": diff, "relative_param_diff": rel}
        print(f"| {name} | {one['step_s']:.3f} | {two['step_s']:.3f} | {one['step_s'] / two['step_s']:.2f}x | "
              f"{diff:.2e} | {rel:.2e} |")
    write_json(args.json, {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "torch": torch.__version__, "steps": args.steps, "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
