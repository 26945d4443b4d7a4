"""CUB-200-2011 (Wah et al. 2011) as a few-shot benchmark: 200 bird species, 11,788 colour
photographs, with Chen et al.'s class split (``splits/cub.json``: 100 training, 50 validation
and 50 test species, from the sorted class folders).

Layouts read (``data.root``, or the ``METAFIT_CUB`` environment variable): the image tree
``CUB_200_2011/images/<NNN.Name>/<image>.jpg``, given as the folder holding ``CUB_200_2011/``, the
``CUB_200_2011`` folder itself or its ``images`` folder; or the official ``CUB_200_2011.tgz``
archive (the archive itself, or the folder holding it when it holds no extracted tree). An
archive's images are extracted once into the cache (``<cache>/cub/CUB_200_2011-<fingerprint>/``;
only ``CUB_200_2011/images/*/*`` members, never outside that folder), so every storage mode
works on it: decoded once into memory (and cached), or on demand by worker processes
(``data.storage: lazy``). With ``data.download: true`` the archive is downloaded (md5-verified)
into the cache when nothing is found.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import DataError
from .cache import cache_dir as default_cache_dir
from .classes import ImageClasses
from .download import download_file
from .folder import file_classes
from .images import IMAGE_SUFFIXES
from .source import NaturalImageSourceConfig
from .split_files import class_folders, find_root, published_split, split_classes
from .store import ImageFormat, stat_fingerprint

__all__ = ["CUBConfig", "CUB_URL", "LAYOUT", "cub_classes", "extract_cub_images"]

log = logging.getLogger(__name__)

CUB_URL = ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
           "md5:97eceeb196236b17998738112f37df78")
ARCHIVE = "CUB_200_2011.tgz"
TOP = "CUB_200_2011"
OWNER = "CUB"
ENV = "METAFIT_CUB"
LAYOUT = ("CUB_200_2011/images/<NNN.Name>/<image>.jpg: the folder holding CUB_200_2011/, the CUB_200_2011 folder, "
          "or the CUB_200_2011.tgz archive")


def _images_folder(path: Path) -> Path | None:
    """The ``images`` folder of the tree at ``path`` (any accepted level), or None."""
    for folder in (path / TOP / "images", path / "images", path):
        if folder.is_dir() and any(d.is_dir() and d.name[:4].rstrip(".").isdigit() for d in folder.iterdir()):
            return folder
    return None


def _image_member(name: str) -> bool:
    parts = name.split("/")
    if parts and parts[0] == ".":
        parts = parts[1:]
    return (len(parts) == 4 and parts[0] == TOP and parts[1] == "images" and ".." not in parts
            and not parts[2].startswith(".") and Path(parts[3]).suffix.lower() in IMAGE_SUFFIXES
            and not parts[3].startswith("."))


def extract_cub_images(archive: Path, cache: str | None = None) -> Path:
    """The ``images`` folder of ``archive``'s tree, extracted once into
    ``<cache>/cub/CUB_200_2011-<fingerprint of the archive>/`` (only the image members; written
    to a temporary folder and renamed, so an interrupted extraction leaves nothing that looks
    complete)."""
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    base = default_cache_dir(cache) / "cub"
    target = base / f"{TOP}-{key}"
    images = target / TOP / "images"
    if images.is_dir():
        return images
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".part", dir=base))
    try:
        count = 0
        try:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf:  # one streaming pass: members are extracted as they come
                    if m.isfile() and _image_member(m.name):
                        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                        tf.extract(m, tmp, set_attrs=False, **kwargs)
                        count += 1
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(
                f"{OWNER}: {str(archive)!r} must be a readable tar.gz archive ({LAYOUT}); got an unreadable file "
                f"({err}). Re-download it."
            ) from err
        if not count:
            raise DataError(
                f"{OWNER}: {str(archive)!r} must hold {TOP}/images/<NNN.Name>/<image>.jpg ({LAYOUT}); got no such "
                "members. Use the official CUB_200_2011.tgz."
            )
        try:
            os.replace(tmp, target)
        except OSError:
            if not images.is_dir():  # not another process finishing first: a real failure
                raise
        log.info("CUB: extracted %d images of %s into %s", count, archive, target)
        return images
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cub_classes(root: str | None, fmt: ImageFormat, download: bool = False,
                cache: str | None = None) -> tuple[ImageClasses, str]:
    """All classes found at ``root`` over a lazily decoded store (an archive's images are
    extracted into the cache first), and a fingerprint of the source."""
    default = None
    if root is None and download:
        default = default_cache_dir(cache) / "cub"
        default.mkdir(parents=True, exist_ok=True)
    path = find_root(root, ENV, OWNER, LAYOUT, default)
    images = None if path.is_file() else _images_folder(path)
    archive = path if path.is_file() else (path / ARCHIVE if (path / ARCHIVE).is_file() else None)
    if images is None and archive is None and download:
        archive = download_file(CUB_URL[0], path / ARCHIVE, CUB_URL[1])
    if images is None and archive is not None:
        images = extract_cub_images(archive, cache)
    if images is None:
        raise DataError(
            f"{OWNER}: data.root must hold {LAYOUT}; got neither in {str(path)!r}. Point data.root (or {ENV}) at the "
            "dataset, or set data.download: true."
        )
    entries = [("", c, files) for c, files in class_folders(images, OWNER, LAYOUT)]
    files = [f for _, _, fs in entries for f in fs]
    source = f"folder:{images.resolve()}:" + stat_fingerprint(files, images)
    return file_classes(entries, fmt), source


class CUBConfig(NaturalImageSourceConfig):
    """``data.name: cub``: CUB-200-2011 with Chen et al.'s class split."""

    summary = "CUB-200-2011: 200 bird species, 11,788 photographs, Chen et al.'s 100/50/50 class split"
    name: Literal["cub"] = "cub"
    root: str | None = Field(None, description="the folder holding CUB_200_2011/, the CUB_200_2011 folder, or "
                             "CUB_200_2011.tgz (extracted once into the cache) (default METAFIT_CUB)")
    download: bool = Field(False, description="allow the md5-verified download of the official CUB_200_2011.tgz "
                           "(1.1 GB) into the cache when no data is found")

    def load_splits(self) -> dict[str, ImageClasses]:
        data, source = cub_classes(self.root, self.image_format(), self.download, self.cache_dir)
        data = self.store_classes(data, f"cub:{source}", "cub")
        return split_classes(data, published_split("cub")["splits"], OWNER, LAYOUT)
