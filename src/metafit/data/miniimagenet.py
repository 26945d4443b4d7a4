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

The helpers here (split class folders, uint8 array collections) are shared by the other
ImageNet-derived and array-based benchmark readers.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from ..errors import DataError
from .cache import cache_dir as default_cache_dir
from .cache import cached
from .classes import ImageClasses
from .folder import file_classes
from .images import IMAGE_SUFFIXES
from .safe_pickle import as_text, load_pickle, pickle_field
from .source import FileSourceConfig
from .split_files import find_root, published_split, split_classes
from .store import ImageFormat, stat_fingerprint

__all__ = [
    "LAYOUT",
    "MiniImageNetConfig",
    "SPLITS",
    "array_classes",
    "check_published_splits",
    "class_folders",
    "convert_arrays",
    "miniimagenet_layout",
]

log = logging.getLogger(__name__)

OWNER = "MiniImageNet"
ENV = "METAFIT_MINIIMAGENET"
SPLITS = ("train", "val", "test")
PICKLE_NAME = "mini-imagenet-cache-{}.pkl"
LAYOUT = ("mini-imagenet-cache-{train,val,test}.pkl; images/<wnid><8 digits>.jpg with train.csv, val.csv and "
          "test.csv (filename,label); train/<wnid>/<image>, val/<wnid>/<image> and test/<wnid>/<image>; or "
          "images/<wnid>/<image>")


