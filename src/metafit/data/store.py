"""Images kept as files and decoded on demand (``data.storage: lazy``), and the one image
conversion every reader uses.

A :class:`FileImages` store holds, per image, where its bytes are (a file, or a member of a zip
archive) and how to convert them (:class:`ImageFormat`); ``read(i)`` decodes one image to uint8
``[C, H, W]``. It holds no open files when pickled, so DataLoader worker processes get a copy
and open their own archive handles. ``decode_all`` turns a store into the in-memory uint8
tensor of ``data.storage: memory`` with the same image order, so both storage modes index the
same images.
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
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

__all__ = ["FileImages", "ImageFormat", "ImageStore", "decode_all", "image_array", "read_image", "to_mode"]

_HAS_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """``im`` as grayscale (``channels=1``) or RGB: palette, CMYK, 16-bit and other modes are
    converted; transparent pixels are composited over white."""
    if im.mode in _HAS_ALPHA or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F") and channels == 3:
        im = im.convert("L")  # PIL converts high-bit-depth grayscale to RGB only through 8-bit
    return im.convert("L" if channels == 1 else "RGB")


def image_array(im: Image.Image, image_size: int, channels: int, invert: bool = False,
                fit: str = "squash") -> np.ndarray:
    """One PIL image as uint8 ``[channels, size, size]``: converted to grayscale or RGB, resized
    with Lanczos (``fit="squash"``: to size x size whatever its aspect; ``"crop"``: the shorter
    side to size, then the centre square, so nothing is distorted and small images are
    upscaled), intensities inverted if asked. The one conversion every image reader uses."""
    im = to_mode(im, channels)
    if im.size != (image_size, image_size):
        if fit == "crop":
            im = ImageOps.fit(im, (image_size, image_size), Image.Resampling.LANCZOS)
        else:
            im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.array(im, dtype=np.uint8)
    if invert:
        arr = 255 - arr
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@dataclass(frozen=True)
class ImageFormat:
    """How an image becomes model input: ``size`` x ``size``, ``channels`` (1 or 3), intensities
    inverted or not, and ``fit`` (``squash`` or ``crop``, see :func:`image_array`)."""

    size: int
    channels: int
    invert: bool
    fit: str = "squash"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        mode = "grayscale" if self.channels == 1 else "RGB"
        ink = ", inverted (dark ink -> high)" if self.invert else ""
        fit = ", centre-cropped" if self.fit == "crop" else ""
        return f"{mode} {self.size}x{self.size}{fit}{ink}"

    def array(self, im: Image.Image) -> np.ndarray:
        return image_array(im, self.size, self.channels, self.invert, self.fit)

    def convert(self, images: Any) -> torch.Tensor:
        """Float tensor [N, channels, size, size] in [0, 1] from one image or a sequence of them
        (paths, PIL images, arrays, tensors; see :mod:`metafit.data.images`)."""
        from .images import convert_images  # noqa: PLC0415 (images builds on this module)

        return convert_images(self, images)


def _unreadable(where: str, err: Exception) -> DataError:
    return DataError(
        f"Images: {where} must be a readable image; got an unreadable file ({err}). Remove or replace the file."
    )


def read_image(path: str | os.PathLike, image_size: int, channels: int, invert: bool = False,
               fit: str = "squash") -> np.ndarray:
    """Decode one image file to uint8 ``[channels, size, size]``; a one-line DataError if unreadable."""
    try:
        with Image.open(path) as im:
            return image_array(im, image_size, channels, invert, fit)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(repr(str(path)), err) from err


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
    (a zip file), or the file ``members[i]`` itself where ``archive_of[i]`` is -1."""

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
        try:
            if a < 0:
                with Image.open(member) as im:
                    return self.fmt.array(im)
            data = self._archive(a).read(member)
            with Image.open(io.BytesIO(data)) as im:
                return self.fmt.array(im)
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, KeyError, zipfile.BadZipFile,
                Image.DecompressionBombError) as err:
            raise _unreadable(repr(self.name(i)), err) from err


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
