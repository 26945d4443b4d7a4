"""Images kept as files and decoded on demand (``data.storage: lazy``), how images are converted
for a model (:class:`ImageFormat`), and their polarity.

A :class:`FileImages` store holds, per image, where its bytes are (a file, or a member of a zip
archive) and how to convert them (:class:`ImageFormat`); ``read(i)`` decodes one image to uint8
``[C, H, W]`` with the one reader of :mod:`metafit.data.decode`. It holds no open files when
pickled, so DataLoader worker processes get a copy and open their own archive handles.
``decode_all`` turns a store into the in-memory uint8 tensor of ``data.storage: memory`` with the
same image order, so both storage modes index the same images.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError, short_repr
from .decode import DECODE_ERRORS, image_array, open_image, quote_path, unreadable

__all__ = ["FileImages", "ImageFormat", "ImageStore", "decode_all", "stat_fingerprint",
           "POLARITIES", "PolarityImages", "PolarityUse", "border_level", "check_polarity", "polarity_flips"]


@dataclass(frozen=True)
class ImageFormat:
    """How an image becomes model input: ``size`` x ``size``, ``channels`` (1 or 3), intensities
    inverted or not (``invert``), and ``fit`` (``squash`` or ``crop``, see :func:`image_array`). Frozen.

    >>> fmt = ImageFormat(size=28, channels=1, invert=True)
    >>> fmt.describe()
    'grayscale 28x28, inverted (dark ink -> high)'
    >>> fmt.to_dict()
    {'size': 28, 'channels': 1, 'invert': True, 'fit': 'squash'}
    """

    size: int
    channels: int
    invert: bool
    fit: str = "squash"

    def to_dict(self) -> dict[str, Any]:
        """The four fields as a plain dict (``ImageFormat(**d)`` rebuilds it)."""
        return asdict(self)

    def describe(self) -> str:
        """A short human-readable description, e.g. ``"RGB 84x84, centre-cropped"``."""
        mode = "grayscale" if self.channels == 1 else "RGB"
        ink = ", inverted (dark ink -> high)" if self.invert else ""
        fit = ", centre-cropped" if self.fit == "crop" else ""
        return f"{mode} {self.size}x{self.size}{fit}{ink}"

    @property
    def background(self) -> str | None:
        """The background of the training images before any inversion, where the format implies
        one: ``"light"`` for grayscale inverted formats (dark ink on a light background, like
        Omniglot), else None (no polarity convention: ``polarity="auto"`` leaves images as they are)."""
        return "light" if self.channels == 1 and self.invert else None

    @property
    def input_background(self) -> str | None:
        """The background of model input (after the inversion): ``"dark"``, ``"light"`` or None."""
        if self.background is None:
            return None
        return {"light": "dark", "dark": "light"}[self.background] if self.invert else self.background

    def array(self, im: Image.Image) -> np.ndarray:
        """The PIL image ``im`` converted to this format: uint8 ``[channels, size, size]``."""
        return image_array(im, self.size, self.channels, self.invert, self.fit)

    def convert(self, images: Any, polarity: str = "as_trained") -> torch.Tensor:
        """Float tensor [N, channels, size, size] in [0, 1] from one image or a sequence of them
        (paths, PIL images, arrays, tensors; see :mod:`metafit.data.images`); ``polarity`` as
        in :func:`polarity_flips`."""
        from .images import convert_images  # noqa: PLC0415 (images builds on this module)

        return convert_images(self, images, polarity)


#: how users' images relate to the training polarity: ``auto`` (detected per image from its
#: border, for formats with a polarity convention), ``as_trained`` (converted exactly as the
#: training images), ``flip`` (the other polarity: intensities inverted relative to training)
POLARITIES = ("auto", "as_trained", "flip")
#: the outer frame (pixels) whose median intensity is taken as an image's background
BORDER_WIDTH = 2
#: a border median within this distance of mid-gray decides nothing (the image is left as is)
BORDER_MARGIN = 0.15


def check_polarity(polarity: Any, owner: str = "Images", fix: str | None = None) -> str:
    """``polarity`` if it is one of :data:`POLARITIES`, else a one-line ConfigError."""
    if not isinstance(polarity, str) or polarity not in POLARITIES:
        raise ConfigError(
            f"{owner}: polarity must be one of {', '.join(repr(p) for p in POLARITIES)}; got {short_repr(polarity)}. "
            + (fix or "Pass 'auto' (detect from each image's border), 'as_trained' or 'flip'.")
        )
    return polarity


def border_level(images: torch.Tensor | np.ndarray, width: int = BORDER_WIDTH) -> torch.Tensor:
    """Median intensity in [0, 1] of the outer ``width``-pixel frame of every image of
    ``images`` ([N, C, H, W]; uint8, or floats in [0, 1]), over all channels: [N]."""
    x = torch.as_tensor(images)
    x = x.float() / 255.0 if not x.is_floating_point() else x.float()
    n, _, h, w = x.shape
    wy, wx = min(width, h), min(width, w)
    frame = torch.cat([x[:, :, :wy].flatten(1), x[:, :, h - wy:].flatten(1),
                       x[:, :, wy:h - wy, :wx].flatten(1), x[:, :, wy:h - wy, w - wx:].flatten(1)], dim=1)
    return frame.median(dim=1).values if frame.shape[1] else torch.full((n,), 0.5)


def polarity_flips(fmt: ImageFormat, images: torch.Tensor | np.ndarray, polarity: str) -> torch.Tensor:
    """Which of ``images`` (model input [N, C, H, W], converted as trained) to invert: none for
    ``as_trained``, all for ``flip``; for ``auto`` those whose border (the median of the outer
    2-pixel frame) says their background is the opposite of the training images' input
    background. Formats without a polarity convention (:attr:`ImageFormat.background` None) and
    images whose border is near mid-gray are never flipped by ``auto``."""
    n = len(images)
    if polarity == "flip":
        return torch.ones(n, dtype=torch.bool)
    if polarity != "auto" or fmt.input_background is None or n == 0:
        return torch.zeros(n, dtype=torch.bool)
    level = border_level(images)
    if fmt.input_background == "dark":
        return level > 0.5 + BORDER_MARGIN
    return level < 0.5 - BORDER_MARGIN


@dataclass(frozen=True)
class PolarityUse:
    """Which polarity a set of images was read with: ``requested`` (one of :data:`POLARITIES`),
    ``flipped`` of ``images`` inverted relative to the training polarity, and the format's
    convention (``background``: the training images' background before inversion, or None)."""

    requested: str
    flipped: int
    images: int
    background: str | None = None

    @property
    def used(self) -> str:
        """``as_trained`` (nothing flipped), ``flip`` (all flipped) or ``mixed``."""
        if self.flipped == 0:
            return "as_trained"
        return "flip" if self.flipped == self.images else "mixed"

    def merge(self, other: "PolarityUse") -> "PolarityUse":
        return PolarityUse(self.requested, self.flipped + other.flipped, self.images + other.images, self.background)

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "used": self.used, "flipped": self.flipped, "images": self.images,
                "training_background": self.background}

    def describe(self) -> str:
        conv = (f"training images: dark on a {self.background} background" if self.background
                else "no polarity convention")
        what = {"as_trained": "as trained", "flip": "flipped (other polarity)",
                "mixed": f"{self.flipped} of {self.images} images flipped"}[self.used]
        return f"polarity {what} (requested {self.requested}; {conv})"


