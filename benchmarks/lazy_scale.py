"""Lazy storage at scale: generate a class-per-folder tree of >= 300,000 JPEG images (64x64 colour,
3.7 GB once decoded), train ProtoNet on it with ``data.storage: lazy`` (images decoded on demand
by DataLoader worker processes), and report peak memory (RSS of the training process and of the
largest worker), the step breakdown (time the training loop waited for data against the whole
step) and the decoding rate of one worker.

    python benchmarks/lazy_scale.py [--root /tmp/lazy-tree] [--classes 1000] [--per-class 300] [--steps 300]

The tree is written once (kept for later runs). Prints a table and writes
benchmarks/results/lazy_scale.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metafit.data import data_config
from metafit.training import Trainer, load_config
from metafit.training import write_json

HERE = Path(__file__).resolve().parent


def write_tree(root: Path, classes: int, per_class: int, size: int = 64) -> int:
    """Class folders of noisy colour patterns (a class = a random low-frequency pattern)."""
    done = root / ".complete"
    if done.is_file() and json.loads(done.read_text()) == [classes, per_class, size]:
        return classes * per_class
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.kron(rng.random((8, 8, 3)), np.ones((size // 8, size // 8, 1)))
        for i in range(per_class):
            img = np.clip(base + 0.25 * rng.standard_normal((size, size, 3)), 0, 1)
            buf = io.BytesIO()
            Image.fromarray((img * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            (folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())
    done.write_text(json.dumps([classes, per_class, size]))
    return classes * per_class


def rss_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process and of its largest finished child."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "metafit-lazy-tree"))
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "lazy_scale.json"))
    args = ap.parse_args()
    root = Path(args.root)
    t0 = time.time()
    n = write_tree(root, args.classes, args.per_class)
    print(f"tree: {n:,} images in {root} ({time.time() - t0:.0f} s)")

    data = {"name": "folder", "root": str(root), "image_size": 64, "channels": 3, "rotations": False,
            "fit": "crop", "storage": "lazy", "workers": args.workers, "normalize": "none"}
    source = data_config(data)
    t0 = time.time()
    splits = source.load_splits()
    scan_s = time.time() - t0
    store = splits["train"].images
    t0 = time.time()
    k = 3000
    store.fetch(torch.arange(k) * (len(store) // k))
    decode_rate = k / (time.time() - t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("tiny_imagenet_protonet", [
            f"out_dir={out}", "train.progress=false", "train.tensorboard=false", f"train.meta_steps={args.steps}",
            "train.eval_every=1000000", "train.save_interval=1000000", "train.max_minutes=null",
            "eval.val_episodes=20", "eval.calibrate=false"])
        cfg = cfg.model_copy(update={"data": source})
        trainer = Trainer(cfg, splits=splits)
        trainer.fit()
        t = dict(trainer.timing)  # fit() has stopped the workers, so their peak RSS is counted below
    step = sum(t.values()) / args.steps
    main_mb, worker_mb = rss_mb()
    row = {"images": n, "classes": args.classes, "decoded_gb": store.nbytes / 1e9, "workers": args.workers,
           "scan_seconds": scan_s, "decode_images_per_s_one_process": decode_rate,
           "steps": args.steps, "images_per_step": cfg.task.n_ways * (cfg.task.k_shots + cfg.task.n_queries),
           "step_s": step, "data_wait_s": t["data_s"] / args.steps,
           "data_fraction_of_step": t["data_s"] / sum(t.values()),
           "augment_s": t["augment_s"] / args.steps, "augment_fraction_of_step": t["augment_s"] / sum(t.values()),
           "forward_s": t["forward_s"] / args.steps, "backward_s": t["backward_s"] / args.steps,
           "optimizer_s": t["optimizer_s"] / args.steps,
           "peak_rss_main_mb": main_mb, "peak_rss_largest_worker_mb": worker_mb}
    print("| images | decoded | workers | step | data wait | data share | augmentation | peak RSS (main) | "
          "peak RSS (worker) | decode rate (1 process) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {n:,} | {row['decoded_gb']:.1f} GB | {args.workers} | {1000 * step:.0f} ms | "
          f"{1000 * row['data_wait_s']:.1f} ms | {100 * row['data_fraction_of_step']:.1f}% | "
          f"{1000 * row['augment_s']:.1f} ms ({100 * row['augment_fraction_of_step']:.1f}%) | {main_mb:.0f} MB | "
          f"{worker_mb:.0f} MB | {decode_rate:.0f} images/s |")
    write_json(Path(args.out), {"benchmark": "lazy_scale",
                                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                                "result": row})
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