# -- shared helpers -----------------------------------------------------------------------------
def class_folders(folder: Path, owner: str, layout: str) -> list[tuple[str, list[Path]]]:
    """``[(class folder name, sorted image files)]`` of ``folder/<class>/<image>``; a class
    folder without images, or a folder without class folders, is a one-line error."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"{owner}: {str(folder)!r} must hold one folder per class ({layout}); got none. "
            "Point data.root at the dataset folder."
        )
    out = []
    for d in classes:
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f"{owner}: class folder {str(d)!r} must hold image files ({', '.join(sorted(IMAGE_SUFFIXES))}; "
                f"{layout}); got none. Remove the folder or restore its images."
            )
        out.append((d.name, files))
    return out


def check_published_splits(found: dict[str, str], split: dict[str, list[str]], owner: str, layout: str,
                           fix: str) -> None:
    """Refuse a copy whose splits disagree with the published one: ``found`` maps each class to
    the split it was found in; a class of the published split found in another split is a
    one-line error (missing classes are :func:`split_classes`' to report)."""
    home = {c: s for s in SPLITS for c in split[s]}
    wrong = sorted((c, s) for c, s in found.items() if c in home and home[c] != s)
    if wrong:
        c, s = wrong[0]
        more = f" ({len(wrong)} classes in all)" if len(wrong) > 1 else ""
        raise DataError(
            f"{owner}: class {c} must be in {home[c]} as in the published split ({layout}); got it in {s}{more}. "
            f"{fix}"
        )


def convert_arrays(images: np.ndarray, fmt: ImageFormat, index: np.ndarray | None = None,
                   chunk: int = 2048) -> np.ndarray:
    """Decoded uint8 images ``[n, H, W, C]`` (C 1 or 3; or ``[n, H, W]``), or those at ``index``,
    in ``fmt``: uint8 ``[len, channels, size, size]``. Images already at the size and channels
    are only transposed (a chunk at a time); others go through
    :func:`~metafit.data.store.image_array` one by one."""
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    index = np.arange(n) if index is None else np.asarray(index, dtype=np.int64)
    out = np.empty((len(index), fmt.channels, fmt.size, fmt.size), dtype=np.uint8)
    if (h, w) == (fmt.size, fmt.size) and c == fmt.channels and not fmt.invert:
        for s in range(0, len(index), chunk):
            out[s:s + chunk] = images[index[s:s + chunk]].transpose(0, 3, 1, 2)
        return out
    for j, i in enumerate(index.tolist()):
        img = images[i]
        out[j] = fmt.array(Image.fromarray(np.ascontiguousarray(img[..., 0] if c == 1 else img)))
    return out


def array_classes(images: torch.Tensor, names: list[str], counts: list[int], groups: list[str]) -> ImageClasses:
    """An in-memory collection: ``images`` uint8 ``[N, C, H, W]`` holding class ``names[i]``'s
    ``counts[i]`` images one class after another, class ``i`` in group ``groups[i]``."""
    group_names = sorted(set(groups))
    index = {g: i for i, g in enumerate(group_names)}
    return ImageClasses(
        images=images,
        class_start=torch.tensor(np.cumsum([0] + list(counts[:-1])), dtype=torch.long),
        class_count=torch.tensor(counts, dtype=torch.long),
        class_names=tuple(names),
        class_group=torch.tensor([index[g] for g in groups], dtype=torch.long),
        group_names=tuple(group_names),
    )


def files_fingerprint(paths: list[Path]) -> str:
    """A cheap fingerprint of a few data files: resolved paths, sizes and modification times."""
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


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


def folder_classes(folder: Path, layout: str, split: dict[str, list[str]], fmt: ImageFormat, owner: str,
                   full_layout: str, groups: dict[str, str] | None = None) -> tuple[ImageClasses, str]:
    """Class folders (``split_folders``: ``train/``, ``val/``, ``test/``; ``tree``: ``images/``)
    as one collection of the published split's classes over a lazily decoded store, and a
    fingerprint of the source; classes in the wrong split folder are refused, classes outside
    the published split are left out. ``groups`` maps a class to its group (default: none)."""
    found: dict[str, tuple[str, list[Path]]] = {}
    if layout == "split_folders":
        _require_splits(folder, owner, full_layout)
        for s in SPLITS:
            for c, files in class_folders(folder / s, owner, full_layout):
                found[c] = (s, files)
        check_published_splits({c: s for c, (s, _) in found.items()}, split, owner, full_layout,
                               "This copy uses another split: move the class folders to their published split.")
    else:
        for c, files in class_folders(folder / "images", owner, full_layout):
            found[c] = ("", files)
    wanted = [c for s in SPLITS for c in split[s]]
    extra = sorted(set(found) - set(wanted))
    if extra:
        log.info("%s: %d class folders outside the published split are left out (%s...)", owner, len(extra),
                 ", ".join(extra[:3]))
    entries = [((groups or {}).get(c, ""), c, found[c][1]) for c in wanted if c in found]
    files = [f for _, _, fs in entries for f in fs]
    source = f"{layout}:{folder.resolve()}:" + stat_fingerprint(files, folder)
    return file_classes(entries, fmt), source


def _require_splits(folder: Path, owner: str, layout: str) -> None:
    for s in SPLITS:
        if not (folder / s).is_dir():
            raise DataError(
                f"{owner}: {str(folder / s)!r} must be a folder of class folders (train/, val/ and test/ "
                f"together; all layouts: {layout}); got no such folder. Complete the copy or point data.root at "
                "a complete one."
            )


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


class MiniImageNetConfig(FileSourceConfig):
    """``data.name: miniimagenet``: miniImageNet with Ravi & Larochelle's split."""

    summary = ("miniImageNet: 100 ImageNet classes, 600 colour images each, Ravi & Larochelle's 64/16/20 class "
               "split (csv, class-folder or pickle layout)")
    name: Literal["miniimagenet"] = "miniimagenet"
    root: str | None = Field(None, description="the folder of images/ and train/val/test.csv, of train/, val/, "
                             "test/ class folders, of images/<wnid>/, or of mini-imagenet-cache-*.pkl (default "
                             "METAFIT_MINIIMAGENET)")
    image_size: int = Field(84, ge=8, le=1024, description="images are brought to size x size")
    normalize: Literal["none", "dataset", "imagenet"] = Field(
        "dataset", description="input normalisation inside the model: none, dataset (per-channel mean/std of the "
        "training images, computed once and cached), imagenet (torchvision's ImageNet statistics)")

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
