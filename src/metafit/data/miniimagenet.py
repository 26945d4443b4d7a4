"""miniImageNet (Vinyals et al. 2016) as a few-shot benchmark: 100 ImageNet classes, 600 colour
images each, with Ravi & Larochelle's class split (``splits/miniimagenet.json``: 64 training, 16
validation and 20 test classes).

Layouts read (``data.root``, or the ``METAFIT_MINIIMAGENET`` environment variable), detected in
this order:

- the pickle layout: ``mini-imagenet-cache-train.pkl``, ``mini-imagenet-cache-val.pkl`` and
  ``mini-imagenet-cache-test.pkl`` (each a dict with ``image_data``, uint8 ``[N, 84, 84, 3]``,
  and ``class_dict``, wnid -> the indices of its images; the form learn2learn and others
  distribute). Read with metafit's restricted unpickler (:mod:`metafit.data.safe_pickle`); the
  images are decoded arrays, so storage is memory only;
- Ravi & Larochelle's layout: ``images/<wnid><8 digits>.jpg`` with ``train.csv``, ``val.csv``
  and ``test.csv`` (header ``filename,label``) beside ``images/``. The csv files define the
  split;
- class folders per split: ``train/<wnid>/<image>``, ``val/<wnid>/<image>``, ``test/<wnid>/<image>``;
- one class-folder tree: ``images/<wnid>/<image>``, cut by the published split.

Folder and pickle copies are checked against the published split: every class must be there,
and in its published split. Image files are decoded once into memory (and cached), or on demand
by worker processes (``data.storage: lazy``).

"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..errors import DataError
from .cache import cache_dir as default_cache_dir
from .cache import cached
from .classes import ImageClasses
from .folder import file_classes
from .safe_pickle import as_text, load_pickle, pickle_field
from .source import NaturalImageSourceConfig
from .split_files import (SPLITS, array_classes, check_published_splits, convert_arrays, files_fingerprint,
                          find_root, folder_classes, published_split, split_classes)
from .store import ImageFormat, stat_fingerprint

__all__ = ["LAYOUT", "MiniImageNetConfig", "miniimagenet_layout"]

log = logging.getLogger(__name__)

OWNER = "MiniImageNet"
ENV = "METAFIT_MINIIMAGENET"
PICKLE_NAME = "mini-imagenet-cache-{}.pkl"
LAYOUT = ("mini-imagenet-cache-{train,val,test}.pkl; images/<wnid><8 digits>.jpg with train.csv, val.csv and "
          "test.csv (filename,label); train/<wnid>/<image>, val/<wnid>/<image> and test/<wnid>/<image>; or "
          "images/<wnid>/<image>")


# -- layouts ------------------------------------------------------------------------------------
def miniimagenet_layout(path: Path) -> tuple[str, Path]:
    """``(layout, folder)``: which layout ``path`` holds (``pickle``, ``csv``, ``split_folders``
    or ``tree``) and the folder that holds it (``path``, or the folder of a pickle or csv file
    given as root)."""
    if path.is_file():
        if path.name in {PICKLE_NAME.format(s) for s in SPLITS} | {f"{s}.csv" for s in SPLITS}:
            path = path.parent
        else:
            raise DataError(
                f"{OWNER}: data.root must be the dataset folder ({LAYOUT}); got the file {str(path)!r}. "
                "Point data.root at the folder that holds it."
            )
    if any((path / PICKLE_NAME.format(s)).is_file() for s in SPLITS):
        return "pickle", path
    if any((path / f"{s}.csv").is_file() for s in SPLITS):
        return "csv", path
    if any((path / s).is_dir() for s in SPLITS):
        return "split_folders", path
    images = path / "images"
    if images.is_dir():
        if any(d.is_dir() for d in images.iterdir()):
            return "tree", path
        raise DataError(
            f"{OWNER}: {str(path)!r} must hold train.csv, val.csv and test.csv beside images/ (Ravi & "
            f"Larochelle's layout; all layouts: {LAYOUT}); got images/ without the csv files. Put the split's "
            "csv files next to images/."
        )
    raise DataError(
        f"{OWNER}: data.root must hold miniImageNet as {LAYOUT}; got none of these in {str(path)!r}. "
        f"Point data.root (or {ENV}) at the folder that holds them."
    )


def _require(paths: list[Path], what: str) -> None:
    for p in paths:
        if not p.exists():
            raise DataError(
                f"{OWNER}: {str(p)!r} must exist ({what}; all layouts: {LAYOUT}); got no such file or folder. "
                "Complete the copy or point data.root at a complete one."
            )


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header = [c.strip() for c in rows[0]] if rows else []
    if header != ["filename", "label"]:
        raise DataError(
            f"{OWNER}: {str(path)!r} must start with the header 'filename,label' (Ravi & Larochelle's csv); got "
            f"{','.join(header)!r}. Use the split's published csv files."
        )
    out = []
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != 2:
            raise DataError(
                f"{OWNER}: line {i} of {str(path)!r} must be 'filename,label'; got {','.join(r)!r}. "
                "Use the split's published csv files."
            )
        out.append((r[0].strip(), r[1].strip()))
    return out


def csv_classes(folder: Path, fmt: ImageFormat) -> tuple[ImageClasses, dict[str, list[str]], str]:
    """Ravi & Larochelle's layout: all classes over a lazily decoded store, the split the csv
    files define, and a fingerprint of the source."""
    csvs = [folder / f"{s}.csv" for s in SPLITS]
    images = folder / "images"
    _require(csvs + [images], "Ravi & Larochelle's layout is images/ with train.csv, val.csv and test.csv")
    if not images.is_dir():
        raise DataError(
            f"{OWNER}: {str(images)!r} must be the folder of the images the csv files list (Ravi & Larochelle's "
            f"layout); got a file. Put the images in images/ beside the csv files."
        )
    present = set(os.listdir(images))
    entries: list[tuple[str, str, list[Path]]] = []
    split: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for s, path in zip(SPLITS, csvs):
        per_class: dict[str, list[Path]] = {}
        for name, label in _read_csv(path):
            file = images / name
            if name not in present:
                file = images / label / name  # copies that keep the csv files but sort images by class
                if not file.is_file():
                    raise DataError(
                        f"{OWNER}: {str(images / name)!r} (listed in {s}.csv) must exist (Ravi & Larochelle's layout: "
                        f"images/<wnid><8 digits>.jpg beside the csv files); got no such file. Restore the image or "
                        "use the csv files of this copy."
                    )
            if seen.setdefault(label, s) != s:
                raise DataError(
                    f"{OWNER}: class {label} must be in one split's csv file; got it in {seen[label]}.csv and "
                    f"{s}.csv. Use the published csv files."
                )
            per_class.setdefault(label, []).append(file)
        split[s] = list(per_class)
        entries += [("", c, files) for c, files in per_class.items()]
    published = published_split("miniimagenet")["splits"]
    if any(set(split[s]) != set(published[s]) for s in SPLITS):
        log.warning("%s: the csv files of %s define another split than Ravi & Larochelle's (%s classes); they are "
                    "used as they are", OWNER, folder, "/".join(str(len(split[s])) for s in SPLITS))
    files = [f for _, _, fs in entries for f in fs]
    source = f"csv:{files_fingerprint(csvs)}:" + stat_fingerprint(files, folder)
    return file_classes(entries, fmt), split, source


def pickle_classes(folder: Path, fmt: ImageFormat, split: dict[str, list[str]], cache: str | None) -> ImageClasses:
    """The pickle layout as one in-memory collection (classes checked against the published
    split); converted images are cached when they had to be resized."""
    paths = [folder / PICKLE_NAME.format(s) for s in SPLITS]
    _require(paths, "the pickle layout is mini-imagenet-cache-{train,val,test}.pkl together")

    def build() -> ImageClasses:
        parts, names, counts, found = [], [], [], {}
        for s, path in zip(SPLITS, paths):
            images, classes = _read_cache_pickle(path)
            for c, idx in classes:
                if as_text(c) in found:
                    raise DataError(
                        f"{OWNER}: class {as_text(c)} must be in one of the pickles; got it in "
                        f"{PICKLE_NAME.format(found[as_text(c)])} and {path.name}. Use the published pickles."
                    )
                found[as_text(c)] = s
                names.append(as_text(c))
                counts.append(len(idx))
            order = np.concatenate([idx for _, idx in classes]) if classes else np.zeros(0, dtype=np.int64)
            parts.append(convert_arrays(images, fmt, order))
            del images
        check_published_splits(found, split, OWNER, LAYOUT,
                               "These pickles use another split: use the published mini-imagenet-cache files.")
        return array_classes(torch.from_numpy(np.concatenate(parts)), names, counts, [""] * len(names))

    if fmt.size == 84 and fmt.channels == 3 and not fmt.invert:
        return build()  # nothing to convert: reading the pickles is as fast as reading a cache
    key = f"pickle:{files_fingerprint(paths)}:{fmt.size}:{fmt.channels}:{fmt.invert}:{fmt.fit}"
    return cached(f"miniimagenet-pkl-{fmt.size}", key, build, default_cache_dir(cache))


def _read_cache_pickle(path: Path) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    data = load_pickle(path)
    try:
        images = np.asarray(pickle_field(data, "image_data"))
        class_dict = pickle_field(data, "class_dict")
    except KeyError as err:
        raise DataError(
            f"{OWNER}: {str(path)!r} must hold a dict with 'image_data' and 'class_dict' (the pickle layout); got "
            f"{type(data).__name__} without {str(err)}. Use the published mini-imagenet-cache files."
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{OWNER}: 'image_data' of {str(path)!r} must be a uint8 array [N, H, W, 3]; got {images.dtype} "
            f"{tuple(images.shape)}. Use the published mini-imagenet-cache files."
        )
    if not isinstance(class_dict, dict):
        raise DataError(
            f"{OWNER}: 'class_dict' of {str(path)!r} must be a dict wnid -> image indices; got "
            f"{type(class_dict).__name__}. Use the published mini-imagenet-cache files."
        )
    classes = []
    for c, idx in class_dict.items():
        idx = np.asarray(list(idx), dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(images)):
            raise DataError(
                f"{OWNER}: the indices of class {as_text(c)} in {str(path)!r} must lie in [0, {len(images)}); got "
                f"{int(idx.min())}..{int(idx.max())}. Use the published mini-imagenet-cache files."
            )
        classes.append((as_text(c), idx))
    return images, classes


class MiniImageNetConfig(NaturalImageSourceConfig):
    """``data.name: miniimagenet``: miniImageNet with Ravi & Larochelle's split."""

    summary = ("miniImageNet: 100 ImageNet classes, 600 colour images each, Ravi & Larochelle's 64/16/20 class "
               "split (csv, class-folder or pickle layout)")
    name: Literal["miniimagenet"] = "miniimagenet"
    root: str | None = Field(None, description="the folder of images/ and train/val/test.csv, of train/, val/, "
                             "test/ class folders, of images/<wnid>/, or of mini-imagenet-cache-*.pkl (default "
                             "METAFIT_MINIIMAGENET)")

    def load_splits(self) -> dict[str, ImageClasses]:
        layout, folder = miniimagenet_layout(find_root(self.root, ENV, OWNER, LAYOUT))
        fmt = self.image_format()
        split = published_split("miniimagenet")["splits"]
        if layout == "pickle":
            if self.storage == "lazy":
                raise DataError(
                    f"{OWNER}: data.storage must be 'memory' or 'auto' for the pickle layout "
                    "(mini-imagenet-cache-*.pkl holds decoded arrays, not image files); got 'lazy'. Set "
                    "data.storage: memory, or use a layout of image files for lazy decoding."
                )
            return split_classes(pickle_classes(folder, fmt, split, self.cache_dir), split, OWNER, LAYOUT)
        if layout == "csv":
            data, split, source = csv_classes(folder, fmt)
        else:
            data, source = folder_classes(folder, layout, split, fmt, OWNER, LAYOUT)
        data = self.store_classes(data, f"miniimagenet:{source}", "miniimagenet")
        return split_classes(data, split, OWNER, LAYOUT)