class ImageStore:
    """Base of image stores that decode on demand: subclasses set ``fmt`` and implement
    ``__len__`` and ``read(i)`` (uint8 ``[C, size, size]``); the rest follows."""

    fmt: ImageFormat

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.fmt.channels, self.fmt.size, self.fmt.size)

    @property
    def nbytes(self) -> int:
        """Bytes the decoded uint8 images would take in memory."""
        n, c, h, w = self.shape
        return n * c * h * w

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode ``indices`` in this process: uint8 ``[len(indices), C, H, W]``."""
        idx = torch.as_tensor(indices).reshape(-1).tolist()
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        for j, i in enumerate(idx):
            out[j] = self.read(i)
        return torch.from_numpy(out)

    def __getitem__(self, indices) -> torch.Tensor:
        return self.fetch(indices)


class FileImages(ImageStore):
    """Images decoded on demand: image ``i`` is ``members[i]`` inside ``archives[archive_of[i]]``
    (a zip file), or the file ``members[i]`` itself where ``archive_of[i]`` is -1 (the default
    ``archive_of`` of ``None``: every member is a file). ``fmt``: the :class:`ImageFormat` every image
    is converted to."""

    def __init__(self, members: list[str], fmt: ImageFormat, archives: tuple[str, ...] = (),
                 archive_of: np.ndarray | None = None) -> None:
        self.members = np.array(members, dtype=object if not members else None)
        if self.members.dtype.kind == "U":  # one compact block: no per-string objects for workers to copy
            self.members = np.char.encode(self.members, "utf-8")
        self.fmt = fmt
        self.archives = tuple(str(a) for a in archives)
        n = len(members)
        self.archive_of = (np.full(n, -1, dtype=np.int32) if archive_of is None
                           else np.asarray(archive_of, dtype=np.int32))
        self._handles: dict[int, zipfile.ZipFile] = {}
        self._pid = os.getpid()

    # a store is shared with worker processes: never pickle open archive handles
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        """Where image ``i`` is, for messages: its file, or ``archive:member``."""
        m = self.members[i]
        member = m.decode("utf-8") if isinstance(m, bytes) else str(m)
        a = int(self.archive_of[i])
        return member if a < 0 else f"{self.archives[a]}:{member}"

    def _archive(self, a: int) -> zipfile.ZipFile:
        if os.getpid() != self._pid:  # a forked worker: the parent's handles share file offsets
            self._handles, self._pid = {}, os.getpid()
        zf = self._handles.get(a)
        if zf is None:
            try:
                zf = self._handles[a] = zipfile.ZipFile(self.archives[a])
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(
                    f"Images: {self.archives[a]!r} must be a readable zip archive; got an unreadable file "
                    f"({err}). Re-create or re-download it."
                ) from err
        return zf

    def read(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``[C, size, size]``; a DataError naming the file if unreadable."""
        i = int(i)
        a = int(self.archive_of[i])
        m = self.members[i]
        member = m.decode("utf-8") if isinstance(m, bytes) else str(m)
        where = quote_path(self.name(i))
        if a < 0:
            source: Any = member
        else:
            try:
                source = io.BytesIO(self._archive(a).read(member))
            except DataError:
                raise
            except DECODE_ERRORS as err:
                raise unreadable(where, err) from err
        with open_image(source, where) as im:
            return self.fmt.array(im)


