"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) read from the official zip archives.

Images are decoded once to ``image_size`` x ``image_size`` grayscale with ink = 255 (1.0 after
scaling) and cached as uint8 arrays; the cache key includes the archive's digest, so a changed
archive is decoded again. Every character keeps its alphabet (its group).

Protocols (``omniglot_splits``):

- ``vinyals``: the common 1200-character split (Vinyals et al. 2016; Snell et al. 2017). All 1623
  characters, background then evaluation, each sorted by alphabet and character: the first 1028
  train, the next 172 validate, the last 423 test; 90-degree rotations make new classes (the
  sampler applies them). This is a deterministic split of the same sizes, not Vinyals' exact
  character list, which the official distribution does not ship.
- ``lake``: learn from ``images_background``, test on ``images_evaluation`` (the original
  one-shot protocol); the last 5 background alphabets (sorted) are held out for validation.
- ``small1``, ``small2``: the two minimal background sets; ``small`` their union (Greek and
  Latin appear in both and are counted once). The last alphabet is held out for validation.
  Tests are on ``images_evaluation``.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from typing import Literal

from pydantic import Field

from ..errors import DataError
from .cache import cache_dir as default_cache_dir
from .cache import cached, file_digest
from .classes import ImageClasses
from .download import download_file
from .source import ImageSourceConfig
from .decode import image_array, open_image, quote_path

__all__ = [
    "OMNIGLOT_FILES",
    "OmniglotConfig",
    "PROTOCOLS",
    "find_omniglot",
    "load_omniglot",
    "omniglot_splits",
]

BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
# Checksums of the officially distributed archives.
OMNIGLOT_FILES = {
    "background": ("images_background.zip", "md5:68d2efa1b9178cc56df9314c21c6e718"),
    "evaluation": ("images_evaluation.zip", "md5:6b91aef0f799c5bb55b94e3f2daec811"),
    "background_small1": ("images_background_small1.zip", "md5:e704a628b5459e08445c13499850abc4"),
    "background_small2": ("images_background_small2.zip", "md5:b75a71a51d3b13f821f212756fe481fd"),
}
PROTOCOLS = ("vinyals", "lake", "small1", "small2", "small")


def find_omniglot(root: str | os.PathLike | None = None, download: bool = False,
                  parts=("background", "evaluation")) -> Path:
    """Resolve the folder holding the zips: ``root``, else ``METAFIT_DATA_DIR``, else (with
    ``download=True``) ``<cache>/omniglot`` after a checksum-verified download. ``parts``: the
    archives that must be there (``background``, ``evaluation``, ...). Returns the folder; a folder
    missing them without ``download`` is a :class:`~metafit.errors.DataError`."""
    candidates = []
    if root:
        candidates.append(Path(root))
    elif os.environ.get("METAFIT_DATA_DIR"):
        candidates.append(Path(os.environ["METAFIT_DATA_DIR"]))
    target = candidates[0] if candidates else default_cache_dir() / "omniglot"
    missing = [OMNIGLOT_FILES[p][0] for p in parts if not (target / OMNIGLOT_FILES[p][0]).is_file()]
    if not missing:
        return target
    if download:
        for p in parts:
            name, checksum = OMNIGLOT_FILES[p]
            if not (target / name).is_file():
                download_file(BASE_URL + name, target / name, checksum)
        return target
    raise DataError(
        f"Omniglot: data folder must contain {', '.join(missing)}; got folder {str(target)!r}. "
        "Pass the folder holding the official zips (--data-dir or METAFIT_DATA_DIR), "
        "or allow the checksum-verified download (data.download: true / --download)."
    )


def _decode(png: bytes, size: int, where: str = "an Omniglot image") -> np.ndarray:
    with open_image(io.BytesIO(png), where) as im:  # the one reader: pixel limit, one-line errors
        return image_array(im, size, 1, invert=True)[0]  # ink (black) -> 255


def _read_zip(path: Path, size: int) -> ImageClasses:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(
            f"Omniglot: {path} must be a readable zip archive; got an unreadable file ({err}). "
            "Delete it and download it again."
        ) from err
    with zf:
        per_char: dict[tuple[str, str], list[str]] = {}
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3].lower().endswith(".png"):
                per_char.setdefault((parts[1], parts[2]), []).append(name)
        if not per_char:
            raise DataError(
                f"Omniglot: {path} must hold <split>/<alphabet>/<character>/<image>.png entries; "
                "got none. Use the official Omniglot archives."
            )
        keys = sorted(per_char)
        alphabets = sorted({a for a, _ in keys})
        images, starts, counts, groups, names = [], [], [], [], []
        offset = 0
        for alphabet, char in keys:
            files = sorted(per_char[(alphabet, char)])
            for f in files:
                images.append(_decode(zf.read(f), size, quote_path(f"{path}:{f}")))
            starts.append(offset)
            counts.append(len(files))
            offset += len(files)
            groups.append(alphabets.index(alphabet))
            names.append(f"{alphabet}/{char}")
    return ImageClasses(
        images=torch.from_numpy(np.stack(images)[:, None]),
        class_start=torch.tensor(starts, dtype=torch.long),
        class_count=torch.tensor(counts, dtype=torch.long),
        class_names=tuple(names),
        class_group=torch.tensor(groups, dtype=torch.long),
        group_names=tuple(alphabets),
    )


