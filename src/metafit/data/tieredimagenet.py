"""tieredImageNet (Ren et al. 2018) as a few-shot benchmark: 608 ImageNet classes in 34
higher-level categories, split by category (``splits/tieredimagenet.json``: 351 training classes
in 20 categories, 97 validation classes in 6, 160 test classes in 8, and each class's category).
Categories are the collection's groups (``within_group`` episodes draw a task's classes from one
category).

Layouts read (``data.root``, or the ``METAFIT_TIEREDIMAGENET`` environment variable), detected in
this order:

- Ren et al.'s pickles: ``{train,val,test}_images_png.pkl``, each a list of PNG-encoded images
  (``bytes``, or uint8 arrays as ``cv2.imencode`` returns them), with ``{split}_labels.pkl``, a
  dict with ``label_specific`` (each image's class index), ``label_specific_str`` (the class
  wnids), and ``label_general`` / ``label_general_str`` (each image's category index, the
  category names; optional: the published categories are used when absent). Keys of
  Python-2 pickles loaded as ``bytes`` are accepted. Read with metafit's restricted unpickler
  (:mod:`metafit.data.safe_pickle`) and decoded once into memory, in chunks by worker processes,
  and cached: memory storage only;
- class folders per split: ``train/<wnid>/<image>``, ``val/<wnid>/<image>``, ``test/<wnid>/<image>``
  (ImageNet's images), decoded once into memory (and cached), or on demand by worker processes
  (``data.storage: lazy``).

Both layouts are checked against the published split: every class must be there, and in its
published split.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import UnidentifiedImageError
from pydantic import Field

from ..errors import DataError
from .cache import cache_dir as default_cache_dir
from .cache import cached
from .classes import ImageClasses
from .loader import decode_batches, default_workers
from .safe_pickle import as_text, load_pickle, pickle_field
from .source import NaturalImageSourceConfig
from .split_files import (SPLITS, array_classes, check_published_splits, convert_arrays, files_fingerprint,
                          find_root, folder_classes, published_split, split_classes)
from .decode import open_image
from .store import ImageFormat, ImageStore

__all__ = ["EncodedImages", "LAYOUT", "TieredImageNetConfig", "tiered_pickle_classes"]

OWNER = "TieredImageNet"
ENV = "METAFIT_TIEREDIMAGENET"
IMAGES_NAME = "{}_images_png.pkl"
LABELS_NAME = "{}_labels.pkl"
LAYOUT = ("Ren et al.'s {train,val,test}_images_png.pkl with {train,val,test}_labels.pkl, or train/<wnid>/<image>, "
          "val/<wnid>/<image> and test/<wnid>/<image>")


class EncodedImages(ImageStore):
    """Encoded images (PNG or JPEG bytes, or uint8 arrays of them) decoded on demand into
    ``fmt``: the store interface :func:`~metafit.data.loader.decode_batches` reads, so decoding
    runs in worker processes. ``where`` names the source in errors."""

    def __init__(self, items: list[Any], fmt: ImageFormat, where: str) -> None:
        self.items = items
        self.fmt = fmt
        self.where = where

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> np.ndarray:
        item = self.items[int(i)]
        try:
            data = bytes(np.asarray(item, dtype=np.uint8).reshape(-1)) if isinstance(item, np.ndarray) else bytes(item)
            with open_image(io.BytesIO(data), f"image {int(i)} of {self.where}") as im:
                return self.fmt.array(im)
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, TypeError) as err:
            raise DataError(
                f"{OWNER}: image {int(i)} of {self.where} must be an encoded image (PNG bytes); got "
                f"a {type(item).__name__} that does not decode ({err}). Use the published pickles."
            ) from err


def _names(value: Any, key: str, path: Path) -> dict[int, str]:
    """Index -> name from a label-name list/array, or a dict in either direction."""
    if isinstance(value, dict):
        items = list(value.items())
        if all(isinstance(k, (int, np.integer)) for k, _ in items):
            return {int(k): as_text(v) for k, v in items}
        if all(isinstance(v, (int, np.integer)) for _, v in items):
            return {int(v): as_text(k) for k, v in items}
    elif isinstance(value, (list, tuple, np.ndarray)):
        return {i: as_text(v) for i, v in enumerate(value)}
    raise DataError(
        f"{OWNER}: {key!r} of {str(path)!r} must be a list of names; got {type(value).__name__}. Use the published "
        "labels pickles."
    )


def _read_labels(path: Path) -> tuple[np.ndarray, dict[int, str], np.ndarray | None, dict[int, str] | None]:
    data = load_pickle(path)
    try:
        specific = np.asarray(pickle_field(data, "label_specific")).astype(np.int64).reshape(-1)
        specific_str = _names(pickle_field(data, "label_specific_str"), "label_specific_str", path)
    except KeyError as err:
        raise DataError(
            f"{OWNER}: {str(path)!r} must be a dict with 'label_specific' and 'label_specific_str' (Ren et al.'s "
            f"labels pickle); got {type(data).__name__} without {str(err)}. Use the published labels pickles."
        ) from None
    except (TypeError, ValueError) as err:
        raise DataError(
            f"{OWNER}: 'label_specific' of {str(path)!r} must be one class index per image; got an unreadable "
            f"value ({err}). Use the published labels pickles."
        ) from err
    general = pickle_field(data, "label_general", None)
    general_str = pickle_field(data, "label_general_str", None)
    if general is not None and general_str is not None:
        general = np.asarray(general).astype(np.int64).reshape(-1)
        if len(general) != len(specific):
            general = None
        else:
            general_str = _names(general_str, "label_general_str", path)
    if general is None or general_str is None:
        general, general_str = None, None
    missing = sorted(set(np.unique(specific).tolist()) - set(specific_str))
    if missing:
        raise DataError(
            f"{OWNER}: every class index in 'label_specific' of {str(path)!r} must have a name in "
            f"'label_specific_str'; got index {missing[0]} without one. Use the published labels pickles."
        )
    return specific, specific_str, general, general_str


def _read_images(path: Path) -> Any:
    data = load_pickle(path)
    if isinstance(data, dict):
        data = pickle_field(data, "images", data)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4:
        return data  # already decoded: [N, H, W, C]
    if isinstance(data, (list, tuple)) or (isinstance(data, np.ndarray) and data.ndim == 1):
        return data
    raise DataError(
        f"{OWNER}: {str(path)!r} must hold a list of PNG-encoded images (Ren et al.'s *_images_png.pkl); got "
        f"{type(data).__name__}. Use the published pickles."
    )


def tiered_pickle_classes(folder: Path, fmt: ImageFormat, split: dict[str, list[str]],
                          categories: dict[str, str], workers: int, cache: str | None) -> ImageClasses:
    """Ren et al.'s pickles as one in-memory collection (classes in label order per split,
    checked against the published split; groups from ``label_general_str``, else the
    published ``categories``), decoded by ``workers`` processes and cached."""
    images_paths = [folder / IMAGES_NAME.format(s) for s in SPLITS]
    labels_paths = [folder / LABELS_NAME.format(s) for s in SPLITS]
    for p in images_paths + labels_paths:
        if not p.is_file():
            raise DataError(
                f"{OWNER}: {str(p)!r} must exist (Ren et al.'s layout is {{train,val,test}}_images_png.pkl with "
                f"{{train,val,test}}_labels.pkl in one folder; all layouts: {LAYOUT}); got no such file. Put the "
                "six files in one folder."
            )

    def build() -> ImageClasses:
        labels = [_read_labels(p) for p in labels_paths]
        out = torch.empty((sum(len(lab[0]) for lab in labels), fmt.channels, fmt.size, fmt.size), dtype=torch.uint8)
        names, counts, groups, found = [], [], [], {}
        pos = 0
        for s, path, (specific, specific_str, general, general_str) in zip(SPLITS, images_paths, labels):
            items = _read_images(path)
            if len(items) != len(specific):
                raise DataError(
                    f"{OWNER}: {str(path)!r} must hold one image per label of {LABELS_NAME.format(s)}; got "
                    f"{len(items)} images for {len(specific)} labels. Use matching published files."
                )
            order = np.argsort(specific, kind="stable")
            ids, first, count = np.unique(specific[order], return_index=True, return_counts=True)
            for c, f, n in zip(ids.tolist(), first.tolist(), count.tolist()):
                wnid = specific_str[c]
                if wnid in found:
                    raise DataError(
                        f"{OWNER}: class {wnid} must be in one split's pickles; got it in {found[wnid]} and {s}. "
                        "Use Ren et al.'s published files."
                    )
                names.append(wnid)
                counts.append(n)
                found[wnid] = s
                g = general[order[f]] if general is not None else None
                groups.append(general_str.get(int(g), str(g)) if g is not None else categories.get(wnid, ""))
            if isinstance(items, np.ndarray) and items.ndim == 4:
                out[pos:pos + len(order)] = torch.from_numpy(convert_arrays(items, fmt, order))
            else:
                store = EncodedImages([items[i] for i in order.tolist()], fmt, repr(str(path)))
                del items
                for start, block in decode_batches(store, workers, batch_size=512):
                    out[pos + start:pos + start + len(block)] = block
            pos += len(order)
        check_published_splits(found, split, OWNER, LAYOUT,
                               "These pickles use another split: use Ren et al.'s published files.")
        return array_classes(out, names, counts, groups)

    fit = "" if fmt.fit == "squash" else f":{fmt.fit}"
    key = f"pickle:{files_fingerprint(images_paths + labels_paths)}:{fmt.size}:{fmt.channels}:{fmt.invert}{fit}"
    return cached(f"tieredimagenet-pkl-{fmt.size}", key, build, default_cache_dir(cache))


def tieredimagenet_layout(path: Path) -> tuple[str, Path]:
    """``(layout, folder)``: ``pickle`` or ``split_folders``, and the folder holding it (a pickle
    given as root stands for its folder)."""
    names = {IMAGES_NAME.format(s) for s in SPLITS} | {LABELS_NAME.format(s) for s in SPLITS}
    if path.is_file():
        if path.name not in names:
            raise DataError(
                f"{OWNER}: data.root must be the dataset folder ({LAYOUT}); got the file {str(path)!r}. Point "
                "data.root at the folder that holds it."
            )
        path = path.parent
    if any((path / n).is_file() for n in names):
        return "pickle", path
    if any((path / s).is_dir() for s in SPLITS):
        return "split_folders", path
    raise DataError(
        f"{OWNER}: data.root must hold tieredImageNet as {LAYOUT}; got none of these in {str(path)!r}. Point "
        f"data.root (or {ENV}) at the folder that holds them."
    )


class TieredImageNetConfig(NaturalImageSourceConfig):
    """``data.name: tieredimagenet``: tieredImageNet with Ren et al.'s category split."""

    summary = ("tieredImageNet: 608 ImageNet classes in 34 categories, Ren et al.'s 351/97/160 class split by "
               "category (pickle or class-folder layout); categories are groups")
    name: Literal["tieredimagenet"] = "tieredimagenet"
    root: str | None = Field(None, description="the folder of {train,val,test}_images_png.pkl and *_labels.pkl, or "
                             "of train/, val/, test/ class folders (default METAFIT_TIEREDIMAGENET)")

    def load_splits(self) -> dict[str, ImageClasses]:
        layout, folder = tieredimagenet_layout(find_root(self.root, ENV, OWNER, LAYOUT))
        published = published_split("tieredimagenet")
        split, categories = published["splits"], published["categories"]
        fmt = self.image_format()
        if layout == "pickle":
            if self.storage == "lazy":
                raise DataError(
                    f"{OWNER}: data.storage must be 'memory' or 'auto' for Ren et al.'s pickle layout (the images "
                    "are inside *_images_png.pkl, not files); got 'lazy'. Set data.storage: memory, or use the "
                    "train/val/test class-folder layout for lazy decoding."
                )
            workers = default_workers() if self.workers is None else self.workers
            data = tiered_pickle_classes(folder, fmt, split, categories, workers, self.cache_dir)
            return split_classes(data, split, OWNER, LAYOUT)
        data, source = folder_classes(folder, layout, split, fmt, OWNER, LAYOUT, groups=categories)
        data = self.store_classes(data, f"tieredimagenet:{source}", "tieredimagenet")
        return split_classes(data, split, OWNER, LAYOUT)
