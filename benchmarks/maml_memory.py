"""Peak memory of a MAML meta-iteration against inner steps (1, 3, 5), second and first order.

Setting: 5-way 1-shot, 15 queries per class, Conv4 (64 channels, 28x28), meta-batch 32, fp32,
CPU. Each measurement runs in a fresh process: the peak resident set size (ru_maxrss) grown by
one meta-iteration (meta-loss and backward) over the peak before it. Tasks free their graphs as
soon as their gradients are taken, so the peak is that of one task (per thread) and does not
grow with the meta-batch; second order keeps every inner step's graph, so it grows with steps.

    python benchmarks/maml_memory.py [--device cuda]

On a GPU the figure is the growth of the peak allocated device memory
(torch.cuda.max_memory_allocated) over the memory held before the meta-iteration, for the loop
and for vmap (all tasks' graphs at once: grows with the meta-batch). Writes
benchmarks/results/maml_memory.json (maml_memory_cuda.json with --device cuda).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, torch
from metafit.algorithms import algorithm_config, build_algorithm
from metafit.nn import Conv4, Conv4Config
from metafit.types import TaskBatch
steps, first_order, execution, device = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
b, n, k, q = 32, 5, 1, 15
batch = TaskBatch((torch.rand(b, n * k, 1, 28, 28) > 0.85).float(), torch.arange(n).repeat_interleave(k).expand(b, -1),
                  (torch.rand(b, n * q, 1, 28, 28) > 0.85).float(), torch.arange(n).repeat_interleave(q).expand(b, -1), n)
backbone = Conv4(Conv4Config(bn_mode="transductive"), 1, 28)
model = build_algorithm(algorithm_config({"name": "maml", "inner_steps": steps, "first_order": first_order,
                                          "execution": execution}), backbone, n_outputs=n)
if device == "cpu":
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.meta_loss(batch).loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mib": (after - before) / 1024}))
else:
    model = model.to(device)
    batch = TaskBatch(*(t.to(device) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)), n)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model.meta_loss(batch).loss.backward()
    torch.cuda.synchronize()
    print(json.dumps({"peak_growth_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}))
"""


def measure(steps: int, first_order: bool, execution: str, device: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps), "1" if first_order else "0", execution, device],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/maml_memory[_cuda].json)")
    args = ap.parse_args()
    gpu = args.device != "cpu"
    out = Path(args.out) if args.out else HERE / "results" / ("maml_memory_cuda.json" if gpu else "maml_memory.json")
    rows = []
    print(f"{'order':>6s} {'execution':>9s} " + " ".join(f"{f'{s} step(s)':>10s}" for s in (1, 3, 5)) + "   (MiB)")
    for first_order in (False, True):
        for execution in (("loop", "vmap") if gpu else ("loop", "threads")):
            peaks = {s: measure(s, first_order, execution, args.device) for s in (1, 3, 5)}
            rows.append({"order": "first" if first_order else "second", "execution": execution,
                         "peak_growth_mib": peaks})
            print(f"{'first' if first_order else 'second':>6s} {execution:>9s} "
                  + " ".join(f"{peaks[s]:10.0f}" for s in (1, 3, 5)), flush=True)
    from metafit.training import write_json
    import torch
    device_name = torch.cuda.get_device_name(args.device) if gpu else None
    write_json(out, {
        "benchmark": "maml_memory", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": args.device, "device_name": device_name},
        "setting": "5-way 1-shot, 15 queries/class, Conv4-64 28x28, meta-batch 32, fp32, "
                   + (f"GPU ({device_name}): peak allocated growth" if gpu else "CPU: peak RSS growth"),
        "rows": rows,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
