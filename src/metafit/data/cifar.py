"""The CIFAR-100 few-shot benchmarks: CIFAR-FS (Bertinetto et al. 2019; random 64/16/20 class
split, ``splits/cifarfs.json``) and FC100 (Oreshkin et al. 2018; 60/20/20 classes split by
superclass, ``splits/fc100.json``). Both take CIFAR-100's 32x32 colour images, training and test
images together (600 per class), select classes by fine label name, and use CIFAR-100's 20
coarse labels (superclasses) as groups (``within_group`` episodes).

Layouts read (``data.root``, or the ``METAFIT_CIFAR100`` environment variable): CIFAR-100's
python version, ``cifar-100-python.tar.gz`` (the archive itself, read without extracting, or the
folder holding it), or the extracted ``cifar-100-python/`` folder with ``train``, ``test`` and
``meta`` (or the folder holding it). The batches are Python-2 pickles, read with metafit's
restricted unpickler (:mod:`metafit.data.safe_pickle`). The images are arrays, so they are kept
in memory; resized copies (``image_size`` other than 32) are cached. With ``data.download: true``
the archive is downloaded (md5-verified) into the cache when nothing is found.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from ..errors import DataError
from .cache import cache_dir as default_cache_dir
from .cache import cached
from .classes import ImageClasses
from .download import download_file
from .safe_pickle import as_text, load_pickle, pickle_field
from .source import ImageSourceConfig
from .split_files import array_classes, convert_arrays, files_fingerprint, find_root, published_split, split_classes
from .store import ImageFormat

__all__ = ["CIFAR100_URL", "CifarFSConfig", "FC100Config", "cifar100_classes"]

CIFAR100_URL = ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85")
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
PARTS = ("train", "test", "meta")
OWNER = "CIFAR-100"
ENV = "METAFIT_CIFAR100"
LAYOUT = ("CIFAR-100's python version: cifar-100-python.tar.gz, or the extracted cifar-100-python/ folder with "
          "train, test and meta")


def _locate(path: Path) -> tuple[str, Path] | None:
    """``("archive", file)`` or ``("folder", folder of train/test/meta)`` at ``path``, or None."""
    if path.is_file():
        return "archive", path
    for folder in (path / FOLDER, path):
        if all((folder / p).is_file() for p in PARTS):
            return "folder", folder
    if (path / ARCHIVE).is_file():
        return "archive", path / ARCHIVE
    if (path / FOLDER).is_dir():
        missing = next(p for p in PARTS if not (path / FOLDER / p).is_file())
        raise DataError(
            f"{OWNER}: {str(path / FOLDER / missing)!r} must exist ({LAYOUT}); got no such file. Extract the "
            "archive again, or point data.root at cifar-100-python.tar.gz."
        )
    return None


def _read_archive(archive: Path) -> dict[str, Any]:
    """``train``, ``test`` and ``meta`` of the tar archive, read from its members (nothing is
    extracted to disk)."""
    found: dict[str, Any] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                parts = m.name.split("/")
                if m.isfile() and parts[-1] in PARTS and parts[:-1] in ([FOLDER], [".", FOLDER]):
                    f = tf.extractfile(m)
                    found[parts[-1]] = load_pickle(f, where=repr(f"{archive}:{m.name}"))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(
            f"{OWNER}: {str(archive)!r} must be a readable tar.gz archive ({LAYOUT}); got an unreadable file "
            f"({err}). Re-download it."
        ) from err
    missing = [p for p in PARTS if p not in found]
    if missing:
        raise DataError(
            f"{OWNER}: {str(archive)!r} must hold {FOLDER}/train, {FOLDER}/test and {FOLDER}/meta ({LAYOUT}); got "
            f"no {FOLDER}/{missing[0]}. Use the python version of CIFAR-100 (cifar-100-python.tar.gz)."
        )
    return found


def _field(part: dict, name: str, where: str) -> Any:
    try:
        return pickle_field(part, name)
    except KeyError:
        raise DataError(
            f"{OWNER}: {where} must be a dict with {name!r} (CIFAR-100's python version); got "
            f"{type(part).__name__} without it. Use the python version of CIFAR-100 (cifar-100-python.tar.gz)."
        ) from None


def _collect(parts: dict[str, Any], fmt: ImageFormat, where: str) -> ImageClasses:
    """Training and test images of every fine class, one class after another (training images
    first), grouped by coarse label."""
    meta = parts["meta"]
    fine_names = [as_text(n) for n in _field(meta, "fine_label_names", f"{where} meta")]
    coarse_names = [as_text(n) for n in _field(meta, "coarse_label_names", f"{where} meta")]
    images, fine, coarse = [], [], []
    for p in ("train", "test"):
        data = np.asarray(_field(parts[p], "data", f"{where} {p}"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{OWNER}: 'data' of {where} {p} must be a uint8 array [N, 3072]; got {data.dtype} "
                f"{tuple(data.shape)}. Use the python version of CIFAR-100 (cifar-100-python.tar.gz)."
            )
        f_labels = np.asarray(_field(parts[p], "fine_labels", f"{where} {p}"), dtype=np.int64).reshape(-1)
        c_labels = np.asarray(_field(parts[p], "coarse_labels", f"{where} {p}"), dtype=np.int64).reshape(-1)
        if not (len(f_labels) == len(c_labels) == len(data)):
            raise DataError(
                f"{OWNER}: {where} {p} must hold one fine and one coarse label per image; got {len(data)} images, "
                f"{len(f_labels)} fine and {len(c_labels)} coarse labels. Re-download the archive."
            )
        images.append(data.reshape(-1, 3, 32, 32))
        fine.append(f_labels)
        coarse.append(c_labels)
    images_all, fine_all, coarse_all = np.concatenate(images), np.concatenate(fine), np.concatenate(coarse)
    if len(fine_all) and (fine_all.min() < 0 or fine_all.max() >= len(fine_names) or coarse_all.min() < 0
                          or coarse_all.max() >= len(coarse_names)):
        raise DataError(
            f"{OWNER}: the labels of {where} must index meta's {len(fine_names)} fine and {len(coarse_names)} coarse "
            "label names; got labels outside them. Re-download the archive."
        )
    order = np.argsort(fine_all, kind="stable")
    ids, first, count = np.unique(fine_all[order], return_index=True, return_counts=True)
    converted = convert_arrays(images_all.transpose(0, 2, 3, 1), fmt, order)
    return array_classes(
        torch.from_numpy(converted),
        [fine_names[c] for c in ids.tolist()],
        count.tolist(),
        [coarse_names[coarse_all[order[f]]] for f in first.tolist()],
    )


def cifar100_classes(root: str | None, fmt: ImageFormat, download: bool = False,
                     cache: str | None = None) -> ImageClasses:
    """All 100 CIFAR-100 classes (training and test images together) in memory, named by fine
    label and grouped by coarse label; downloaded into ``<cache>/cifar100`` with ``download``
    when nothing is found."""
    default = None
    if root is None and download:
        default = default_cache_dir(cache) / "cifar100"
        default.mkdir(parents=True, exist_ok=True)
    path = find_root(root, ENV, OWNER, LAYOUT, default)
    found = _locate(path)
    if found is None and download:
        found = "archive", download_file(CIFAR100_URL[0], path / ARCHIVE, CIFAR100_URL[1])
    if found is None:
        raise DataError(
            f"{OWNER}: data.root must hold {LAYOUT}; got neither in {str(path)!r}. Point data.root (or {ENV}) at the "
            "archive or the extracted folder, or set data.download: true."
        )
    kind, where = found
    files = [where] if kind == "archive" else [where / p for p in PARTS]

    def build() -> ImageClasses:
        if kind == "archive":
            parts = _read_archive(where)
        else:
            parts = {p: load_pickle(where / p) for p in PARTS}
        return _collect(parts, fmt, repr(str(where)))

    if fmt.size == 32 and fmt.channels == 3 and not fmt.invert:
        return build()  # only a reshape: as fast as reading a cache
    key = f"cifar100:{files_fingerprint(files)}:{fmt.size}:{fmt.channels}:{fmt.invert}:{fmt.fit}"
    return cached(f"cifar100-{fmt.size}", key, build, default_cache_dir(cache))


class _Cifar100Source(ImageSourceConfig):
    """A few-shot benchmark over CIFAR-100's classes: the published split ``split_file``."""

    split_file: ClassVar[str] = ""
    owner: ClassVar[str] = ""

    root: str | None = Field(None, description="cifar-100-python.tar.gz, the extracted cifar-100-python/ folder, or "
                             "the folder holding either (default METAFIT_CIFAR100)")
    image_size: int = Field(32, ge=8, le=1024, description="images are brought to size x size (CIFAR's are 32x32)")
    normalize: Literal["none", "dataset", "imagenet"] = Field(
        "dataset", description="input normalisation inside the model: none, dataset (per-channel mean/std of the "
        "training images, computed once and cached), imagenet (torchvision's ImageNet statistics)")
    download: bool = Field(False, description="allow the md5-verified download of cifar-100-python.tar.gz "
                           "(161 MB) into the cache when no data is found")

    def load_splits(self) -> dict[str, ImageClasses]:
        data = cifar100_classes(self.root, self.image_format(), self.download, self.cache_dir)
        return split_classes(data, published_split(self.split_file)["splits"], self.owner, LAYOUT)


class CifarFSConfig(_Cifar100Source):
    """``data.name: cifar_fs``: CIFAR-FS, Bertinetto et al.'s random class split of CIFAR-100."""

    summary = ("CIFAR-FS: CIFAR-100's 32x32 images, Bertinetto et al.'s random 64/16/20 class split; superclasses "
               "are groups")
    split_file = "cifarfs"
    owner = "CIFAR-FS"
    name: Literal["cifar_fs"] = "cifar_fs"


class FC100Config(_Cifar100Source):
    """``data.name: fc100``: FC100, Oreshkin et al.'s split of CIFAR-100 by superclass."""

    summary = "FC100: CIFAR-100's 32x32 images, Oreshkin et al.'s 60/20/20 class split by superclass (12/4/4 groups)"
    split_file = "fc100"
    owner = "FC100"
    name: Literal["fc100"] = "fc100"
