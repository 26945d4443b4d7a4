"""The run folder: what a run writes there, refusing to mix two runs, and overwriting one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ...errors import ConfigError, short_repr
from ..checkpoint import remove_stale_temp_files
from ..distributed import DistContext

__all__ = ["RUN_FILES", "RUN_FOLDERS", "check_run_folder", "prepare_run_folder", "remove_run_files"]

#: what a run writes into its folder (``overwrite=True`` deletes them before training): files by
#: name or pattern, and the TensorBoard folder
RUN_FILES = ("*.safetensors", "config.json", "split.json", "report.json", "metrics.jsonl", "metrics.csv",
             "learning_curve.png", "adaptation.png")
RUN_FOLDERS = ("tensorboard",)


def _visible_entries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def check_run_folder(out_dir: str | Path, resume: bool | str | Path = False, overwrite: bool = False) -> None:
    """Refuse to start a new run in a folder that already holds something (an earlier run's
    checkpoints and logs would be replaced or mixed with this run's), unless ``resume`` (continue
    it) or ``overwrite`` (replace it) says so; refuse both at once. Reads only."""
    if resume and overwrite:
        raise ConfigError(
            f"Trainer: resume and overwrite must not both be set; got resume={short_repr(resume)} and overwrite=True. "
            "Pass --resume to continue the run in out_dir, or --overwrite to replace it, not both."
        )
    if resume or overwrite:
        return
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(
            f"Trainer: out_dir must be a folder; got {short_repr(str(out_dir))}, an existing file. "
            "Choose another --out-dir (out_dir)."
        )
    held = _visible_entries(out_dir)
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(
            f"Trainer: out_dir must be a new or empty folder; got {short_repr(str(out_dir))} holding {shown}. "
            "Continue that run with --resume (resume=True), replace it with --overwrite (overwrite=True: its "
            "checkpoints, logs, report and TensorBoard files are deleted first), or choose another --out-dir."
        )


def remove_run_files(out_dir: Path) -> list[str]:
    """Delete what an earlier run wrote into ``out_dir`` (:data:`RUN_FILES`, :data:`RUN_FOLDERS`);
    other entries are left alone. Returns the names removed."""
    removed = []
    if not out_dir.is_dir():
        return removed
    for entry in sorted(out_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            if entry.name in RUN_FOLDERS:
                shutil.rmtree(entry)
                removed.append(entry.name + "/")
        elif any(entry.match(pattern) for pattern in RUN_FILES):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def prepare_run_folder(out_dir: Path, resume: bool | str | Path, overwrite: bool, continuing: bool,
                       dist: DistContext, logger: logging.Logger) -> None:
    """Refuse a folder holding an earlier run unless resuming, overwriting or ``continuing`` this
    one (rank 0 looks, every rank raises alike); with ``overwrite``, delete that run's files and
    say so on ``logger``. Temp files of writes a killed run left half done are removed first."""
    problem = None
    if dist.is_main:
        remove_stale_temp_files(out_dir)  # no write of this run is in flight yet
        try:
            check_run_folder(out_dir, resume, overwrite or continuing)
        except ConfigError as err:
            problem = str(err)
    problem = dist.broadcast(problem)
    if problem is not None:
        raise ConfigError(problem)
    if overwrite and dist.is_main:
        removed = remove_run_files(out_dir)
        if removed:
            logger.info("overwrite: deleted the earlier run's files in %s (%s)", out_dir,
                        ", ".join(removed[:6]) + (f" and {len(removed) - 6} more" if len(removed) > 6 else ""))
    dist.barrier()
