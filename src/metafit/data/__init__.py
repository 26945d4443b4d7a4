"""Datasets, episode samplers and augmentation. ``load_splits`` turns a validated
:class:`DataConfig` into ``{"train", "val", "test"}`` collections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import DataError
from ..validation import ConfigModel
from .augment import random_affine
from .batches import ClassBatchSampler
from .classes import ImageClasses
from .download import download_file
from .folder import load_image_folder, read_image
from .images import ImageFormat, list_images, list_labelled_images
from .omniglot import PROTOCOLS, find_omniglot, load_omniglot, omniglot_splits
from .runs import load_runs
from .sampler import Episode, EpisodeSampler
from .sinusoid import SinusoidEpisode, SinusoidFamily, SinusoidSampler

__all__ = [
    "ClassBatchSampler",
    "DataConfig",
    "Episode",
    "EpisodeSampler",
    "ImageClasses",
    "ImageFormat",
    "list_images",
    "list_labelled_images",
    "PROTOCOLS",
    "download_file",
    "find_omniglot",
    "load_image_folder",
    "load_omniglot",
    "load_runs",
    "load_splits",
    "omniglot_splits",
    "random_affine",
    "read_image",
    "SinusoidEpisode",
    "SinusoidFamily",
    "SinusoidSampler",
]


class DataConfig(ConfigModel):
    name: Literal["omniglot", "folder", "sinusoid"] = Field(
        "omniglot", description="task source: omniglot, folder (your class-per-folder images), sinusoid (regression)"
    )
    root: str | None = Field(
        None, description="data folder (omniglot: the zips, default METAFIT_DATA_DIR; folder: the class tree)"
    )
    protocol: Literal["vinyals", "lake", "small1", "small2", "small"] = Field(
        "vinyals", description="omniglot class split (see metafit.data.omniglot)"
    )
    image_size: int = Field(28, ge=8, le=1024, description="images are resized to size x size")
    channels: Literal[1, 3] | None = Field(
        None, description="folder: 1 grayscale or 3 RGB; None infers it and refuses mixed modes"
    )
    invert: bool = Field(False, description="folder: invert intensities (dark ink on white -> high)")
    rotations: bool = Field(True, description="90-degree rotations as new classes (training; validation/test too unless eval.rotations is set)")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="folder without train/val/test: share of classes for validation")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="folder without train/val/test: share of classes for test")
    split_seed: int = Field(0, ge=0, description="folder: seed of the class split")
    download: bool = Field(False, description="omniglot: allow a checksum-verified download when missing")
    cache_dir: str | None = Field(None, description="decoded-image cache (default METAFIT_CACHE_DIR or ~/.cache/metafit)")
    amplitude_min: float = Field(0.1, description="sinusoid: smallest amplitude")
    amplitude_max: float = Field(5.0, description="sinusoid: largest amplitude")
    phase_min: float = Field(0.0, description="sinusoid: smallest phase (radians)")
    phase_max: float = Field(3.141592653589793, description="sinusoid: largest phase (radians)")
    x_min: float = Field(-5.0, description="sinusoid: smallest input")
    x_max: float = Field(5.0, description="sinusoid: largest input")

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        for lo, hi in (("amplitude_min", "amplitude_max"), ("phase_min", "phase_max"), ("x_min", "x_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} must not exceed {hi}")
        return self

    @property
    def in_channels(self) -> int:
        return 1 if self.name in ("omniglot", "sinusoid") else (self.channels or 1)

    @property
    def input_size(self) -> int:
        """Spatial size given to backbones (1 for vector inputs)."""
        return 1 if self.name == "sinusoid" else self.image_size

    @property
    def task_kind(self) -> str:
        return "regression" if self.name == "sinusoid" else "classification"

    def sinusoid_family(self) -> SinusoidFamily:
        return SinusoidFamily((self.amplitude_min, self.amplitude_max), (self.phase_min, self.phase_max),
                              (self.x_min, self.x_max))

    def image_format(self) -> ImageFormat | None:
        """How images are converted for a model trained on this data (None: vector inputs)."""
        if self.name == "sinusoid":
            return None
        return ImageFormat(self.image_size, self.in_channels, self.name == "omniglot" or self.invert)

    @property
    def out_features(self) -> int:
        return 1


def _folder_splits(cfg: DataConfig) -> dict[str, ImageClasses]:
    if cfg.root is None:
        raise DataError(
            "Config: data.root must be the folder of your class tree for data.name 'folder'; got None. "
            "Set data.root (or --set data.root=PATH)."
        )
    root = Path(cfg.root)
    load = lambda p: load_image_folder(p, cfg.image_size, cfg.channels, cfg.invert, cfg.cache_dir)  # noqa: E731
    if all((root / s).is_dir() for s in ("train", "val", "test")):
        return {s: load(root / s) for s in ("train", "val", "test")}
    data = load(root)
    order = torch.randperm(data.n_classes, generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = int(round(cfg.val_fraction * data.n_classes))
    n_test = int(round(cfg.test_fraction * data.n_classes))
    return {
        "train": data.subset(order[n_val + n_test:]),
        "val": data.subset(order[:n_val]),
        "test": data.subset(order[n_val:n_val + n_test]),
    }


def load_splits(cfg: DataConfig) -> dict[str, ImageClasses | SinusoidFamily]:
    """Training, validation and test task sources: image collections with disjoint classes, or
    (sinusoid) the task family itself — its splits differ by seed."""
    if cfg.name == "sinusoid":
        family = cfg.sinusoid_family()
        return {"train": family, "val": family, "test": family}
    if cfg.name == "omniglot":
        return omniglot_splits(cfg.protocol, cfg.root, cfg.image_size, cfg.cache_dir, cfg.download)
    return _folder_splits(cfg)
