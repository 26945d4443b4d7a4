"""Decoded-dataset cache: uint8 arrays in ``METAFIT_CACHE_DIR`` (default: the user's cache
folder), keyed by a fingerprint of the source, so a changed source is decoded again. Writes are
atomic; a damaged cache file is ignored and rebuilt."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .classes import ImageClasses

__all__ = ["cache_dir", "cached", "default_file_mode", "file_digest", "atomic_write_bytes"]

CACHE_FORMAT = 1


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get("METAFIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metafit"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 minus the umask): temp files are 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, writer: Callable[[object], None]) -> None:
    """Write through ``writer(fileobj)`` into a temp file beside ``path``, then rename. The file
    gets the usual permissions (not the temp file's owner-only 0o600)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # name the folder that cannot be made, not a temp path
        raise type(err)(err.errno, f"{err.strerror} (cannot create the folder)", str(path.parent)) from None
    if not path.parent.is_dir():
        raise NotADirectoryError(20, "Not a directory (a file has the folder's name)", str(path.parent))
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise type(err)(err.errno, f"{err.strerror} (cannot write there)", str(path)) from None
    try:
        os.chmod(tmp, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def cached(name: str, key: str, build: Callable[[], ImageClasses], directory: Path) -> ImageClasses:
    """Return the collection cached under ``name``/``key``, building and storing it if absent."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{key}".encode()).hexdigest()[:20]
    path = directory / f"{name}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return ImageClasses.from_arrays({k: z[k] for k in z.files})
        except Exception:  # damaged or truncated cache: rebuild it below
            pass
    data = build()
    atomic_write_bytes(path, lambda f: np.savez(f, **data.to_arrays()))
    return data
