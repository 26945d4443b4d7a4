"""Distributed meta-training (torch.distributed, gloo, 2 CPU processes launched by torchrun):
the split meta-batch gives the parameters one process gets with the whole meta-batch, ranks stay
in step, only rank 0 writes, resume works, and `metafit train` runs unchanged under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import synthetic_classes, tiny_config, write_image_tree
from metafit import ConfigError
from metafit.training import Trainer, make_config
from metafit.training.checkpoint import read_checkpoint

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="torch.distributed (gloo) is not available")


def _splits():
    data = synthetic_classes(n_classes=30)
    ids = torch.arange(data.n_classes)
    return {"train": data.subset(ids[:18]), "val": data.subset(ids[18:24]), "test": data.subset(ids[24:])}


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _params(path: Path) -> torch.Tensor:
    _, tensors = read_checkpoint(path)
    return torch.cat([t.flatten().double() for k, t in sorted(tensors.items()) if k.startswith("model.")
                      and t.is_floating_point()])


CASES = {
    "maml": {"name": "maml", "inner_steps": 1, "inner_lr": 0.4},
    "fomaml": {"name": "maml", "inner_steps": 2, "inner_lr": 0.4, "first_order": True},
    "reptile": {"name": "reptile", "inner_steps": 2, "inner_lr": 0.1},
    "protonet": {"name": "protonet"},
}


def _config(out: Path, algorithm: dict, steps: int) -> dict:
    # SGD: Adam's first steps are ~lr * sign(g), which turns the rounding noise of gradients that are
    # zero in exact arithmetic (a conv bias before BatchNorm) into lr-sized differences for any change
    # of summation order, distributed or not
    return tiny_config(out, algorithm=algorithm,
                       train={"meta_batch_size": 4, "meta_steps": steps, "eval_every": 2, "save_interval": 2,
                              "optimizer": "sgd", "meta_lr": 0.05})


def test_two_processes_match_one_process_with_the_whole_meta_batch(tmp_path):
    specs = []
    for name, alg in CASES.items():
        cfg = _config(tmp_path / "dist" / name, alg, 4)
        spec = tmp_path / f"{name}.json"
        spec.write_text(json.dumps({"config": cfg}))
        specs.append(str(spec))
    # resume: 2 steps, then continue to 4 under torchrun
    for i, steps in enumerate((2, 4)):
        spec = tmp_path / f"resume{i}.json"
        spec.write_text(json.dumps({"config": _config(tmp_path / "dist" / "resumed", CASES["maml"], steps),
                                    "resume": i == 1}))
        specs.append(str(spec))
    _torchrun([str(HERE / "dist_worker.py"), *specs], tmp_path)

    splits = _splits()
    for name, alg in CASES.items():
        dist_dir = tmp_path / "dist" / name
        r0, r1 = torch.load(dist_dir / "params-rank0.pt"), torch.load(dist_dir / "params-rank1.pt")
        assert torch.equal(r0, r1), f"{name}: ranks drifted apart"
        if name == "protonet":
            continue  # one backbone pass over the meta-batch: BatchNorm sees each rank's share (see docs)
        one = Trainer(make_config(_config(tmp_path / "one" / name, alg, 4)), splits)
        one.fit()
        ref = _params(tmp_path / "one" / name / "last.safetensors")
        got = _params(dist_dir / "last.safetensors")
        err = float((got - ref).abs().max())
        moved = float((ref - _params(tmp_path / "one" / name / "step-0000002.safetensors")).abs().max())
        assert err < 1e-5 and moved > 1e-4, (name, err, moved)
    resumed = _params(tmp_path / "dist" / "resumed" / "last.safetensors")
    assert float((resumed - _params(tmp_path / "one" / "maml" / "last.safetensors")).abs().max()) < 1e-5
    # only rank 0 logs: one line per logged step, no duplicates
    rows = [json.loads(line) for line in (tmp_path / "dist" / "maml" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) == [2, 4]


def test_metafit_train_runs_unchanged_under_torchrun(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=30, per_class=6, size=16)
    cfg = tiny_config(tmp_path / "run", algorithm={"name": "maml", "inner_steps": 1},
                      train={"meta_batch_size": 2, "meta_steps": 4, "eval_every": 2, "save_interval": 2})
    cfg["data"].update({"root": str(root), "val_fraction": 0.25, "test_fraction": 0.25})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    metafit = shutil.which("metafit")
    if metafit is None:
        pytest.skip("the metafit console script is not on PATH")
    _torchrun(["--no-python", metafit, "train", str(path), "--no-test"], tmp_path)
    run = tmp_path / "run"
    assert (run / "best.safetensors").is_file() and (run / "last.safetensors").is_file()
    meta, _ = read_checkpoint(run / "last.safetensors")
    assert meta["step"] == 4
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))


def test_meta_batch_must_split_evenly(monkeypatch, tmp_path):
    from metafit.training.distributed import DistContext

    monkeypatch.setattr("metafit.training.trainer.init_distributed", lambda device: DistContext(0, 2, 0, "gloo"))
    cfg = make_config(tiny_config(tmp_path, train={"meta_batch_size": 3}))
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        Trainer(cfg, _splits())
