"""TensorBoard event files beside the JSONL log (``<out_dir>/tensorboard``).

Written with ``torch.utils.tensorboard`` when the ``tensorboard`` package is installed
(``pip install "metafit[track]"``); without it training runs unchanged and says once how to
turn the event files on. ``tensorboard --logdir runs`` then shows every run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

__all__ = ["TensorBoardLog"]

log = logging.getLogger(__name__)
_warned = False


class TensorBoardLog:
    """Scalars under ``train/``, ``val/`` and ``monitor/``; ``purge_step`` drops events a
    resumed run is about to write again."""

    def __init__(self, out_dir: Path, enabled: bool, purge_step: int | None = None) -> None:
        global _warned
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not _warned:
                log.warning("TensorBoard event files are off: the tensorboard package is not installed. "
                            "Install it with pip install \"metafit[track]\", or set train.tensorboard=false "
                            "to silence this message.")
                _warned = True
            return
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step or None)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, prefix: str, row: dict, step: int, skip: tuple[str, ...] = ("step", "split")) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