def load_omniglot(part: str, root: str | os.PathLike | None = None, image_size: int = 28,
                  cache: str | os.PathLike | None = None, download: bool = False) -> ImageClasses:
    """Load one archive, ``part`` (``background``, ``evaluation``, ``background_small1``/``2``), found
    by :func:`find_omniglot` from ``root`` (``download``: fetch it if missing), as an
    :class:`ImageClasses` of ``image_size`` x ``image_size`` inverted grayscale images (ink high), one
    class per character, grouped by alphabet. The decoded images are cached under ``cache`` (None:
    the default cache folder)."""
    if part not in OMNIGLOT_FILES:
        raise DataError(
            f"Omniglot: part must be one of {sorted(OMNIGLOT_FILES)}; got {part!r}. Choose a listed part."
        )
    folder = find_omniglot(root, download, parts=(part,))
    path = folder / OMNIGLOT_FILES[part][0]
    key = f"omniglot:{part}:{image_size}:{file_digest(path)}"
    return cached(f"omniglot-{part}-{image_size}", key, lambda: _read_zip(path, image_size),
                  default_cache_dir(cache))


def _split_by_groups(data: ImageClasses, n_val_groups: int) -> tuple[ImageClasses, ImageClasses]:
    groups = sorted(data.group_names)
    val = groups[-n_val_groups:]
    train = groups[:-n_val_groups]
    return data.subset(data.classes_of_groups(train)), data.subset(data.classes_of_groups(val))


def omniglot_splits(protocol: str = "vinyals", root=None, image_size: int = 28, cache=None,
                    download: bool = False) -> dict[str, ImageClasses]:
    """``{"train", "val", "test"}`` collections for a ``protocol`` (see the module docstring); ``root``,
    ``image_size``, ``cache`` and ``download`` are passed to :func:`load_omniglot`."""
    if protocol not in PROTOCOLS:
        raise DataError(
            f"Omniglot: protocol must be one of {list(PROTOCOLS)}; got {protocol!r}. Choose a listed protocol."
        )
    load = lambda part: load_omniglot(part, root, image_size, cache, download)  # noqa: E731
    if protocol == "vinyals":
        background, evaluation = load("background"), load("evaluation")
        both = ImageClasses.concat([_prefixed(background, "background"), _prefixed(evaluation, "evaluation")])
        ids = torch.arange(both.n_classes)
        return {"train": both.subset(ids[:1028]), "val": both.subset(ids[1028:1200]),
                "test": both.subset(ids[1200:])}
    test = load("evaluation")
    if protocol == "lake":
        train, val = _split_by_groups(load("background"), 5)
    elif protocol in ("small1", "small2"):
        train, val = _split_by_groups(load(f"background_{protocol}"), 1)
    else:
        s1, s2 = load("background_small1"), load("background_small2")
        seen = set(s1.class_names)
        extra = [i for i, n in enumerate(s2.class_names) if n not in seen]
        train, val = _split_by_groups(ImageClasses.concat([s1, s2.subset(extra)]), 1)
    return {"train": train, "val": val, "test": test}


def _prefixed(data: ImageClasses, prefix: str) -> ImageClasses:
    return ImageClasses(data.images, data.class_start, data.class_count,
                        tuple(f"{prefix}/{n}" for n in data.class_names), data.class_group,
                        tuple(f"{prefix}/{g}" for g in data.group_names))


class OmniglotConfig(ImageSourceConfig):
    """``data.name: omniglot``: Omniglot from the official zips, grayscale with ink high."""

    summary = "Omniglot (Lake et al. 2015) from the official zips; 1623 handwritten characters of 50 alphabets"
    name: Literal["omniglot"] = "omniglot"
    root: str | None = Field(None, description="folder holding the official zips (default METAFIT_DATA_DIR)")
    protocol: Literal["vinyals", "lake", "small1", "small2", "small"] = Field(
        "vinyals", description="class split (see metafit.data.omniglot)")
    image_size: int = Field(28, ge=8, le=1024, description="images are resized to size x size")
    rotations: bool = Field(True, description="90-degree rotations as new classes (training; validation/test "
                            "too unless eval.rotations is set)")
    download: bool = Field(False, description="allow a checksum-verified download when the zips are missing")

    @property
    def in_channels(self) -> int:
        return 1

    @property
    def invert_images(self) -> bool:
        return True

    def load_splits(self) -> dict[str, ImageClasses]:
        return omniglot_splits(self.protocol, self.root, self.image_size, self.cache_dir, self.download)
