"""Tiny ImageNet (Le & Yang, Stanford CS231N) as a few-shot benchmark: natural colour images,
64x64, 500 per class, with metafit's published class split (``splits/tiny_imagenet.json``:
130 training, 32 validation and 40 test classes of the 202 of the copy it was made on, about
64/16/20% like miniImageNet; frozen).

Layouts read (``data.root``, or the ``METAFIT_TINY_IMAGENET`` environment variable):

- ``tiny-imagenet-train.zip`` holding ``tiny-imagenet/<wnid>/<wnid>_<i>.JPEG`` (202 classes), or
  a folder holding that zip, or the extracted ``tiny-imagenet/`` folder;
- the official ``tiny-imagenet-200.zip`` (``tiny-imagenet-200/train/<wnid>/images/*.JPEG``, 200
  classes), the folder holding it, or the extracted ``tiny-imagenet-200/`` folder. Two classes
  of the split are not in this copy; they are left out (with a warning) and the test classes
  are those of the published split minus any missing. With ``data.download: true`` this archive
  is downloaded (md5-verified) into the cache when nothing is found.

Images are read straight from the zip: decoded once into memory (and cached), or on demand by
worker processes (``data.storage: lazy``).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import DataError
from .cache import cache_dir as default_cache_dir
from .classes import ImageClasses
from .download import download_file
from .folder import file_classes
from .source import NaturalImageSourceConfig
from .split_files import find_root, published_split, split_classes
from .store import ImageFormat, stat_fingerprint

__all__ = ["TINY_IMAGENET_URL", "TinyImageNetConfig", "tiny_imagenet_classes"]

TINY_IMAGENET_URL = ("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "md5:90528d7ca1a48142e341f4ef8d21d0de")
LAYOUT = ("tiny-imagenet-train.zip with tiny-imagenet/<wnid>/<image>.JPEG, the official tiny-imagenet-200.zip with "
          "tiny-imagenet-200/train/<wnid>/images/<image>.JPEG, or either extracted")
_WNID = re.compile(r"^n\d{8}$")
_SUFFIXES = (".jpeg", ".jpg", ".png")


def _member_class(name: str) -> str | None:
    """The wnid of an image member ``.../<wnid>/<file>`` or ``.../train/<wnid>/images/<file>``."""
    parts = name.split("/")
    if len(parts) < 2 or not parts[-1].lower().endswith(_SUFFIXES):
        return None
    if len(parts) >= 3 and parts[-2] == "images" and _WNID.match(parts[-3]) and "val" not in parts[:-3]:
        return parts[-3]
    return parts[-2] if _WNID.match(parts[-2]) else None


def _entries(names: list[str]) -> list[tuple[str, str, list[str]]]:
    per_class: dict[str, list[str]] = {}
    for n in names:
        c = _member_class(n)
        if c is not None:
            per_class.setdefault(c, []).append(n)
    return [("", c, sorted(per_class[c])) for c in sorted(per_class)]


def _find_archive(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in ("tiny-imagenet-train.zip", "tiny-imagenet-200.zip"):
        if (path / name).is_file():
            return path / name
    return None


def tiny_imagenet_classes(root: str | None, fmt: ImageFormat, download: bool = False,
                          cache: str | None = None) -> tuple[ImageClasses, str]:
    """All classes found at ``root`` over a lazily decoded store, and a fingerprint of the source."""
    default = None
    if root is None and download:
        default = default_cache_dir(cache) / "tiny-imagenet"
        default.mkdir(parents=True, exist_ok=True)
    path = find_root(root, "METAFIT_TINY_IMAGENET", "TinyImageNet", LAYOUT, default)
    archive = _find_archive(path)
    if archive is None and download and not any(path.iterdir()):
        archive = download_file(TINY_IMAGENET_URL[0], path / "tiny-imagenet-200.zip", TINY_IMAGENET_URL[1])
    if archive is not None:
        try:
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(
                f"TinyImageNet: {str(archive)!r} must be a readable zip archive; got an unreadable file ({err}). "
                "Re-download it."
            ) from err
        entries = _entries(names)
        st = archive.stat()
        source = f"zip:{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if entries:
            return file_classes(entries, fmt, (str(archive),), [0] * len(entries)), source
    else:
        files = [p for p in path.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file()]
        entries = [(g, c, [path / f for f in fs]) for g, c, fs in _entries([str(f.relative_to(path)).replace("\\", "/")
                                                                          for f in sorted(files)])]
        if entries:
            source = f"folder:{path.resolve()}:" + stat_fingerprint([f for _, _, fs in entries for f in fs], path)
            return file_classes(entries, fmt), source
    raise DataError(
        f"TinyImageNet: data.root must hold the images as {LAYOUT}; got no <wnid>/<image> entries in "
        f"{str(archive or path)!r}. Point data.root at the zip or the extracted folder."
    )


class TinyImageNetConfig(NaturalImageSourceConfig):
    """``data.name: tiny_imagenet``: Tiny ImageNet with metafit's published few-shot split."""

    summary = ("Tiny ImageNet: 64x64 colour images of ImageNet classes, 500 per class, metafit's published "
               "130/32/40 class split")
    name: Literal["tiny_imagenet"] = "tiny_imagenet"
    root: str | None = Field(None, description="tiny-imagenet-train.zip / tiny-imagenet-200.zip, the folder holding "
                             "it, or the extracted tree (default METAFIT_TINY_IMAGENET)")
    image_size: int = Field(64, ge=8, le=1024, description="images are brought to size x size")
    download: bool = Field(False, description="allow the md5-verified download of the official "
                           "tiny-imagenet-200.zip (200 of the split's 202 classes) when no data is found")

    def load_splits(self) -> dict[str, ImageClasses]:
        data, source = tiny_imagenet_classes(self.root, self.image_format(), self.download, self.cache_dir)
        data = self.store_classes(data, f"tiny_imagenet:{source}", "tiny_imagenet")
        return split_classes(data, published_split("tiny_imagenet")["splits"], "TinyImageNet", LAYOUT,
                             allow_missing=2)
