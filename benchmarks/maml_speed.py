"""MAML meta-iteration speed against higher, TorchOpt and a plain per-task autograd loop,
measured side by side in one run (rounds interleave the contenders, so machine noise hits all).

Setting (the issue's): 5-way 1-shot, 15 queries per class, Conv4 (64 channels, 28x28, one
input channel), meta-batch 32, one inner SGD step (lr 0.4), Adam outer step, float32, second and
first order. Every contender starts from the same weights and sees the same meta-batch; the
table gives seconds per meta-iteration (median of --rounds), speed-up over the fastest peer,
achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter on the plain loop) and its fraction
of the fp32 matmul peak measured in the same run, and each contender's meta-gradient error
against a float64 computation of the same meta-gradient.

    python benchmarks/maml_speed.py [--rounds 7] [--data-dir PATH] [--device cuda]

Peers are optional imports (pip install higher torchopt); learn2learn is included when it
imports. Omniglot episodes are used when the zips are found (--data-dir, METAFIT_DATA_DIR or
../shared/data/omniglot), else synthetic binary images. Writes benchmarks/results/maml_speed.json
(maml_speed_cuda.json with --device cuda). On a GPU, cuDNN's TF32 convolutions are switched off so
every contender computes in true fp32 (the same numerics as on the CPU), the threads variants are
left out (threads are a CPU strategy) and the timer waits for the device before reading the clock.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metafit.algorithms import algorithm_config, build_algorithm
from metafit.nn import Conv4, Conv4Config

HERE = Path(__file__).resolve().parent
N_WAYS, K_SHOTS, N_QUERIES, META_BATCH, INNER_LR = 5, 1, 15, 32, 0.4
# (label, algorithm.execution, memory layout). The contiguous layout gives peer-identical numerics;
# channels_last is faster on this CPU but PyTorch's channels_last BatchNorm statistics kernel
# sums in float32 (the table's float64 error column shows the cost).
# "metafit auto" is what a config with the default execution gets on that device.
CPU_VARIANTS = [
    ("metafit loop", "loop", "contiguous"),
    ("metafit vmap", "vmap", "contiguous"),
    ("metafit threads (auto)", "auto", "contiguous"),
    ("metafit threads, channels_last", "auto", "channels_last"),
]
GPU_VARIANTS = [
    ("metafit loop", "loop", "contiguous"),
    ("metafit vmap (auto)", "auto", "contiguous"),
]


def standard_conv4(n_ways: int) -> nn.Module:
    """The Conv4 every peer library's MAML example uses: conv-BN-ReLU-pool, contiguous layout,
    batch statistics always (no running averages)."""
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        c = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, n_ways))


def load_batch(data_dir: str | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    try:
        from metafit.data import EpisodeSampler, omniglot_splits
        splits = omniglot_splits("vinyals", data_dir)
        b = EpisodeSampler(splits["train"], N_WAYS, K_SHOTS, N_QUERIES, rotations=True, seed=seed).sample(META_BATCH)
        return b.support_x, b.support_y, b.query_x, b.query_y, "omniglot"
    except Exception:  # no data here: binary images with Omniglot's ink density
        sx = (torch.rand(META_BATCH, N_WAYS * K_SHOTS, 1, 28, 28, generator=g) > 0.85).float()
        qx = (torch.rand(META_BATCH, N_WAYS * N_QUERIES, 1, 28, 28, generator=g) > 0.85).float()
        sy = torch.arange(N_WAYS).repeat_interleave(K_SHOTS).expand(META_BATCH, -1).contiguous()
        qy = torch.arange(N_WAYS).repeat_interleave(N_QUERIES).expand(META_BATCH, -1).contiguous()
        return sx, sy, qx, qy, "synthetic"


# ---- contenders: each is (model, step(first_order) -> None that fills .grad) --------------------
def plain_loop(model, batch, first_order):
    sx, sy, qx, qy = batch
    params = dict(model.named_parameters())
    for i in range(sx.shape[0]):
        loss = F.cross_entropy(functional_call(model, params, (sx[i],)), sy[i])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
        fast = {n: p - INNER_LR * g for (n, p), g in zip(params.items(), grads)}
        (F.cross_entropy(functional_call(model, fast, (qx[i],)), qy[i]) / sx.shape[0]).backward()


def higher_step(model, batch, first_order):
    import higher
    sx, sy, qx, qy = batch
    inner = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    for i in range(sx.shape[0]):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            diffopt.step(F.cross_entropy(fmodel(sx[i]), sy[i]))
            loss = F.cross_entropy(fmodel(qx[i]), qy[i]) / sx.shape[0]
            if first_order:  # higher detaches the fast weights: take their gradient by hand
                grads = torch.autograd.grad(loss, fmodel.parameters())
                for p, g in zip(model.parameters(), grads):
                    p.grad = g if p.grad is None else p.grad + g
            else:
                loss.backward()


def torchopt_step(model, batch, first_order):
    import torchopt
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    opt = torchopt.sgd(lr=INNER_LR)
    for i in range(sx.shape[0]):
        params = tuple(model.parameters())
        state = opt.init(params)
        loss = F.cross_entropy(functional_call(model, dict(zip(names, params)), (sx[i],)), sy[i])
        grads = torch.autograd.grad(loss, params, create_graph=not first_order)
        updates, state = opt.update(grads, state, inplace=False)
        fast = torchopt.apply_updates(params, updates, inplace=False)
        (F.cross_entropy(functional_call(model, dict(zip(names, fast)), (qx[i],)), qy[i]) / sx.shape[0]).backward()


def l2l_step(model, batch, first_order):
    import learn2learn as l2l
    sx, sy, qx, qy = batch
    maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=first_order)
    for i in range(sx.shape[0]):
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(sx[i]), sy[i]))
        (F.cross_entropy(learner(qx[i]), qy[i]) / sx.shape[0]).backward()


def metafit_model(execution: str, first_order: bool, dtype=torch.float32):
    backbone = Conv4(Conv4Config(hidden_channels=64, n_blocks=4, bn_mode="transductive"), 1, 28)
    cfg = algorithm_config({"name": "maml", "inner_lr": INNER_LR, "inner_steps": 1, "first_order": first_order,
                            "execution": execution})
    return build_algorithm(cfg, backbone, n_outputs=N_WAYS).to(dtype)


def metafit_step(model, batch, first_order):
    from metafit.types import TaskBatch
    model.meta_loss(TaskBatch(*batch, N_WAYS)).loss.backward()


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        for a, b in zip(src.parameters(), dst.parameters()):
            b.copy_(a)


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, seconds: float = 2.0) -> float:
    size = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
        if device.type != "cpu" and n % 10 == 0:
            synchronize(device)
    synchronize(device)
    return 2 * size ** 3 * n / (time.perf_counter() - t0) / 1e9


def count_flops(batch, first_order) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    model = standard_conv4(N_WAYS).to(batch[0].device)
    with FlopCounterMode(display=False) as fc:
        plain_loop(model, batch, first_order)
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR", str(HERE.parent.parent / "shared/data/omniglot")))
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/maml_speed[_cuda].json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # true fp32 convolutions, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
    out_path = Path(args.out) if args.out else HERE / "results" / (
        "maml_speed.json" if device.type == "cpu" else f"maml_speed_{device.type}.json")
    *batch, source = load_batch(args.data_dir)
    batch = tuple(t.to(device) for t in batch)
    batch_cl = (batch[0].flatten(0, 1).contiguous(memory_format=torch.channels_last).view_as(batch[0]), batch[1],
                batch[2].flatten(0, 1).contiguous(memory_format=torch.channels_last).view_as(batch[2]), batch[3])
    peak = matmul_peak(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"data: {source}; torch {torch.__version__}; {where}; fp32 matmul peak {peak:.0f} GFLOP/s")
    variants = CPU_VARIANTS if device.type == "cpu" else GPU_VARIANTS

    torch.manual_seed(0)
    reference = standard_conv4(N_WAYS).to(device)
    peers = {"plain loop": plain_loop}
    for name, mod, fn in (("higher", "higher", higher_step), ("torchopt", "torchopt", torchopt_step),
                          ("learn2learn", "learn2learn", l2l_step)):
        try:
            __import__(mod)
            peers[name] = fn
        except Exception as err:  # noqa: BLE001 - an uninstallable peer is reported, not fatal
            print(f"skipping {name}: {type(err).__name__}: {err}")
    results = {}
    for first_order in (False, True):
        order = "first" if first_order else "second"
        # float64 reference meta-gradient (plain loop on the standard model)
        ref64 = copy.deepcopy(reference).double()
        plain_loop(ref64, tuple(t.double() if t.is_floating_point() else t for t in batch), first_order)
        g64 = flat_grad(ref64)
        contenders = {}
        for name, fn in peers.items():
            m = copy.deepcopy(reference)
            contenders[name] = (m, fn, batch)
        for label, execution, layout in variants:
            m = metafit_model(execution, first_order).to(device)
            if layout == "channels_last":
                m = m.to(memory_format=torch.channels_last)
            copy_weights(reference, m)
            contenders[label] = (m, metafit_step, batch_cl if layout == "channels_last" else batch)
        opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, (m, _, _) in contenders.items()}
        errors, agree = {}, {}
        for name, (m, fn, b) in contenders.items():  # numerics on the untouched initial weights
            m.zero_grad(set_to_none=True)
            fn(m, b, first_order)
            g = flat_grad(m)
            errors[name] = float((g - g64).norm() / g64.norm())
            agree[name] = g
        base = agree["plain loop"]
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(args.rounds + 1):
            for name, (m, fn, b) in contenders.items():
                synchronize(device)
                t0 = time.perf_counter()
                opts[name].zero_grad(set_to_none=True)
                fn(m, b, first_order)
                opts[name].step()
                synchronize(device)
                dt = time.perf_counter() - t0
                if r:  # round 0 warms up
                    times[name].append(dt)
        flops = count_flops(batch, first_order)
        med = {k: statistics.median(v) for k, v in times.items()}
        fastest_peer = min((k for k in peers), key=lambda k: med[k])
        print(f"\n{order}-order MAML, {META_BATCH} tasks of {N_WAYS}-way {K_SHOTS}-shot {N_QUERIES}-query; "
              f"{flops / 1e9:.1f} GFLOP per meta-iteration")
        print(f"{'contender':32s} {'s/iter':>7s} {'min':>7s} {'vs fastest peer':>15s} {'GFLOP/s':>8s} "
              f"{'% peak':>6s} {'err vs fp64':>11s} {'diff vs loop':>12s}")
        rows = []
        for name in contenders:
            row = {"contender": name, "median_s": med[name], "min_s": min(times[name]), "times_s": times[name],
                   "speedup_vs_fastest_peer": med[fastest_peer] / med[name],
                   "gflops": flops / med[name] / 1e9, "fraction_of_peak": flops / med[name] / 1e9 / peak,
                   "rel_error_vs_float64": errors[name],
                   "rel_diff_vs_plain_loop": float((agree[name] - base).norm() / base.norm())}
            rows.append(row)
            print(f"{name:32s} {row['median_s']:7.3f} {row['min_s']:7.3f} {row['speedup_vs_fastest_peer']:14.2f}x "
                  f"{row['gflops']:8.1f} {100 * row['fraction_of_peak']:5.1f}% {row['rel_error_vs_float64']:11.1e} "
                  f"{row['rel_diff_vs_plain_loop']:12.1e}")
        results[order] = {"gflop_per_iteration": flops / 1e9, "fastest_peer": fastest_peer, "rows": rows}
    out = {
        "benchmark": "maml_speed", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "setting": {"n_ways": N_WAYS, "k_shots": K_SHOTS, "n_queries": N_QUERIES, "meta_batch": META_BATCH,
                    "inner_lr": INNER_LR, "inner_steps": 1, "outer": "adam", "dtype": "float32", "data": source,
                    "rounds": args.rounds},
        "fp32_matmul_peak_gflops": peak, "results": results,
    }
    from metafit.training import write_json
    write_json(out_path, out)
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
