"""Users' own data: a class-per-folder image tree.

``root/<class>/<image>`` or ``root/<group>/<class>/<image>`` (groups are used by
``within_group`` episodes, like Omniglot's alphabets). Images are converted to ``channels``
(1 = grayscale, 3 = RGB; inferred from the files when not given, palette images by the colours
they use, and mixed modes are refused), brought to ``image_size`` x ``image_size`` and cached like
Omniglot, or decoded on demand (``data.storage: lazy``) for trees too large for memory.

A folder (or a link to one) among a class's images is refused naming it, as is a link back up
the tree; hidden entries are skipped. Every image is read by the one image reader
(:func:`metafit.data.decode.open_image`): an image over the pixel limit
(``METAFIT_MAX_IMAGE_PIXELS``, default 89,478,485) is refused from its header, before decoding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from ..errors import DataError, short_repr
from .cache import cache_dir as default_cache_dir
from .cache import cached
from .classes import ImageClasses
from .images import IMAGE_SUFFIXES
from .source import FileSourceConfig, split_by_fractions
from .decode import image_array, open_image, quote_path, read_image
from .store import FileImages, ImageFormat, decode_all, stat_fingerprint

__all__ = ["FolderConfig", "IMAGE_SUFFIXES", "file_classes", "image_array", "load_image_folder", "read_image"]

#: modes whose pixels are gray whatever they hold; P/PA images are classified by their content
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _image_channels(im: Image.Image) -> int:
    """1 for a grayscale image, 3 for a colour one, judged by content where the mode does not
    say: a palette image whose palette entries in use are all gray is grayscale."""
    if im.mode in _GRAY_MODES:
        return 1
    if im.mode not in ("P", "PA"):
        return 3
    palette = im.getpalette("RGB") or []  # decodes the image: palette images are classified by content
    used = im.getcolors(256) if im.mode == "P" else im.getchannel(0).getcolors(256)
    indices = [i for _, i in used] if used is not None else range(len(palette) // 3)
    gray = all(palette[3 * i] == palette[3 * i + 1] == palette[3 * i + 2]
               for i in indices if 3 * i + 2 < len(palette))
    return 1 if gray else 3


def _stray(path: Path, where: str) -> DataError:
    kind = "a symbolic link to a folder" if path.is_symlink() else "a folder"
    return DataError(
        f"Image folder: {where} must hold only image files; got {kind} {quote_path(path)}. Move it out of "
        "the tree or delete it (a class folder's sub-folders are not read; a group holds only class folders)."
    )


def _check_no_loop(d: Path) -> None:
    """Refuse a folder (a symbolic link) that leads back to one of the folders above it."""
    if not d.is_symlink():
        return
    target, parent = d.resolve(), d.parent.resolve()
    if target == parent or target in parent.parents:
        raise DataError(
            f"Image folder: folders in the tree must not link back to a folder above them; got "
            f"{quote_path(d)} linking to {quote_path(target)}. Remove the link."
        )


def _scan(root: Path) -> list[tuple[str, str, list[Path]]]:
    """[(group, class, files)] for a one- or two-level tree. A top-level folder holding image
    files is a class; one holding only folders is a group of classes. A folder (or a link to
    one) beside the images of a class, or an image file beside the classes of a group, is
    refused naming it; hidden entries are skipped."""
    if not root.is_dir():
        raise DataError(
            f"Image folder: root must be an existing directory; got {quote_path(root)}. "
            "Pass the folder that holds one sub-folder per class."
        )
    try:
        top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise DataError(f"Image folder: {quote_path(root)} must be a readable folder; got "
                        f"{type(err).__name__}. Check its permissions.") from err
    if not top:
        raise DataError(
            f"Image folder: {quote_path(root)} must contain one sub-folder per class; got none. "
            "Arrange images as root/<class>/<image>."
        )

    def listing(d: Path) -> tuple[list[Path], list[Path]]:
        """(image files, visible folders) directly in ``d``."""
        try:
            entries = sorted(d.iterdir())
        except OSError as err:
            raise DataError(f"Image folder: {quote_path(d)} must be a readable folder; got "
                            f"{type(err).__name__}. Check its permissions.") from err
        visible = [p for p in entries if not p.name.startswith(".")]
        for p in visible:
            if p.is_symlink() and not p.exists():  # dangling, or a loop of links
                raise DataError(
                    f"Image folder: every entry of {quote_path(d)} must be an image file or a folder; got "
                    f"{quote_path(p)}, a symbolic link that leads nowhere (broken or a loop). Fix or remove the link."
                )
        images = [p for p in visible if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        folders = [p for p in visible if p.is_dir()]
        return images, folders

    layout: dict[Path, tuple[list[Path], list[Path]]] = {}
    for d in top:
        _check_no_loop(d)
        layout[d] = listing(d)
    groups = [d for d in top if layout[d][1] and not layout[d][0]]
    mixed = [d for d in top if layout[d][0] and layout[d][1]]
    if mixed:  # images and folders side by side: name the stray entry
        d = mixed[0]
        images, folders = layout[d]
        if groups and not any(layout[c][0] and not layout[c][1] for c in top):
            raise DataError(
                f"Image folder: group {short_repr(d.name)} must hold only class folders; got image file "
                f"{quote_path(images[0])}. Move it into a class folder or delete it."
            )
        raise _stray(folders[0], f"class folder {short_repr(d.name)}")
    entries = []
    if groups:
        classes = [d for d in top if d not in groups]
        if classes:
            raise DataError(
                f"Image folder: every top-level folder must be a group of class folders when one is; "
                f"got class folder {short_repr(classes[0].name)} beside group {short_repr(groups[0].name)}. Use "
                "either root/<class>/<image> or root/<group>/<class>/<image> throughout."
            )
        for g in top:
            for c in layout[g][1]:
                _check_no_loop(c)
                images, folders = listing(c)
                if folders:
                    raise _stray(folders[0], f"class folder {short_repr(f'{g.name}/{c.name}')}")
                entries.append((g.name, f"{g.name}/{c.name}", images))
    else:
        entries = [("", c.name, layout[c][0]) for c in top]
    for _, name, files in entries:
        if not files:
            raise DataError(
                f"Image folder: class {short_repr(name)} must contain at least one image "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); got none. Add images or remove the folder."
            )
    return entries


def _infer_channels(files: list[Path]) -> int:
    """1 or 3 from the files' content (mode, and palette for palette images); mixed are refused."""
    modes: dict[int, Path] = {}
    for f in files:
        with open_image(f, quote_path(f)) as im:
            modes.setdefault(_image_channels(im), f)
        if len(modes) > 1:
            raise DataError(
                f"Image folder: images must share one mode (all grayscale or all colour); got "
                f"grayscale {quote_path(modes[1])} and colour {quote_path(modes[3])}. Convert them to "
                "one mode, or set data.channels to 1 or 3 to convert on load."
            )
    return next(iter(modes))


