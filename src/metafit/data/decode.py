"""The one image reader and conversion every metafit reader uses.

:func:`open_image` opens a file (or file object) lazily, refuses images over the pixel limit from
their header before anything is decoded, and turns every failure into a one-line
:class:`~metafit.errors.DataError` naming the image (:class:`ImageTooLargeError` for images over
the limit). The limit is :data:`DEFAULT_MAX_IMAGE_PIXELS` (89,478,485 pixels, Pillow's own warning
threshold, about 9459 x 9459), or the environment variable ``METAFIT_MAX_IMAGE_PIXELS`` where it is
set; the service passes its own (``ServeLimits.max_image_pixels``). PIL images handed to the Python
API are checked against the same limit before they are converted (:mod:`metafit.data.images`).
:func:`image_array` / :func:`read_image` convert one image to uint8 ``[C, H, W]``.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
import zlib
from contextlib import contextmanager
from typing import IO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, DataError, MetafitError, short_repr

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "MAX_IMAGE_PIXELS_ENV", "ImageTooLargeError", "check_image_size",
           "DECODE_ERRORS", "decoded_bytes", "image_array", "max_image_pixels", "open_image", "quote_path", "read_image", "to_mode", "unreadable"]

#: the most pixels (width x height) an image may have, checked from its header before decoding
#: (Pillow's warning threshold; its own error comes only at twice this)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
#: the environment variable that overrides :data:`DEFAULT_MAX_IMAGE_PIXELS` (a positive integer)
MAX_IMAGE_PIXELS_ENV = "METAFIT_MAX_IMAGE_PIXELS"

#: what an image fails with while it is opened or decoded (truncated, corrupt, foreign data)
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError,
                  KeyError, struct.error, zlib.error, zipfile.BadZipFile)


class ImageTooLargeError(DataError):
    """An image has more pixels than the limit (the service answers 413)."""


def max_image_pixels() -> int:
    """The pixel limit in force: ``METAFIT_MAX_IMAGE_PIXELS`` where set, else
    :data:`DEFAULT_MAX_IMAGE_PIXELS` (read at each call, so worker processes agree)."""
    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"Images: {MAX_IMAGE_PIXELS_ENV} must be a positive whole number of pixels; got {short_repr(raw)}. "
            f"Set it to e.g. {DEFAULT_MAX_IMAGE_PIXELS} or unset it."
        )
    return value


def decoded_bytes(im: Image.Image) -> int:
    """Bytes ``im`` takes once decoded (Pillow keeps 1 byte a pixel for 1/L/P, 2 for 16-bit
    grayscale and 4 for every multi-band or 32-bit mode), known from its header."""
    w, h = im.size
    per_pixel = 1 if im.mode in ("1", "L", "P") else 2 if im.mode.startswith("I;16") else 4
    return w * h * per_pixel


def quote_path(path: str | os.PathLike) -> str:
    """A path quoted for an error message: whole where it is of a sane length (a user must find
    the file), else its start and its end (the file name) around an ellipsis."""
    text = repr(str(path))
    return text if len(text) <= 240 else f"{text[:100]} ... {text[-136:]}"


def _too_large(where: str, got: str, limit: int, fix: str | None) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"Images: {where} must have at most {limit} pixels (width x height); got {got}. "
        + (fix or f"Downscale it, or raise the limit with the environment variable {MAX_IMAGE_PIXELS_ENV}.")
    )


def check_image_size(size: tuple[int, int], where: str, max_pixels: int | None = None,
                     fix: str | None = None) -> None:
    """Refuse an image of ``size`` (width, height) over the pixel limit with :class:`ImageTooLargeError`."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    w, h = size
    if w * h > limit:
        raise _too_large(where, f"{w}x{h} = {w * h} pixels", limit, fix)


def _reason(err: BaseException) -> str:
    """Why an image did not decode, without Python reprs of in-memory objects."""
    if isinstance(err, UnidentifiedImageError):
        return "data in no known image format"
    text = re.sub(r"<[^<>]*? at 0x[0-9a-fA-F]+>", "the data", str(err)).strip()
    text = " ".join(text.split())
    if len(text) > 100:
        text = text[:96] + " ..."
    return text or type(err).__name__


def _pil_not_stricter(limit: int) -> None:
    """Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` while opening them; where the
    metafit limit was raised beyond that, raise Pillow's so that metafit's limit is the one."""
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit


@contextmanager
def open_image(source: str | os.PathLike | IO[bytes], where: str, max_pixels: int | None = None,
               fix: str | None = None) -> Iterator[Image.Image]:
    """The one image reader: ``source`` (a path or a binary file object) opened lazily, its
    size checked against the pixel limit (``max_pixels``, default :func:`max_image_pixels`)
    before anything is decoded. Whatever fails inside the block while decoding or converting
    becomes a one-line DataError naming ``where``; the image is closed on leaving."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    _pil_not_stricter(limit)
    try:
        im = Image.open(source)
    except Image.DecompressionBombError as err:  # only where Pillow's limit is set below ours
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_large(where, f"{found.group(1)} pixels" if found else "more", limit, fix) from err
    except DECODE_ERRORS as err:
        raise unreadable(where, err) from err
    try:
        check_image_size(im.size, where, limit, fix)
        yield im
    except MetafitError:
        raise
    except DECODE_ERRORS as err:
        raise unreadable(where, err) from err
    finally:
        im.close()

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


def unreadable(where: str, err: BaseException) -> DataError:
    return DataError(
        f"Images: {where} must be a readable image (PNG, JPEG, ...); got an unreadable file ({_reason(err)}). "
        "Remove or replace the file."
    )


def read_image(path: str | os.PathLike, image_size: int, channels: int, invert: bool = False,
               fit: str = "squash") -> np.ndarray:
    """Decode the image file ``path`` to uint8 ``[channels, image_size, image_size]`` (``invert``
    and ``fit`` as in :func:`image_array`); a one-line DataError if unreadable or over the pixel limit."""
    with open_image(path, quote_path(path)) as im:
        return image_array(im, image_size, channels, invert, fit)


