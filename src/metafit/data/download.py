"""Checksum-verified downloads. The file appears under its final name only after its checksum
matched; a failed or mismatching download leaves nothing that looks valid."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DownloadError
from .cache import default_file_mode

__all__ = ["download_file"]


def download_file(url: str, dest: str | os.PathLike, checksum: str, timeout: float = 60.0, progress=None) -> Path:
    """Download ``url`` to ``dest`` and verify ``checksum`` (``"md5:<hex>"`` or ``"sha256:<hex>"``).

    If ``dest`` already exists with the right checksum it is kept; with a wrong one it is replaced.
    ``progress``, if given, is called with ``(bytes_done, bytes_total_or_None)``; ``timeout`` is the
    network timeout in seconds. Returns ``dest`` as a :class:`~pathlib.Path`. A bad ``checksum``
    string, a failed download or a mismatching digest is a :class:`~metafit.errors.DownloadError`
    (nothing partial is left behind).
    """
    dest = Path(dest)
    algo, _, expected = checksum.partition(":")
    if algo not in ("md5", "sha256") or not expected:
        raise DownloadError(
            f"download: checksum must be 'md5:<hex>' or 'sha256:<hex>'; got {checksum!r}. "
            "Pass the published digest of the file."
        )
    if dest.exists() and _digest(dest, algo) == expected.lower():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    os.chmod(tmp, default_file_mode())
    h = hashlib.new(algo)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    total = resp.headers.get("Content-Length")
                    total = int(total) if total and total.isdigit() else None
                    done = 0
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise DownloadError(
                    f"download: {url} could not be fetched ({err}). Check the network connection, "
                    f"or download the file by hand and place it at {dest}."
                ) from err
        got = h.hexdigest()
        if got != expected.lower():
            raise DownloadError(
                f"download: {algo} checksum of {url} must be {expected}; got {got}. The file is "
                "corrupted or was changed upstream; nothing was kept. Retry, or report it if it repeats."
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