def file_classes(entries: list[tuple[str, str, list]], fmt: ImageFormat, archives: tuple[str, ...] = (),
                 archive_of: list[int] | None = None) -> ImageClasses:
    """A lazily decoded collection from ``[(group, class name, files)]`` (paths, or members of
    ``archives`` with ``archive_of`` giving each class's archive index)."""
    members, owner = [], []
    for c, (_, _, files) in enumerate(entries):
        members += [str(f) for f in files]
        if archive_of is not None:
            owner += [archive_of[c]] * len(files)
    counts = [len(fs) for _, _, fs in entries]
    group_names = sorted({g for g, _, _ in entries})
    index = {g: i for i, g in enumerate(group_names)}
    store = FileImages(members, fmt, archives, np.array(owner) if archive_of is not None else None)
    return ImageClasses(
        images=store,
        class_start=torch.tensor(np.cumsum([0] + counts[:-1]), dtype=torch.long),
        class_count=torch.tensor(counts, dtype=torch.long),
        class_names=tuple(n for _, n, _ in entries),
        class_group=torch.tensor([index[g] for g, _, _ in entries], dtype=torch.long),
        group_names=tuple(group_names),
    )


def load_image_folder(root: str | os.PathLike, image_size: int = 28, channels: int | None = None,
                      invert: bool = False, cache: str | os.PathLike | None = None, fit: str = "squash",
                      storage: str = "memory", workers: int = 0) -> ImageClasses:
    """Read a class-per-folder tree under ``root`` (``root/<class>/<image>``, or
    ``root/<group>/<class>/<image>``) into :class:`ImageClasses`: decoded into memory (through the
    cache under ``cache``, by ``workers`` processes, 0: this one) with ``storage="memory"``, or over a
    lazily decoded store with ``"lazy"``. Every image becomes ``image_size`` x ``image_size`` with
    ``channels`` (1 or 3; None: inferred from the files), inverted if ``invert``, resized as ``fit``
    says (``squash`` or ``crop``, see :func:`~metafit.data.decode.image_array`). An unusable tree is
    a :class:`~metafit.errors.DataError` naming the problem."""
    root = Path(root)
    entries = _scan(root)
    files = [f for _, _, fs in entries for f in fs]
    if storage == "lazy":
        if channels is None:  # a spread of files decides; every image is converted to that mode on read
            step = max(1, len(files) // 256)
            channels = _infer_channels(files[::step])
        return file_classes(entries, ImageFormat(image_size, channels, invert, fit))
    stat_key = stat_fingerprint(files, root)

    def build() -> ImageClasses:
        lazy = file_classes(entries, ImageFormat(image_size, channels or _infer_channels(files), invert, fit))
        return ImageClasses(decode_all(lazy.images, workers), lazy.class_start, lazy.class_count,
                            lazy.class_names, lazy.class_group, lazy.group_names)

    fit_key = "" if fit == "squash" else f":{fit}"  # caches written before fit existed stay valid
    key = f"folder:{root.resolve()}:{image_size}:{channels}:{invert}{fit_key}:{stat_key}"
    return cached("folder", key, build, default_cache_dir(cache))


class FolderConfig(FileSourceConfig):
    """``data.name: folder``: your own class-per-folder images."""

    summary = "your own images, one folder per class (root/<class>/<image> or root/<group>/<class>/<image>)"
    name: Literal["folder"] = "folder"
    root: str | None = Field(None, description="the folder of the class tree (with train/, val/, test/ sub-trees, "
                             "or one tree split by val_fraction/test_fraction)")
    image_size: int = Field(28, ge=8, le=1024, description="images are brought to size x size")
    rotations: bool = Field(False, description="90-degree rotations as new classes (training; validation/test "
                            "too unless eval.rotations is set): for handwriting like Omniglot, not for photos "
                            "or digits")
    fit: Literal["squash", "crop"] = Field(
        "squash", description="squash: resize to image_size x image_size; crop: shorter side to image_size, then "
        "the centre square (no distortion; small images are upscaled)")
    channels: Literal[1, 3] | None = Field(
        None, description="1 grayscale or 3 RGB; None infers it and refuses mixed modes")
    invert: bool = Field(False, description="invert intensities (dark ink on white -> high)")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="without train/val/test: share of classes for "
                                "validation")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="without train/val/test: share of classes for test")
    split_seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the class split")

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self

    @property
    def in_channels(self) -> int:
        return self.channels or 1

    @property
    def invert_images(self) -> bool:
        return self.invert

    def split_description(self) -> str:
        """How :meth:`load_splits` divides the classes (printed and stored when training starts)."""
        root = Path(self.root) if self.root is not None else None
        if root is not None and all((root / s).is_dir() for s in ("train", "val", "test")):
            return f"the train/, val/ and test/ folders of {short_repr(self.root)}"
        return (f"the classes of {short_repr(self.root)} split at random: data.val_fraction={self.val_fraction:g}, "
                f"data.test_fraction={self.test_fraction:g}, data.split_seed={self.split_seed}")

    def load_splits(self) -> dict[str, ImageClasses]:
        if self.root is None:
            raise DataError(
                "Config: data.root must be the folder of your class tree for data.name 'folder'; got None. "
                "Set data.root (or --set data.root=PATH)."
            )
        root = Path(self.root)
        from .loader import default_workers  # noqa: PLC0415
        from .source import memory_budget_bytes  # noqa: PLC0415

        workers = default_workers() if self.workers is None else self.workers
        storage = self.storage
        if storage == "auto":
            n = sum(len(fs) for _, _, fs in _scan(root)) if not all((root / s).is_dir() for s in ("train", "val", "test")) \
                else sum(len(fs) for s in ("train", "val", "test") for _, _, fs in _scan(root / s))
            storage = "memory" if n * (self.channels or 3) * self.image_size ** 2 <= memory_budget_bytes(
                self.memory_budget_gb) else "lazy"

        def load(p: Path) -> ImageClasses:
            return load_image_folder(p, self.image_size, self.channels, self.invert, self.cache_dir, self.fit,
                                     storage, workers)

        if all((root / s).is_dir() for s in ("train", "val", "test")):
            return {s: load(root / s) for s in ("train", "val", "test")}
        return split_by_fractions(load(root), self.val_fraction, self.test_fraction, self.split_seed)
