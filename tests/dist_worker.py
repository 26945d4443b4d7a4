"""Worker for tests/test_distributed.py, launched with torchrun: trains each config (a JSON file)
on the shared synthetic dataset in one process group and saves this rank's final parameters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from conftest import synthetic_classes
from metafit.training import Trainer, make_config


def main(paths: list[str]) -> None:
    data = synthetic_classes(n_classes=30)
    ids = torch.arange(data.n_classes)
    splits = {"train": data.subset(ids[:18]), "val": data.subset(ids[18:24]), "test": data.subset(ids[24:])}
    for path in paths:
        spec = json.loads(Path(path).read_text())
        trainer = Trainer(make_config(spec["config"]), splits)
        trainer.fit(resume=spec.get("resume", False))
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        torch.save(flat, Path(spec["config"]["out_dir"]) / f"params-rank{trainer.dist.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
