"""The published class splits that ship with metafit (``metafit/data/splits/*.json``) and the
helpers every reader of a split benchmark uses: read a split file, locate a dataset folder or
archive, read class folders (per split or in one tree) and arrays of decoded images, check a
copy against the published split and cut a collection of all classes into it."""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .classes import ImageClasses
from .folder import file_classes
from .images import IMAGE_SUFFIXES
from .store import ImageFormat, stat_fingerprint

__all__ = ["SPLITS", "array_classes", "check_published_splits", "class_folders", "convert_arrays",
           "files_fingerprint", "find_root", "folder_classes", "published_split", "split_classes"]

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def published_split(name: str) -> dict[str, Any]:
    """The split file ``<name>.json`` of the package: ``splits`` (``train``/``val``/``test``
    class lists), ``source``, ``reference`` and per-dataset extras."""
    with resources.files("metafit").joinpath("data", "splits", f"{name}.json").open() as f:
        return json.load(f)


def find_root(root: str | None, env: str, owner: str, layout: str, default: Path | None = None) -> Path:
    """``root``, else the environment variable ``env``, else ``default``; a one-line
    :class:`DataError` naming the expected ``layout`` when none exists."""
    chosen = root or os.environ.get(env) or (str(default) if default is not None else None)
    if chosen is None:
        raise DataError(
            f"{owner}: data.root must point at the dataset ({layout}); got None. Set data.root (or --data-dir, "
            f"or the {env} environment variable)."
        )
    path = Path(chosen).expanduser()
    if not path.exists():
        raise DataError(
            f"{owner}: data.root must be an existing folder or file ({layout}); got {str(path)!r}. "
            f"Point data.root (or {env}) at the dataset."
        )
    return path


def split_classes(data: ImageClasses, split: dict[str, list[str]], owner: str, layout: str,
                  allow_missing: int = 0) -> dict[str, ImageClasses]:
    """``data`` (all classes, named by their published identifiers) cut into the published
    ``split``. A class of the split that ``data`` lacks is an error naming it and the expected
    ``layout``; with ``allow_missing`` > 0, up to that many missing classes are logged and left
    out (a copy of a dataset with a few classes fewer than the one the split was made on)."""
    index = {n: i for i, n in enumerate(data.class_names)}
    missing = [c for s in ("train", "val", "test") for c in split[s] if c not in index]
    if missing and len(missing) > allow_missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{owner}: the data must hold every class of the published split ({layout}); got {len(missing)} "
            f"missing: {shown}. Point data.root at a complete copy of the dataset."
        )
    if missing:
        log.warning("%s: %d classes of the published split are not in this copy and are left out: %s",
                    owner, len(missing), ", ".join(missing))
    return {s: data.subset([index[c] for c in split[s] if c in index]) for s in ("train", "val", "test")}


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
    :func:`~metafit.data.decode.image_array` one by one."""
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
