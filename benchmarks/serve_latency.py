"""Putting models to work, measured: (1) adapt + predict latency through the Python API for a
20-way 5-shot task with 100 query images (PNG files on disk: decoding and conversion included),
per algorithm; (2) HTTP service throughput and p50/p99 latency on loopback with concurrent
clients, and memory held per cached task; (3) expected calibration error before and after
temperature scaling on Omniglot 20-way 1-shot test episodes. Prints tables and writes JSON.

    python benchmarks/serve_latency.py --checkpoint protonet=runs/heads/vinyals/protonet/best.safetensors \\
        --checkpoint svm=runs/heads/vinyals/svm/best.safetensors ...

Test characters come from the checkpoints' Omniglot test split (--data-dir, else
METAFIT_DATA_DIR, else ../shared/data/omniglot). The first checkpoint is served and calibrated.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import metafit
from metafit.data import load_splits
from metafit.training import evaluate_checkpoint, make_sampler
from metafit.training import calibrate_checkpoint
from metafit.training import write_json

HERE = Path(__file__).resolve().parent


def _write_task(model, data_root: str, folder: Path, seed: int = 7) -> tuple[list[Path], list[str], list[Path], list[str]]:
    """A 20-way 5-shot task with 5 queries per class from the test split, as PNG files drawn the
    way the official Omniglot files are (dark ink on white)."""
    cfg = model.config.model_copy(update={"data": model.config.data.model_copy(update={"root": data_root})})
    ev = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=dict(n_ways=20, k_shots=5, n_queries=5,
                                                                         within_group=False, rotations=False))})
    sampler = make_sampler(load_splits(cfg.data)["test"], ev, "test", 0)
    task = sampler.materialize(sampler.fixed_episodes(1, seed))[0]

    def save(x, name):
        arr = (255 - (x[0].numpy() * 255).round()).astype(np.uint8)  # back to ink-dark files
        path = folder / name
        Image.fromarray(arr, "L").resize((105, 105), Image.Resampling.BILINEAR).save(path)
        return path

    s_files = [save(x, f"s{i:03d}.png") for i, x in enumerate(task.support_x)]
    q_files = [save(x, f"q{i:03d}.png") for i, x in enumerate(task.query_x)]
    names = [f"class{int(y):02d}" for y in task.support_y]
    q_names = [f"class{int(y):02d}" for y in task.query_y]
    return s_files, names, q_files, q_names


def api_latency(name: str, ckpt: str, data_root: str, repeats: int) -> dict:
    model = metafit.load(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        s, sn, q, qn = _write_task(model, data_root, Path(tmp))
        adapt_ms, predict_ms, acc = [], [], []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            task = model.adapt(s, sn)
            t1 = time.perf_counter()
            pred = task.predict(q)
            t2 = time.perf_counter()
            if i:  # the first round warms up
                adapt_ms.append(1e3 * (t1 - t0))
                predict_ms.append(1e3 * (t2 - t1))
            acc.append(float(np.mean([a == b for a, b in zip(pred.labels, qn)])))
    from metafit.serve import task_bytes

    return {"name": name, "checkpoint": ckpt, "algorithm": model.config.algorithm.name, "task_bytes": task_bytes(task),
            "adapt_ms": statistics.median(adapt_ms), "predict_100_ms": statistics.median(predict_ms),
            "total_ms": statistics.median(a + p for a, p in zip(adapt_ms, predict_ms)),
            "query_accuracy": acc[-1], "repeats": repeats}


def service(ckpt: str, data_root: str, clients: int, requests: int) -> dict:
    import httpx
    import uvicorn

    from metafit.serve import ServeLimits, create_app

    model = metafit.load(ckpt)
    app = create_app(model, ServeLimits())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    tmp = Path(tempfile.mkdtemp())
    try:
        s, sn, q, qn = _write_task(model, data_root, tmp)
        files = lambda paths: [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]  # noqa: E731
        with httpx.Client(base_url=url, timeout=120) as c:
            t0 = time.perf_counter()
            created = c.post("/tasks", files=files(s), data={"labels": sn}).json()
            create_ms = 1e3 * (time.perf_counter() - t0)
        task_id = created["task_id"]
        payloads = [files([p]) for p in q]

        def client(k: int) -> tuple[list[float], int, int]:
            lat, right, errors = [], 0, 0
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(requests):
                    j = (k * requests + i) % len(q)
                    t = time.perf_counter()
                    r = c.post(f"/tasks/{task_id}/predict", files=payloads[j])
                    lat.append(1e3 * (time.perf_counter() - t))
                    if r.status_code != 200:
                        errors += 1
                    else:
                        right += r.json()["predictions"][0]["label"] == qn[j]
            return lat, right, errors

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(client, range(clients)))
        wall = time.perf_counter() - t0
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    lat = sorted(x for r in results for x in r[0])
    n = len(lat)
    return {"checkpoint": ckpt, "clients": clients, "requests": n, "images_per_request": 1,
            "throughput_rps": n / wall, "p50_ms": lat[n // 2], "p99_ms": lat[min(n - 1, int(0.99 * n))],
            "errors": sum(r[2] for r in results), "accuracy": sum(r[1] for r in results) / n,
            "create_task_ms": create_ms, "task_bytes": created["bytes"], "n_support": created["n_support"]}


def calibration(ckpt: str, data_root: str, episodes: int) -> dict:
    tmp = Path(tempfile.mkdtemp()) / "calibrated.safetensors"
    cal = calibrate_checkpoint(ckpt, out=tmp, n_ways=20, k_shots=1, data_root=data_root)
    r = evaluate_checkpoint(tmp, n_ways=20, k_shots=1, n_queries=15, episodes=episodes, split="test",
                            data_root=data_root)
    shutil.rmtree(tmp.parent, ignore_errors=True)
    return {"checkpoint": ckpt, "temperature": cal["temperature"], "val_episodes": cal["episodes"],
            "val_ece_before": cal["ece_before"], "val_ece_after": cal["ece_after"],
            "test_episodes": episodes, "test_accuracy": r["mean"], "test_ece_before": r["ece"],
            "test_ece_after": r["ece_calibrated"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--repeats", type=int, default=5, help="timed adapt+predict rounds per model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="predict requests per client")
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes of the ECE measurement")
    ap.add_argument("--calibrate", action="append", default=[], metavar="NAME",
                    help="checkpoints (by name) to calibrate and score (default: the first)")
    ap.add_argument("--skip-latency", action="store_true", help="calibration only (no latency or service runs)")
    ap.add_argument("--data-dir", default=os.environ.get("METAFIT_DATA_DIR", str(HERE.parent.parent / "shared/data/omniglot")))
    ap.add_argument("--out", default=str(HERE / "results" / "serve_latency.json"))
    args = ap.parse_args()
    ckpts = [c.split("=", 1) for c in args.checkpoint]
    paths = dict(ckpts)
    cals = [dict(calibration(paths[n], args.data_dir, args.episodes), name=n) for n in args.calibrate or [ckpts[0][0]]]
    out = {"benchmark": "serve_latency", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads", "calibration": cals}
    print("\nCalibration: 20-way 1-shot test ECE before -> after temperature scaling")
    print("| model | temperature (200 val episodes) | test accuracy | ECE before | ECE after |")
    print("|---|---|---|---|---|")
    for c in cals:
        print(f"| {c['name']} | {c['temperature']:.3f} | {100 * c['test_accuracy']:.2f}% | "
              f"{100 * c['test_ece_before']:.2f}% | {100 * c['test_ece_after']:.2f}% |")
    if args.skip_latency:
        write_json(Path(args.out), out)
        print(f"JSON: {args.out}")
        return
    lat = [api_latency(n, p, args.data_dir, args.repeats) for n, p in ckpts]
    svc = service(ckpts[0][1], args.data_dir, args.clients, args.requests)
    write_json(Path(args.out), {**out, "latency_20w5s_100q": lat, "service": svc})
    print("\nAdapt + predict, 20-way 5-shot, 100 query PNGs (Python API, median of", args.repeats, "rounds)")
    print("| model | algorithm | adapt ms | predict 100 ms | total ms | query accuracy | task memory |")
    print("|---|---|---|---|---|---|---|")
    for r in lat:
        print(f"| {r['name']} | {r['algorithm']} | {r['adapt_ms']:.1f} | {r['predict_100_ms']:.1f} | "
              f"{r['total_ms']:.1f} | {100 * r['query_accuracy']:.0f}% | {r['task_bytes'] / 1024:.1f} KiB |")
    print(f"\nService ({ckpts[0][0]}): {svc['clients']} clients x {args.requests} requests of 1 image: "
          f"{svc['throughput_rps']:.1f} req/s, p50 {svc['p50_ms']:.1f} ms, p99 {svc['p99_ms']:.1f} ms, "
          f"{svc['errors']} errors, accuracy {100 * svc['accuracy']:.1f}%; create task (100 images) "
          f"{svc['create_task_ms']:.0f} ms; memory per cached task {svc['task_bytes']} bytes")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
