"""Shared fixtures: a per-session decoded-image cache, the Omniglot folder (tests that need it
are skipped when it is absent), and small synthetic datasets that a model can learn."""

from __future__ import annotations

import http.server
import os
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metafit.data import ImageClasses

REPO = Path(__file__).resolve().parent.parent

if os.environ.get("METAFIT_TEST_TOYS") == "1":  # tests/test_extending.py: the contract suites with the toys registered
    import toys

    toys.register()
OMNIGLOT_DIR = Path(os.environ.get("METAFIT_DATA_DIR", REPO.parent / "shared" / "data" / "omniglot"))


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """Keep decoded datasets out of the user's cache and share them within the test session."""
    old = os.environ.get("METAFIT_CACHE_DIR")
    os.environ["METAFIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("metafit-cache"))
    yield
    if old is None:
        os.environ.pop("METAFIT_CACHE_DIR", None)
    else:
        os.environ["METAFIT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    if not (OMNIGLOT_DIR / "images_background.zip").is_file():
        pytest.skip(f"Omniglot zips not found in {OMNIGLOT_DIR} (set METAFIT_DATA_DIR)")
    return OMNIGLOT_DIR


def synthetic_classes(n_classes: int = 24, per_class: int = 12, size: int = 16, n_groups: int = 3,
                      seed: int = 0, noise: float = 0.15) -> ImageClasses:
    """Each class is a random binary pattern; its images are noisy copies (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n_classes, 1, 4, 4, generator=g) > 0.5).float()  # blocky patterns survive pooling
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
    flips = torch.rand(n_classes, per_class, 1, size, size, generator=g) < noise
    imgs = (protos[:, None] + flips.float()) % 2
    images = (imgs.flatten(0, 1) * 255).to(torch.uint8)
    return ImageClasses(
        images=images,
        class_start=torch.arange(n_classes) * per_class,
        class_count=torch.full((n_classes,), per_class),
        class_names=tuple(f"g{c % n_groups}/c{c:02d}" for c in range(n_classes)),
        class_group=torch.arange(n_classes) % n_groups,
        group_names=tuple(f"g{i}" for i in range(n_groups)),
    )


@pytest.fixture
def synthetic_splits() -> dict[str, ImageClasses]:
    data = synthetic_classes(n_classes=30)
    ids = torch.arange(data.n_classes)
    return {"train": data.subset(ids[:18]), "val": data.subset(ids[18:24]), "test": data.subset(ids[24:])}


def write_image_tree(root: Path, n_classes: int = 6, per_class: int = 5, size: int = 20, mode: str = "L",
                     groups: int = 0, seed: int = 0) -> Path:
    """A class-per-folder PNG tree (optionally root/<group>/<class>/<image>)."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        folder = root / (f"group{c % groups}" if groups else "") / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pattern = rng.random((size, size)) > 0.5
        for i in range(per_class):
            noisy = pattern ^ (rng.random((size, size)) < 0.1)
            arr = (noisy * 255).astype(np.uint8)
            img = Image.fromarray(arr, "L")
            if mode == "RGB":
                img = img.convert("RGB")
            img.save(folder / f"img{i:02d}.png")
    return root


def tiny_config(out_dir: Path, **sections) -> dict:
    """A fast config dict for synthetic 16x16 data (tests pass ``splits=`` to the trainer)."""
    cfg = {
        "seed": 0,
        "out_dir": str(out_dir),
        "data": {"name": "folder", "image_size": 16, "rotations": False},
        "task": {"n_ways": 5, "k_shots": 1, "n_queries": 3},
        "eval": {"n_ways": 5, "k_shots": 1, "n_queries": 3, "val_episodes": 10, "test_episodes": 20},
        "backbone": {"name": "conv4", "hidden_channels": 8},
        "train": {"meta_steps": 6, "eval_every": 3, "save_interval": 3, "log_every": 2,
                  "progress": False, "device": "cpu"},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return cfg


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving ``tmp_path/www``: yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
