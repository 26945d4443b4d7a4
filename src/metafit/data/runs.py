"""Lake et al.'s one-shot classification *runs* format, as distributed with Omniglot.

``<dir>/runNN/class_labels.txt`` holds lines pairing each test image with the training image of its
class; ``training/`` holds one image per class and ``test/`` the queries. Every run is one N-way
1-shot task. The official archive (``all_runs.zip``) writes the paths relative to the folder that
holds the runs (``runNN/test/itemXX.png runNN/training/classYY.png``); paths relative to the run
folder (``test/itemXX.png training/classYY.png``) are read too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..types import Task
from .folder import read_image

__all__ = ["load_runs"]


def _locate(name: str, run: Path, directory: Path, labels_file: Path, line: int) -> Path:
    """The file a class_labels.txt entry names: relative to the folder of the runs (the official
    archive) or to the run folder."""
    for base in (directory, run):
        path = base / name
        if path.is_file():
            return path
    raise DataError(
        f"Runs: line {line} of {str(labels_file)!r} must name an existing image relative to {str(directory)!r} "
        f"(official layout, e.g. {run.name}/test/item01.png) or to {str(run)!r}; got {name!r}. Restore the file "
        "or fix the line."
    )


def load_runs(directory: str | os.PathLike, image_size: int = 28, channels: int = 1,
              invert: bool = True) -> list[tuple[str, Task]]:
    """Read every ``runNN`` folder of ``directory`` as one task: ``[(run_name, Task)]``, the support
    set being the run's training images (one per class, labelled in file-name order) and the query
    set its test images. Images are preprocessed like Omniglot (``image_size`` x ``image_size``,
    ``channels``, ink high when ``invert``). A missing or malformed run is a
    :class:`~metafit.errors.DataError`."""
    directory = Path(directory)
    runs = sorted(p for p in directory.glob("run*") if p.is_dir())
    if not runs:
        raise DataError(
            f"Runs: {str(directory)!r} must contain runNN/ folders with class_labels.txt; got none. "
            "Pass the folder of Lake's one-shot runs (e.g. all_runs/)."
        )
    out = []
    for run in runs:
        labels_file = run / "class_labels.txt"
        if not labels_file.is_file():
            raise DataError(
                f"Runs: {str(run)!r} must contain class_labels.txt; got none. Restore the file or "
                "remove the run folder."
            )
        pairs = []
        for n, line in enumerate(labels_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(
                    f"Runs: line {n} of {str(labels_file)!r} must be 'test/<file> training/<file>'; "
                    f"got {line!r}. Fix the line."
                )
            pairs.append((_locate(parts[0], run, directory, labels_file, n),
                          _locate(parts[1], run, directory, labels_file, n)))
        train_files = sorted({t for _, t in pairs})
        index = {t: i for i, t in enumerate(train_files)}
        sx = np.stack([read_image(t, image_size, channels, invert) for t in train_files])
        qx = np.stack([read_image(q, image_size, channels, invert) for q, _ in pairs])
        task = Task(
            support_x=torch.from_numpy(sx).float() / 255.0,
            support_y=torch.arange(len(train_files)),
            query_x=torch.from_numpy(qx).float() / 255.0,
            query_y=torch.tensor([index[t] for _, t in pairs]),
            n_ways=len(train_files),
        )
        out.append((run.name, task))
    return out
