"""What every data source shares: its config base classes and the storage, statistics and
split helpers. A data source is one module with one config class (a subclass of
:class:`DataSourceConfig` whose ``name`` is a ``Literal``) registered in ``DATASETS``
(``metafit.data``); the config validates its own fields and ``load_splits()`` returns the
training, validation and test collections. The CLI, ``configs --fields``, checkpoints and the
contract tests read the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..errors import DataError
from ..validation import ConfigModel
from .cache import atomic_write_bytes, cache_dir as default_cache_dir, cached
from .classes import ImageClasses
from .store import FileImages, ImageFormat, decode_all

__all__ = [
    "DataSourceConfig",
    "FileSourceConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSourceConfig",
    "NaturalImageSourceConfig",
    "channel_statistics",
    "memory_budget_bytes",
    "split_by_fractions",
]

log = logging.getLogger(__name__)

#: the ImageNet statistics that torchvision and timm models are trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataSourceConfig(ConfigModel):
    """Base of data-source configs: subclasses set ``name`` to a ``Literal`` and implement the
    methods below."""

    name: str
    #: "classification" (image tasks) or "regression"
    task_kind: ClassVar[str] = "classification"
    #: one line for ``metafit configs``
    summary: ClassVar[str] = ""

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def input_size(self) -> int:
        """Spatial size given to backbones (1 for vector inputs)."""
        return 1

    @property
    def out_features(self) -> int:
        return 1

    def image_format(self) -> ImageFormat | None:
        """How users' images are converted for a model trained on this data (None: vectors)."""
        return None

    def input_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-channel (mean, std) the model normalises its input with (None: none)."""
        return None

    def load_splits(self) -> dict[str, Any]:
        """``{"train", "val", "test"}`` task sources."""
        raise NotImplementedError


class ImageSourceConfig(DataSourceConfig):
    """Base of image sources: where the data is, the image size, rotations, the decoded-image
    cache and input normalisation."""

    root: str | None = Field(None, description="data folder or archive (default: the source's environment variable)")
    image_size: int = Field(84, ge=8, le=1024, description="images are brought to size x size")
    rotations: bool = Field(False, description="90-degree rotations as new classes (training; validation/test "
                            "too unless eval.rotations is set)")
    reflections: bool = Field(False, description="mirror images as new classes in training episodes and "
                              "batches (x2 classes; x8 with rotations, the square's 8 symmetries); validation and "
                              "test tasks are never mirrored")
    cache_dir: str | None = Field(None, description="decoded-image cache (default METAFIT_CACHE_DIR or ~/.cache/metafit)")
    normalize: Literal["none", "dataset", "imagenet"] = Field(
        "none", description="input normalisation inside the model: none, dataset (per-channel mean/std of the "
        "training images, computed once and cached), imagenet (torchvision's ImageNet statistics)")
    mean: tuple[float, ...] | None = Field(
        None, description="normalize=dataset: per-channel mean (None: filled in from the training images)")
    std: tuple[float, ...] | None = Field(
        None, description="normalize=dataset: per-channel standard deviation (None: filled in)")

    @model_validator(mode="after")
    def _statistics(self):
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, self.in_channels):
                raise ValueError(f"{name} must have one value per channel ({self.in_channels})")
        if self.std is not None and any(not (s > 0) for s in self.std):
            raise ValueError("std must be positive")
        return self

    @property
    def input_size(self) -> int:
        return self.image_size

    @property
    def invert_images(self) -> bool:
        return False

    @property
    def fit_mode(self) -> str:
        return "squash"

    def image_format(self) -> ImageFormat:
        return ImageFormat(self.image_size, self.in_channels, self.invert_images, self.fit_mode)

    def input_statistics(self):
        if self.normalize == "imagenet":
            if self.in_channels != 3:
                return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
            return IMAGENET_MEAN, IMAGENET_STD
        if self.normalize == "dataset" and self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        return None

    def needs_statistics(self) -> bool:
        """Whether the trainer must fill in ``mean``/``std`` from the training images."""
        return self.normalize == "dataset" and (self.mean is None or self.std is None)

    def with_statistics(self, train: ImageClasses) -> "ImageSourceConfig":
        """This config with ``mean``/``std`` of ``train``'s images filled in (cached by content)."""
        if not self.needs_statistics():
            return self
        mean, std = channel_statistics(train, default_cache_dir(self.cache_dir))
        return self.model_copy(update={"mean": mean, "std": std})


