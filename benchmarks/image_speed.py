"""Throughput of the colour-image path: Conv4 on 64x64 RGB images, training steps (forward,
backward, Adam) and evaluation (no-grad forward), metafit's backbone against a plain PyTorch
``nn.Sequential`` Conv4, in fp32 and bf16 autocast, contiguous and channels_last.

    python benchmarks/image_speed.py [--batch 128] [--rounds 7] [--size 64] [--threads N]
    python benchmarks/image_speed.py --backbone resnet12 --batch 32     # ResNet-12's throughput alone

Contenders are timed in interleaved rounds (median of ``--rounds``), side by side in one run.
FLOPs are counted by torch's FlopCounterMode on the plain model; the fp32 peak is the
GFLOP/s of a large fp32 matrix product on this machine. Prints a table and writes
benchmarks/results/image_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metafit.nn import Conv4, Conv4Config, ResNet12, ResNet12Config

HERE = Path(__file__).resolve().parent


def plain_conv4(channels: int = 3, hidden: int = 64) -> nn.Module:
    blocks, c = [], channels
    for _ in range(4):
        blocks += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
        c = hidden
    return nn.Sequential(*blocks, nn.Flatten())


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, classes: int = 64) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(features, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def peak_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(training-step FLOPs, forward FLOPs) of ``model`` on ``x``."""
    model.train()
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    train = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return train, fc.get_total_flops()


def contenders(size: int, backbone: str):
    if backbone == "resnet12":
        rn = lambda: ResNet12(ResNet12Config(), 3, size)  # noqa: E731
        mk_metafit = lambda: Classifier(rn(), rn().out_features)  # noqa: E731
        pairs = (("metafit ResNet-12", mk_metafit, None),)
    else:
        feats = 64 * (size // 16) ** 2
        mk_metafit = lambda: Classifier(Conv4(Conv4Config(), 3, size), feats)  # noqa: E731
        mk_plain = lambda: Classifier(plain_conv4(), feats)  # noqa: E731
        pairs = (("plain nn.Sequential", mk_plain, None), ("metafit Conv4", mk_metafit, None))
    out = []
    for name, make, fuse in pairs:
        for cl in (False, True):
            for bf16 in (False, True):
                out.append((f"{name} {'channels_last' if cl else 'contiguous'} {'bf16' if bf16 else 'fp32'}",
                            make, cl, bf16, fuse))
    return out


def step_fns(make, cl: bool, bf16: bool, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = make()
    if cl:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()

    def evaluate():
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)

    return train, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backbone", choices=["conv4", "resnet12"], default="conv4",
                    help="resnet12: metafit's ResNet-12 alone (FLOPs counted on it), no plain peer")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/image_speed[_resnet12].json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(64, (args.batch,))
    peak = peak_gflops()
    entries = contenders(args.size, args.backbone)
    reference = (Classifier(plain_conv4(), 64 * (args.size // 16) ** 2) if args.backbone == "conv4"
                 else entries[0][1]())
    train_flops, eval_flops = flops(reference, x, y)
    fns = {}
    for name, make, cl, bf16, _ in entries:
        tr, ev = step_fns(make, cl, bf16, x, y)
        tr(), ev()  # warm-up
        fns[name] = (tr, ev)
    times = {name: ([], []) for name in fns}
    for _ in range(args.rounds):
        for name, (tr, ev) in fns.items():
            t = time.perf_counter()
            tr()
            times[name][0].append(time.perf_counter() - t)
            t = time.perf_counter()
            ev()
            times[name][1].append(time.perf_counter() - t)
    rows = []
    for name, _, cl, bf16, _ in entries:
        tr, ev = (statistics.median(v) for v in times[name])
        rows.append({"contender": name, "channels_last": cl, "bf16": bf16,
                     "train_step_s": tr, "train_images_per_s": args.batch / tr,
                     "train_gflops": train_flops / tr / 1e9, "train_fraction_of_fp32_peak": train_flops / tr / 1e9 / peak,
                     "eval_s": ev, "eval_images_per_s": args.batch / ev,
                     "eval_gflops": eval_flops / ev / 1e9, "eval_fraction_of_fp32_peak": eval_flops / ev / 1e9 / peak})
    base = rows[0]
    print(f"{args.backbone}, {args.batch} RGB images {args.size}x{args.size}, {torch.get_num_threads()} threads; fp32 matmul "
          f"peak {peak:.0f} GFLOP/s; step {train_flops / 1e9:.1f} GFLOP, eval {eval_flops / 1e9:.1f} GFLOP")
    print(f"{'contender':46s} {'train img/s':>11s} {'x row1':>8s} {'%peak':>6s} {'eval img/s':>11s} {'x row1':>8s} {'%peak':>6s}")
    for r in rows:
        print(f"{r['contender']:46s} {r['train_images_per_s']:11.0f} {r['train_images_per_s'] / base['train_images_per_s']:8.2f} "
              f"{100 * r['train_fraction_of_fp32_peak']:6.1f} {r['eval_images_per_s']:11.0f} "
              f"{r['eval_images_per_s'] / base['eval_images_per_s']:8.2f} {100 * r['eval_fraction_of_fp32_peak']:6.1f}")
    out = {"benchmark": "image_speed", "backbone": args.backbone, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "batch": args.batch, "size": args.size, "rounds": args.rounds,
           "fp32_peak_gflops": peak, "train_step_gflop": train_flops / 1e9, "eval_gflop": eval_flops / 1e9,
           "rows": rows}
    path = Path(args.out or HERE / "results" / f"image_speed{'' if args.backbone == 'conv4' else '_' + args.backbone}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
