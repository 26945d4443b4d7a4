"""The published class splits that ship with metafit (``metafit/data/splits/*.json``) and the
helpers every reader of a split benchmark uses: read a split file, locate a dataset folder or
archive, and cut a collection of all classes into the published train/val/test splits."""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError
from .classes import ImageClasses

__all__ = ["find_root", "published_split", "split_classes"]

log = logging.getLogger(__name__)


def published_split(name: str) -> dict[str, Any]:
    """The split file ``<name>.json`` of the package: ``splits`` (``train``/``val``/``test``
    class lists), ``source``, ``reference`` and per-dataset extras."""
    with resources.files("metafit").joinpath("data", "splits", f"{name}.json").open() as f:
        return json.load(f)


def find_root(root: str | None, env: str, owner: str, layout: str, default: Path | None = None) -> Path:
    """``root``, else the environment variable ``env``, else ``default``; a one-line
    :class:`DataError` naming the expected ``layout`` when none exists."""
    chosen = root or os.environ.get(env) or (str(default) if default is not None else None)
    if chosen is None:
        raise DataError(
            f"{owner}: data.root must point at the dataset ({layout}); got None. Set data.root (or --data-dir, "
            f"or the {env} environment variable)."
        )
    path = Path(chosen).expanduser()
    if not path.exists():
        raise DataError(
            f"{owner}: data.root must be an existing folder or file ({layout}); got {str(path)!r}. "
            f"Point data.root (or {env}) at the dataset."
        )
    return path


def split_classes(data: ImageClasses, split: dict[str, list[str]], owner: str, layout: str,
                  allow_missing: int = 0) -> dict[str, ImageClasses]:
    """``data`` (all classes, named by their published identifiers) cut into the published
    ``split``. A class of the split that ``data`` lacks is an error naming it and the expected
    ``layout``; with ``allow_missing`` > 0, up to that many missing classes are logged and left
    out (a copy of a dataset with a few classes fewer than the one the split was made on)."""
    index = {n: i for i, n in enumerate(data.class_names)}
    missing = [c for s in ("train", "val", "test") for c in split[s] if c not in index]
    if missing and len(missing) > allow_missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{owner}: the data must hold every class of the published split ({layout}); got {len(missing)} "
            f"missing: {shown}. Point data.root at a complete copy of the dataset."
        )
    if missing:
        log.warning("%s: %d classes of the published split are not in this copy and are left out: %s",
                    owner, len(missing), ", ".join(missing))
    return {s: data.subset([index[c] for c in split[s] if c in index]) for s in ("train", "val", "test")}
