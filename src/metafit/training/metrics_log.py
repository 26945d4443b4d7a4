"""Metrics logging: one JSON object per line (``metrics.jsonl``) and the same rows as CSV
(``metrics.csv``). Both are appended to on resume and flushed on every write."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from ..data.cache import atomic_write_bytes

__all__ = ["CSV_COLUMNS", "MetricsLog", "write_json"]


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write a JSON report atomically (a crash never leaves a half-written file).

    Nested objects are indented, but a list or object holding only scalars is written on one line,
    so that a learning curve (a list of rows) takes one line per row instead of one per number."""
    path = Path(path)
    atomic_write_bytes(path, lambda f: f.write((_dumps(data, 0) + "\n").encode()))
    return path


def _flat(value: Any) -> bool:
    if isinstance(value, dict):
        return all(not isinstance(v, (dict, list)) for v in value.values())
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return True


def _dumps(value: Any, level: int) -> str:
    if _flat(value):
        return json.dumps(value)
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return "[\n" + ",\n".join(inner + _dumps(v, level + 1) for v in value) + "\n" + pad + "]"

CSV_COLUMNS = ["step", "split", "loss", "accuracy", "mse", "ci95", "lr", "grad_norm", "step_s", "elapsed_s",
               "data_s", "augment_s", "forward_s", "backward_s", "optimizer_s", "event", "action"]


class MetricsLog:
    def __init__(self, out_dir: Path, append: bool) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        self._jsonl = open(out_dir / "metrics.jsonl", mode)
        csv_path = out_dir / "metrics.csv"
        write_header = not (append and csv_path.exists() and csv_path.stat().st_size > 0)
        self._csv_file = open(csv_path, mode, newline="")
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS, extrasaction="ignore")
        if write_header:
            self._csv.writeheader()

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        self._csv.writerow(clean)
        self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