class FileSourceConfig(ImageSourceConfig):
    """Base of sources read from image files: decoded into memory once (and cached), or decoded
    on demand by worker processes."""

    fit: Literal["squash", "crop"] = Field(
        "crop", description="crop: shorter side to image_size, then the centre square (no distortion; small images "
        "are upscaled); squash: resize to image_size x image_size")
    storage: Literal["auto", "memory", "lazy"] = Field(
        "auto", description="memory: decode every image once into RAM (cached as uint8 arrays); lazy: decode on "
        "demand in worker processes; auto: memory if the decoded images fit data.memory_budget_gb")
    memory_budget_gb: float | None = Field(
        None, gt=0.0, le=1e6, description="auto storage: largest decoded size kept in memory (None: a quarter of "
        "this machine's RAM)")
    workers: int | None = Field(
        None, ge=0, le=64, description="processes decoding images (lazy storage, and the first decode into the "
        "cache; None: one per core beyond the first, at most 4; 0: in the training process)")

    @property
    def fit_mode(self) -> str:
        return self.fit

    def store_classes(self, classes: ImageClasses, key: str, cache_name: str) -> ImageClasses:
        """``classes`` (over a :class:`FileImages` store) in the configured storage: kept lazy, or
        decoded into memory through the cache (``key`` fingerprints the source; ``cache_name`` names
        the cache file, suffixed with the image size). Collections already in memory are returned as is."""
        store = classes.images
        if not isinstance(store, FileImages):
            return classes
        mode = self.storage
        if mode == "auto":
            budget = memory_budget_bytes(self.memory_budget_gb)
            mode = "memory" if store.nbytes <= budget else "lazy"
            log.info("data.storage auto: %s (%.2f GB decoded, budget %.2f GB)", mode, store.nbytes / 1e9, budget / 1e9)
        if mode == "lazy":
            return classes
        from .loader import default_workers  # noqa: PLC0415

        workers = default_workers() if self.workers is None else self.workers

        def build() -> ImageClasses:
            return ImageClasses(decode_all(store, workers), classes.class_start, classes.class_count,
                                classes.class_names, classes.class_group, classes.group_names)

        fmt = store.fmt
        full_key = f"{key}:{fmt.size}:{fmt.channels}:{fmt.invert}:{fmt.fit}"
        return cached(f"{cache_name}-{fmt.size}", full_key, build, default_cache_dir(self.cache_dir))


class NaturalImageSourceConfig(FileSourceConfig):
    """Base of the natural-image benchmarks: 84 pixels and input normalisation with the training
    images' statistics by default."""

    image_size: int = Field(84, ge=8, le=1024, description="images are brought to size x size")
    normalize: Literal["none", "dataset", "imagenet"] = Field(
        "dataset", description="input normalisation inside the model: none, dataset (per-channel mean/std of the "
        "training images, computed once and cached), imagenet (torchvision's ImageNet statistics)")


def memory_budget_bytes(gb: float | None) -> int:
    """``gb`` gigabytes, or (None) a quarter of this machine's physical memory (at least 1 GB)."""
    if gb is not None:
        return int(gb * 1e9)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 * 10**9
    return max(10**9, total // 4)


def channel_statistics(data: ImageClasses, cache: os.PathLike | None = None,
                       max_images: int = 20_000, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``data``'s images in [0, 1] (all of them, or a
    seeded sample of ``max_images``), in float64; cached in ``cache`` by the collection's
    class names and counts and its image format."""
    idx = data.image_indices()
    if len(idx) > max_images:
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_images]]
        idx = idx.sort().values
    key = None
    path = None
    if cache is not None:
        store = data.images
        fmt = store.fmt.to_dict() if isinstance(store, FileImages) else list(data.image_shape)
        ident = json.dumps([list(data.class_names), data.class_count.tolist(), fmt, len(idx), seed])
        key = hashlib.sha256(ident.encode()).hexdigest()[:20]
        path = os.path.join(cache, f"stats-{key}.json")
        try:
            with open(path) as f:
                got = json.load(f)
            return tuple(got["mean"]), tuple(got["std"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # damaged: recompute
            pass
    total = None
    total_sq = None
    count = 0
    for chunk in idx.split(2048):
        x = data.fetch(chunk).double().div_(255.0)  # [n, C, H, W]
        s = x.sum((0, 2, 3))
        sq = x.pow(2).sum((0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if not count:
        raise DataError("Data: statistics need at least one training image; got none. Check the training split.")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    out = tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
    if path is not None:
        try:
            blob = json.dumps({"mean": out[0], "std": out[1]}).encode()
            atomic_write_bytes(Path(path), lambda f: f.write(blob))
        except OSError:
            pass  # a read-only cache only costs a recomputation
    return out


def split_by_fractions(data: ImageClasses, val_fraction: float, test_fraction: float,
                       seed: int) -> dict[str, ImageClasses]:
    """Disjoint class splits of ``data``: a seeded permutation of its classes, the first
    ``val_fraction`` for validation, the next ``test_fraction`` for test, the rest for training."""
    order = torch.randperm(data.n_classes, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * data.n_classes))
    n_test = int(round(test_fraction * data.n_classes))
    return {
        "train": data.subset(order[n_val + n_test:]),
        "val": data.subset(order[:n_val]),
        "test": data.subset(order[n_val:n_val + n_test]),
    }