class PolarityImages(ImageStore):
    """An :class:`ImageStore` (or uint8 tensor ``[N, C, H, W]``) read with ``polarity``: image
    ``i`` is inverted where :func:`polarity_flips` says so (decided per image on read)."""

    def __init__(self, base: Any, fmt: ImageFormat, polarity: str) -> None:
        self.base, self.fmt, self.polarity = base, fmt, polarity

    def __len__(self) -> int:
        return len(self.base)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def nbytes(self) -> int:
        n, c, h, w = self.shape
        return n * c * h * w

    def read(self, i: int) -> np.ndarray:
        return self.fetch(torch.tensor([int(i)]))[0].numpy()

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices).reshape(-1)
        x = self.base.fetch(idx) if hasattr(self.base, "fetch") else self.base[idx]
        flip = polarity_flips(self.fmt, x, self.polarity)
        if bool(flip.any()):
            x = x.clone()
            x[flip] = 255 - x[flip]
        return x

    def __getitem__(self, indices) -> torch.Tensor:
        return self.fetch(indices)


def decode_all(store: ImageStore, workers: int = 0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Every image of ``store`` as one uint8 tensor ``[n, C, H, W]`` (index order kept), decoded
    by ``workers`` processes (0: in this one)."""
    from .loader import decode_batches  # noqa: PLC0415 (loader imports this module)

    out = torch.empty(store.shape, dtype=torch.uint8)
    for start, images in decode_batches(store, workers):
        out[start:start + len(images)] = images
        if progress is not None:
            progress(len(images))
    return out


def stat_fingerprint(paths: list[Path], root: Path) -> str:
    """A cheap fingerprint of a file list: relative names, sizes and modification times."""
    parts = []
    for f in paths:
        st = f.stat()
        parts.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)
