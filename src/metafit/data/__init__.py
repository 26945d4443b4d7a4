"""Datasets, episode samplers and augmentation.

Data sources are a registry, like algorithms: ``DATASETS`` maps ``data.name`` to the source's
config class (one module each); ``data_config`` validates a ``data`` section into it, and the
config's ``load_splits()`` returns ``{"train", "val", "test"}`` collections. Adding a dataset is
one module plus one line here; the CLI, ``configs --fields``, checkpoints and the contract
tests read the registry.
"""

from __future__ import annotations

from typing import Any

from ..validation import named_section, parse_config
from .augment import ImageAugment, affine_views, random_affine, random_elastic
from .batches import ClassBatchSampler
from .cifar import CifarFSConfig, FC100Config
from .classes import ImageClasses
from .cub import CUBConfig
from .download import download_file
from .folder import FolderConfig, load_image_folder, read_image
from .images import ImageFormat, list_images, list_labelled_images
from .miniimagenet import MiniImageNetConfig
from .omniglot import PROTOCOLS, OmniglotConfig, find_omniglot, load_omniglot, omniglot_splits
from .runs import load_runs
from .sampler import Episode, EpisodeSampler, apply_symmetries, symmetry_count
from .safe_pickle import load_pickle
from .sinusoid import SinusoidConfig, SinusoidEpisode, SinusoidFamily, SinusoidSampler
from .source import DataSourceConfig, FileSourceConfig, ImageSourceConfig
from .store import FileImages
from .tieredimagenet import TieredImageNetConfig
from .tiny_imagenet import TinyImageNetConfig

__all__ = [
    "CifarFSConfig",
    "ClassBatchSampler",
    "CUBConfig",
    "DATASETS",
    "DataConfig",
    "DataSourceConfig",
    "Episode",
    "EpisodeSampler",
    "FC100Config",
    "FileImages",
    "FileSourceConfig",
    "FolderConfig",
    "ImageAugment",
    "ImageClasses",
    "ImageFormat",
    "ImageSourceConfig",
    "MiniImageNetConfig",
    "OmniglotConfig",
    "list_images",
    "list_labelled_images",
    "PROTOCOLS",
    "data_config",
    "download_file",
    "find_omniglot",
    "load_image_folder",
    "load_omniglot",
    "load_pickle",
    "load_runs",
    "load_splits",
    "migrate_legacy_data",
    "omniglot_splits",
    "random_affine",
    "random_elastic",
    "affine_views",
    "apply_symmetries",
    "symmetry_count",
    "read_image",
    "SinusoidConfig",
    "SinusoidEpisode",
    "SinusoidFamily",
    "SinusoidSampler",
    "TieredImageNetConfig",
    "TinyImageNetConfig",
]

#: data.name -> the source's config class (its ``load_splits()`` reads the data)
DATASETS: dict[str, type[DataSourceConfig]] = {
    "omniglot": OmniglotConfig,
    "folder": FolderConfig,
    "sinusoid": SinusoidConfig,
    "tiny_imagenet": TinyImageNetConfig,
    "miniimagenet": MiniImageNetConfig,
    "tieredimagenet": TieredImageNetConfig,
    "cifar_fs": CifarFSConfig,
    "fc100": FC100Config,
    "cub": CUBConfig,
}

#: every key of the flat data section of metafit 0.1 checkpoints (one config for all sources)
_LEGACY_KEYS = frozenset({
    "name", "root", "protocol", "image_size", "channels", "invert", "rotations", "val_fraction",
    "test_fraction", "split_seed", "download", "cache_dir", "amplitude_min", "amplitude_max", "phase_min",
    "phase_max", "x_min", "x_max",
})


def data_config(data: Any) -> DataSourceConfig:
    """Validate a data section (a mapping with ``name``, default ``omniglot``) into its source's
    config; unknown names and keys get one-line errors listing the valid ones."""
    if isinstance(data, DataSourceConfig):
        return data
    name, data = named_section(data, "data", DATASETS, "omniglot")
    return parse_config(DATASETS[name], data, "data")


def DataConfig(**fields: Any) -> DataSourceConfig:  # noqa: N802 (the name of the former single config class)
    """``data_config(fields)``: the data source config for ``name`` (default omniglot)."""
    return data_config(fields)


def migrate_legacy_data(data: Any) -> Any:
    """A data section stored by metafit 0.1 (one flat config whose keys applied to one source
    or another) with the keys its source does not have removed; other input is returned as is."""
    if not isinstance(data, dict) or not set(data) <= _LEGACY_KEYS:
        return data
    cls = DATASETS.get(data.get("name", "omniglot"))
    if cls is None:
        return data
    return {k: v for k, v in data.items() if k in cls.model_fields}


def load_splits(cfg: DataSourceConfig) -> dict[str, Any]:
    """Training, validation and test task sources of a data config ``cfg`` (a config, or a section
    :func:`data_config` validates): ``{"train", "val", "test"}`` image collections with disjoint
    classes, or (sinusoid) the task family itself — its splits differ by seed.

    >>> splits = load_splits({"name": "sinusoid", "amplitude_max": 2.0})
    >>> sorted(splits), splits["train"].amplitude
    (['test', 'train', 'val'], (0.1, 2.0))
    """
    return data_config(cfg).load_splits()
