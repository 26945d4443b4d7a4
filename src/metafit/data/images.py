"""Users' images -> model input, converted exactly as the training images were.

A model's :class:`ImageFormat` (size, channels, ink polarity) follows from the data section of
the config stored in its checkpoint, so nothing is guessed at prediction time: Omniglot models
read grayscale with dark ink on a light background turned to high values; folder-trained models
use the channels and ``invert`` they were trained with. Inputs may be file paths, PIL images,
numpy arrays (H x W, H x W x C; uint8, or floats in [0, 1]) or torch tensors; a float tensor that
already has the model's shape ([C, H, W] or [N, C, H, W] at the model's size, values in [0, 1])
is taken as converted, like the tensors the episode samplers produce.

Polarity: ``polarity="as_trained"`` converts exactly as the training images were; ``"flip"``
inverts every image relative to that (light-on-dark images for a model trained on dark ink on a
light background, and the reverse); ``"auto"`` decides per image from its border (the median of
the outer 2-pixel frame, after conversion) for formats with a polarity convention (grayscale,
inverted like Omniglot: :attr:`ImageFormat.background`), flipping only the images whose
background is the opposite of the training images'; other formats are left as trained.
:func:`convert_images_polarity` also reports what was used (:class:`PolarityUse`).

Float input must already be scaled to [0, 1] (within :data:`FLOAT_TOLERANCE`), and integer input
must lie in 0-255: a float image of 0-255 values, or NaN/inf, is a one-line
:class:`~metafit.errors.DataError` (divide by 255, or pass uint8), never a silently wrong prediction.

Files are read by the one image reader (:func:`metafit.data.decode.open_image`), and PIL images
are checked against the same pixel limit (``METAFIT_MAX_IMAGE_PIXELS``, default 89,478,485)
before they are decoded: an image over it is a one-line :class:`~metafit.data.decode.ImageTooLargeError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .decode import check_image_size, read_image
from .store import ImageFormat, PolarityUse, check_polarity, polarity_flips

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

__all__ = ["FLOAT_TOLERANCE", "IMAGE_SUFFIXES", "ImageFormat", "PolarityUse", "convert_images",
           "convert_images_polarity", "list_images", "list_labelled_images"]

#: how far float pixel values may stray outside [0, 1] (rounding of a division by 255, resampling)
FLOAT_TOLERANCE = 1e-3


def _out_of_range(where: str, lo: float, hi: float, finite: bool, dtype: object) -> DataError:
    if not finite:
        got, fix = "NaN or infinite values", "Replace them with pixel values in [0, 1]."
    else:
        got = f"values from {lo:.4g} to {hi:.4g}"
        fix = ("Divide 0-255 values by 255 (x / 255.0), or pass them as uint8 (numpy: x.astype(np.uint8); "
               "torch: x.to(torch.uint8)).")
    return DataError(f"Images: {where} ({dtype}) must hold float values in [0, 1]; got {got}. {fix}")


def _check_float_tensor(x: torch.Tensor, where: str, batch: bool = False) -> None:
    """Refuse float pixel values outside [0, 1] (beyond :data:`FLOAT_TOLERANCE`) and NaN/inf;
    ``x`` is one image, or with ``batch`` a batch [N, ...] (the message names the first bad image)."""
    bad = ~torch.isfinite(x) | (x < -FLOAT_TOLERANCE) | (x > 1.0 + FLOAT_TOLERANCE)
    if not bool(bad.any()):
        return
    if batch:  # name the first image that is out of range
        i = int(bad.flatten(1).any(1).nonzero()[0, 0])
        x, where = x[i], f"image {i}"
    finite = bool(torch.isfinite(x).all())
    lo, hi = (float(v) for v in torch.aminmax(x.float())) if finite else (0.0, 0.0)
    raise _out_of_range(where, lo, hi, finite, x.dtype)


def _check_array(arr: np.ndarray, where: str) -> None:
    """Float arrays: values in [0, 1] (see :func:`_check_float_tensor`); integer arrays: 0-255."""
    if arr.size == 0:
        return
    if np.issubdtype(arr.dtype, np.floating):
        finite = bool(np.isfinite(arr).all())
        lo, hi = (float(arr.min()), float(arr.max())) if finite else (0.0, 0.0)
        if not finite or lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
            raise _out_of_range(where, lo, hi, finite, arr.dtype)
    elif np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"Images: {where} ({arr.dtype}) must hold integer values in 0-255; got values from {lo} to {hi}. "
                "Rescale them to 0-255 and pass uint8, or pass floats in [0, 1]."
            )


class _Converter:
    """Conversion of users' images to model input for one :class:`ImageFormat`."""

    def __init__(self, fmt: ImageFormat) -> None:
        self.fmt = fmt
        self.size, self.channels, self.invert = fmt.size, fmt.channels, fmt.invert

    def _from_pil(self, im: Image.Image, where: str = "an image") -> np.ndarray:
        check_image_size(im.size, where)  # a lazily opened image is not decoded yet: refuse bombs first
        try:
            return self.fmt.array(im)
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise DataError(
                f"Images: {where} must be a readable image; got one that does not decode ({type(err).__name__}). "
                "Pass a complete, valid image."
            ) from err

    def _one(self, item: Any, where: str) -> np.ndarray | torch.Tensor:
        if isinstance(item, (str, os.PathLike)):
            if not Path(item).is_file():
                raise DataError(f"Images: {where} must be an existing image file; got {str(item)!r}. Check the path.")
            return read_image(item, self.size, self.channels, self.invert, self.fmt.fit)
        if isinstance(item, Image.Image):
            return self._from_pil(item, where)
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and tuple(item.shape) == (self.channels, self.size, self.size):
                _check_float_tensor(item.detach(), where)
                return item.detach().float()
            item = item.detach().cpu()
            item = (item.float() if item.dtype in (torch.bfloat16, torch.float16) else item).numpy()
        if isinstance(item, np.ndarray):
            arr = item
            if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
                arr = arr.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
                raise DataError(
                    f"Images: {where} must be an H x W or H x W x 3/4 array; got shape {tuple(item.shape)}. "
                    "Pass one image per item."
                )
            _check_array(arr, where)
            if np.issubdtype(arr.dtype, np.floating):
                arr = np.clip(arr * 255.0, 0, 255).round()
            return self._from_pil(Image.fromarray(arr.astype(np.uint8)))
        raise DataError(
            f"Images: {where} must be a file path, PIL image, numpy array or tensor; got "
            f"{type(item).__name__}. Convert it to one of those."
        )

    def convert(self, images: Any, polarity: str = "as_trained") -> tuple[torch.Tensor, PolarityUse]:
        """Float tensor [N, channels, size, size] in [0, 1] from one image or a sequence of them
        (or a batch tensor / array [N, ...]), with ``polarity`` applied, and what was used."""
        check_polarity(polarity)
        x = self._convert(images)
        flip = polarity_flips(self.fmt, x, polarity)
        if bool(flip.any()):
            x = torch.where(flip.to(x.device)[:, None, None, None], 1.0 - x, x)  # never in place: x may be the caller's
        return x, PolarityUse(polarity, int(flip.sum()), int(x.shape[0]), self.fmt.background)

    def _convert(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            if images.is_floating_point() and tuple(images.shape[1:]) == (self.channels, self.size, self.size):
                _check_float_tensor(images.detach(), "images", batch=True)
                return images.detach().float()
            images = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, (str, os.PathLike, Image.Image, torch.Tensor, np.ndarray)):
            images = [images]
        items = list(images)
        if not items:
            raise DataError("Images: at least one image must be given; got none. Pass files, arrays or tensors.")
        out = []
        for i, item in enumerate(items):
            x = self._one(item, f"image {i}" if not isinstance(item, (str, os.PathLike)) else f"image {str(item)!r}")
            out.append(x if isinstance(x, torch.Tensor) else torch.from_numpy(np.require(x, requirements=["C", "W"])).float() / 255.0)
        return torch.stack(out)


