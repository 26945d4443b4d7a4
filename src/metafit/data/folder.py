"""Users' own data: a class-per-folder image tree.

``root/<class>/<image>`` or ``root/<group>/<class>/<image>`` (groups are used by
``within_group`` episodes, like Omniglot's alphabets). Images are converted to ``channels``
(1 = grayscale, 3 = RGB; inferred from the files when not given, and mixed modes are refused),
resized to ``image_size`` x ``image_size`` and cached like Omniglot.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .cache import cache_dir as default_cache_dir
from .cache import cached
from .classes import ImageClasses

__all__ = ["IMAGE_SUFFIXES", "image_array", "load_image_folder", "read_image"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F", "P;L"}


def _mode_channels(mode: str) -> int:
    return 1 if mode in _GRAY_MODES else 3


def image_array(im: Image.Image, image_size: int, channels: int, invert: bool = False) -> np.ndarray:
    """One PIL image as uint8 ``[channels, size, size]``: converted to grayscale or RGB, resized
    with Lanczos, intensities inverted if asked. The one conversion every image reader uses."""
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.array(im, dtype=np.uint8)
    if invert:
        arr = 255 - arr
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image(path: str | os.PathLike, image_size: int, channels: int, invert: bool = False) -> np.ndarray:
    """Decode one image to uint8 ``[channels, size, size]``; a one-line DataError if unreadable."""
    try:
        with Image.open(path) as im:
            return image_array(im, image_size, channels, invert)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(
            f"Image folder: {str(path)!r} must be a readable image; got an unreadable file ({err}). "
            "Remove or replace the file."
        ) from err


def _scan(root: Path) -> list[tuple[str, str, list[Path]]]:
    """[(group, class, files)] for a one- or two-level tree."""
    if not root.is_dir():
        raise DataError(
            f"Image folder: root must be an existing directory; got {str(root)!r}. "
            "Pass the folder that holds one sub-folder per class."
        )
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise DataError(
            f"Image folder: {str(root)!r} must contain one sub-folder per class; got none. "
            "Arrange images as root/<class>/<image>."
        )

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    nested = [d for d in top if any(c.is_dir() for c in d.iterdir())]
    entries = []
    if nested:
        flat = [d for d in top if d not in nested]
        if flat:
            raise DataError(
                f"Image folder: every top-level folder must be a group of class folders when one is; "
                f"got class folder {flat[0].name!r} beside group {nested[0].name!r}. Use either "
                "root/<class>/<image> or root/<group>/<class>/<image> throughout."
            )
        for g in top:
            for c in sorted(p for p in g.iterdir() if p.is_dir() and not p.name.startswith(".")):
                entries.append((g.name, f"{g.name}/{c.name}", images_in(c)))
    else:
        for c in top:
            entries.append(("", c.name, images_in(c)))
    for _, name, files in entries:
        if not files:
            raise DataError(
                f"Image folder: class {name!r} must contain at least one image "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); got none. Add images or remove the folder."
            )
    return entries


def load_image_folder(root: str | os.PathLike, image_size: int = 28, channels: int | None = None,
                      invert: bool = False, cache: str | os.PathLike | None = None) -> ImageClasses:
    """Read (or fetch from cache) a class-per-folder tree into :class:`ImageClasses`."""
    root = Path(root)
    entries = _scan(root)
    files = [f for _, _, fs in entries for f in fs]
    stat_key = "|".join(f"{f.relative_to(root)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)

    def build() -> ImageClasses:
        nonlocal channels
        if channels is None:
            modes: dict[int, Path] = {}
            for f in files:
                try:
                    with Image.open(f) as im:
                        modes.setdefault(_mode_channels(im.mode), f)
                except (UnidentifiedImageError, OSError) as err:
                    raise DataError(
                        f"Image folder: {str(f)!r} must be a readable image; got an unreadable file "
                        f"({err}). Remove or replace the file."
                    ) from err
                if len(modes) > 1:
                    raise DataError(
                        f"Image folder: images must share one mode (all grayscale or all colour); got "
                        f"grayscale {str(modes[1])!r} and colour {str(modes[3])!r}. Convert them to one "
                        "mode, or set data.channels to 1 or 3 to convert on load."
                    )
            channels = next(iter(modes))
        arrays = [read_image(f, image_size, channels, invert) for f in files]
        counts = [len(fs) for _, _, fs in entries]
        group_names = sorted({g for g, _, _ in entries})
        return ImageClasses(
            images=torch.from_numpy(np.stack(arrays)),
            class_start=torch.tensor(np.cumsum([0] + counts[:-1]), dtype=torch.long),
            class_count=torch.tensor(counts, dtype=torch.long),
            class_names=tuple(n for _, n, _ in entries),
            class_group=torch.tensor([group_names.index(g) for g, _, _ in entries], dtype=torch.long),
            group_names=tuple(group_names),
        )

    key = f"folder:{root.resolve()}:{image_size}:{channels}:{invert}:{stat_key}"
    return cached("folder", key, build, default_cache_dir(cache))
