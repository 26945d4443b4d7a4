"""Metrics logging: one JSON object per line (``metrics.jsonl``) and the same rows as CSV
(``metrics.csv``), flushed on every write. On resume both are cut back to the resumed step and
appended to, so that a resumed run's log equals an uninterrupted run's row for row."""

from __future__ import annotations

import csv as _csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from ..data.cache import atomic_write_bytes

__all__ = ["CSV_COLUMNS", "MetricsLog", "kept_rows", "write_json"]


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` as a JSON report to ``path`` atomically (a crash never leaves a half-written
    file) and return the path.

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


def kept_rows(path: Path, key: str, upto: int) -> tuple[list[str], list[dict]]:
    """The lines of JSON-lines log ``path`` (and their rows) whose ``key`` is at most ``upto``: the
    log as it was when a checkpoint of step ``upto`` was written. Rows a killed run wrote after
    that checkpoint (they are replayed on resume), and a line it left half-written, are dropped."""
    lines, rows = [], []
    if not path.is_file():
        return lines, rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # cut off mid-line by a kill: the row is written again
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get(key), int) and row[key] <= upto:
                lines.append(line)
                rows.append(row)
    return lines, rows


class MetricsLog:
    """``metrics.jsonl`` and (``csv``) ``metrics.csv`` of a run, rows keyed by ``key`` (``step``;
    meta-RL runs: ``iteration``). ``resume_step``: continue a resumed run's log from the checkpoint
    of that step (rows after it are removed from both files first, so the replayed steps are not
    logged twice); otherwise both files start empty."""

    def __init__(self, out_dir: Path, append: bool, resume_step: int | None = None, key: str = "step",
                 csv: bool = True) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path, csv_path = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        if append and resume_step is not None:
            lines, rows = kept_rows(jsonl_path, key, resume_step)
            atomic_write_bytes(jsonl_path, lambda f: f.write("".join(lines).encode()))
            if csv:
                buf = io.StringIO(newline="")
                writer = _csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
                atomic_write_bytes(csv_path, lambda f: f.write(buf.getvalue().encode()))
        mode = "a" if append else "w"
        self._jsonl = open(jsonl_path, mode)
        self._csv_file = self._csv = None
        if csv:
            write_header = not (append and csv_path.exists() and csv_path.stat().st_size > 0)
            self._csv_file = open(csv_path, mode, newline="")
            self._csv = _csv.DictWriter(self._csv_file, CSV_COLUMNS, extrasaction="ignore")
            if write_header:
                self._csv.writeheader()

    def write(self, row: dict) -> dict:
        """Append ``row`` (non-finite floats written as null); returns the row as written."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        if self._csv is not None:
            self._csv.writerow(clean)
            self._csv_file.flush()
        return clean

    def close(self) -> None:
        self._jsonl.close()
        if self._csv_file is not None:
            self._csv_file.close()