def list_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by ``paths``: files as given, folders searched recursively (sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"Images: {str(p)!r} must be an image file or a folder; got nothing there. Check the path.")
    if not found:
        raise DataError(
            f"Images: the paths must hold at least one image ({', '.join(sorted(IMAGE_SUFFIXES))}); got none. "
            "Point at image files or folders of them."
        )
    return found


def list_labelled_images(root: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """A support set as a class-per-folder tree: ``root/<label>/<image>`` -> (files, labels)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"Support: {str(root)!r} must be a folder with one sub-folder per class; got no folder. Check the path."
        )
    files, labels = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        stray = sorted(f for f in d.iterdir() if f.is_dir() and not f.name.startswith("."))
        if stray:
            raise DataError(
                f"Support: class folder {str(d)!r} must hold image files only; got the folder {str(stray[0])!r}. "
                "Move its images into a label folder of their own (root/<label>/<image>) or remove it."
            )
        imgs = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        files += imgs
        labels += [d.name] * len(imgs)
    if not files:
        raise DataError(
            f"Support: {str(root)!r} must contain class folders with images (root/<label>/<image>); got none. "
            "Arrange the support images one folder per label."
        )
    return files, labels


def convert_images(fmt: ImageFormat, images: Any, polarity: str = "as_trained") -> torch.Tensor:
    """Float tensor [N, channels, size, size] in [0, 1] of users' images (paths, PIL images,
    arrays, tensors, or a sequence of them) converted as ``fmt`` says, with ``polarity``
    (``as_trained``, ``flip`` or ``auto``; see the module notes)."""
    return _Converter(fmt).convert(images, polarity)[0]


def convert_images_polarity(fmt: ImageFormat, images: Any, polarity: str = "auto") -> tuple[torch.Tensor, PolarityUse]:
    """:func:`convert_images` and the polarity used (:class:`PolarityUse`: how many images were
    flipped relative to the training polarity)."""
    return _Converter(fmt).convert(images, polarity)
