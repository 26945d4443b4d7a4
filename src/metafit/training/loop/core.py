"""The one training loop: every learner kind trains, validates, checkpoints and resumes here.

``Loop(run, settings, out_dir).fit()`` runs ``settings.steps`` steps of ``run`` (a
:class:`~metafit.training.loop.protocol.LoopRun`), or until ``settings.max_minutes`` of training
time; every ``log_every`` steps it writes a training row (the step values averaged since the last
row), every ``eval_every`` steps (and at the last) it validates and keeps the best-scoring weights
as ``best.safetensors``, every ``save_interval`` steps it keeps ``step-NNNNNNN.safetensors`` and a
resumable ``last.safetensors``, and at the end a final ``last.safetensors``. ``last`` holds the
loop's state (step, best so far, training time, the averaging window of the next row, monitor
and events, the torch random state) and the run's (optimizer, its random streams, ...), so a
resumed run continues exactly where the uninterrupted run would be: bit for bit on the CPU, and
row for row in ``metrics.jsonl`` (the rows logged after the checkpoint are replayed).
With a monitor config, each step's loss and gradient norm are judged before its update
(:class:`~metafit.training.loop.guard.Guard`). In a distributed run only rank 0 writes, and the
ranks agree on the time budget.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ...errors import CheckpointError, short_repr
from ..checkpoint import check_rng_state, config_difference, envelope, read_checkpoint, write_checkpoint
from ..checkpoint_meta import kind_of
from ..distributed import DistContext
from ..metrics_log import MetricsLog, write_json
from ..monitor import MonitorConfig
from ..tracking import TensorBoardLog
from .folder import prepare_run_folder
from .guard import Guard
from .protocol import LoopRun, LoopSettings, Validation, Window

__all__ = ["Loop", "check_same_config", "stop_line"]


def stop_line(stop: dict[str, Any]) -> str:
    """One line saying why training ended (a loop's ``stop``, a report's ``stop``)."""
    field = next((k for k in stop if k not in ("reason", "step", "max_minutes")), "meta_steps")
    if stop.get("reason") != "max_minutes":
        return f"training ran all {stop.get(field)} steps (train.{field})"
    return (f"the time budget train.max_minutes={stop['max_minutes']:g} ended training at step {stop['step']} of "
            f"{stop[field]} (raise train.max_minutes, or set it to null to run all train.{field}; "
            "--resume --set train.max_minutes=... continues this run)")


def check_same_config(owner: str, stored: dict, current: dict, fixed: Sequence[str], free: Sequence[str],
                      path: Path) -> None:
    """Refuse to resume from ``path`` unless its config agrees with this run's on ``fixed``
    (sections or fields, except ``free``); the first differing field is named."""
    diff = config_difference(stored, current, fixed, free)
    if diff is not None:
        key, theirs, ours = diff
        raise CheckpointError(
            f"{owner}: {key} must be {short_repr(theirs)} as in the checkpoint being resumed ({str(path)!r}); "
            f"got {short_repr(ours)}. Resume with the run's config (--set {key}={json.dumps(theirs)}), or "
            "train into another out_dir."
        )


class Loop:
    """Trains ``run`` in ``out_dir`` (see the module docstring) with the budget and cadence of
    ``settings`` (a :class:`~metafit.training.loop.protocol.LoopSettings`). ``dist`` is the
    distributed context (None: a single process); ``monitor``, when given, judges each step's loss
    and gradient norm before its update. ``on_validate(step, validation)`` is called after every
    validation; ``logger`` gets the lines a user should see (the time budget stopped training, an
    overwrite deleted files)."""

    def __init__(self, run: LoopRun, settings: LoopSettings, out_dir: str | Path, *, dist: DistContext | None = None,
                 monitor: MonitorConfig | None = None, on_validate: Callable[[int, Validation], None] | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.run, self.settings, self.out_dir = run, settings, Path(out_dir)
        self.dist = dist or DistContext()
        self.on_validate = on_validate
        self.logger = logger or logging.getLogger(__name__)
        self.guard = Guard(self, monitor) if monitor is not None else None
        self.step = 0
        self.best_score = -math.inf
        self.best_step = 0
        self.seconds = 0.0  # training time so far (validations and checkpoints included)
        self.window = Window()
        self.stop: dict[str, Any] | None = None  # why the last fit() ended
        self.log: MetricsLog | None = None
        self.tb = TensorBoardLog(self.out_dir, False)
        self._fitted = False  # a second fit() continues this loop's own run in out_dir

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The loop's part of ``train_state`` (beside the run's ``optimizer`` and ``run``)."""
        out = {"best_score": self.best_score if math.isfinite(self.best_score) else None,
               "best_step": self.best_step, "seconds": self.seconds, "window": self.window.state()}
        return {**out, **(self.guard.state() if self.guard is not None else {})}

    def load_state(self, ts: dict[str, Any]) -> None:
        """Restore the loop's part of ``ts``, a checkpoint's ``train_state`` (see :meth:`state`)."""
        best = ts.get("best_score")
        self.best_score = -math.inf if best is None else best
        self.best_step = ts.get("best_step", 0)
        self.seconds = ts.get("seconds", 0.0)
        self.window.load_state(ts.get("window"))
        if self.guard is not None:
            self.guard.load_state(ts.get("monitor"), ts.get("events"))

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, name: str, metrics: dict | None = None, resumable: bool = True) -> Path:
        """Write ``out_dir/name`` (rank 0 only; the other ranks wait until it is on disk):
        the run's model, and with ``resumable`` everything :meth:`restore` needs; returns its path.
        ``metrics`` are recorded in its metadata (None: the run's, see ``LoopRun.metrics``)."""
        path = self.out_dir / name
        if self.dist.is_main:
            tensors, fields = self.run.checkpoint()
            if resumable:
                run_tensors, optimizer, run_state = self.run.state()
                tensors = {**tensors, "rng.torch": torch.get_rng_state(), **run_tensors}
                fields = {**fields, "train_state": {"optimizer": optimizer, **self.state(), "run": run_state}}
            metrics = self.run.metrics(self.best_step, self.seconds) if metrics is None else metrics
            write_checkpoint(path, tensors, envelope(self.run.kind, self.step, metrics, **fields))
        self.dist.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from ``path`` (default: ``out_dir/last.safetensors``) exactly."""
        path = Path(path) if path else self.out_dir / "last.safetensors"
        if not path.is_file():
            raise CheckpointError(
                f"{self.run.owner}: resume needs an existing checkpoint; got no file at {str(path)!r}. "
                "Run without --resume first, or point --resume at a last.safetensors file."
            )
        self.restore(path, everything=True)

    def restore(self, path: Path, everything: bool) -> None:
        """Load the run's weights and optimizer from ``path``; ``everything`` also restores the
        random streams, timers and best-so-far (resume) rather than continuing them (rollback).
        Everything is checked before anything is loaded."""
        meta, tensors = read_checkpoint(path)
        owner, kind = self.run.owner, kind_of(meta)
        if kind != self.run.kind:
            names = {"rl": "a meta-RL checkpoint", "few-shot": "a few-shot checkpoint",
                     None: "a checkpoint of no learner kind"}
            raise CheckpointError(
                f"{owner}: resume needs {names.get(self.run.kind, f'a {self.run.kind} checkpoint')}; got "
                f"{names.get(kind, f'a checkpoint of kind {kind!r}')} ({str(path)!r}). Resume it with the command "
                "that trained it (metafit train --resume, metafit rl train --resume)."
            )
        ts = meta.get("train_state")
        if ts is None:
            raise CheckpointError(
                f"{owner}: resume needs a checkpoint with training state; got {str(path)!r} which holds "
                "only model weights (best/step checkpoints do not). Resume from last.safetensors."
            )
        rng = check_rng_state(tensors, "rng.torch", torch.get_rng_state(), path) if everything else None
        self.run.restore(meta, tensors, path, everything)
        self.step = int(meta["step"])
        if everything:
            torch.set_rng_state(rng)
            self.load_state(ts)

    # -- logging -----------------------------------------------------------------------------
    def log_row(self, row: dict[str, Any], tensorboard: bool = True) -> None:
        """Write ``row`` to the metrics log (rank 0), and with ``tensorboard`` a training or
        validation row's values to TensorBoard too."""
        if self.log is not None:
            self.log.write(row)
        if tensorboard and row.get("split") in ("train", "val"):
            self.tb.scalars(row["split"], {k: v for k, v in row.items() if k != "points"}, row[self.run.step_key],
                            skip=(self.run.step_key, "split"))

    def _open_logs(self, resume: bool, continuing: bool) -> None:
        s, main = self.settings, self.dist.is_main
        # on resume, the rows logged after the checkpoint's step are removed: the replayed steps log them again
        self.log = MetricsLog(self.out_dir, append=bool(resume) or continuing, resume_step=self.step if resume else None,
                              key=self.run.step_key, csv=self.run.csv) if main else None
        self.tb = TensorBoardLog(self.out_dir, main and s.tensorboard, purge_step=self.step + 1 if resume else None)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool | str | Path = False, overwrite: bool = False) -> Path:
        """Train until ``settings.steps`` (or the time budget); returns ``last.safetensors``. A
        folder that already holds something is refused unless ``resume`` (True: its
        ``last.safetensors``, or a checkpoint path) or ``overwrite`` (its run's files are deleted
        first); a second ``fit()`` continues this loop's own run."""
        continuing = self._fitted and not resume and not overwrite
        prepare_run_folder(self.out_dir, resume, overwrite, continuing, self.dist, self.logger)
        if resume:
            self.resume(None if resume is True else resume)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name, content in self.run.files().items():
                write_json(self.out_dir / name, content)
        self._fitted, self.stop = True, None
        self._open_logs(bool(resume), continuing)
        s = self.settings
        bar = tqdm(total=s.steps, initial=self.step, disable=not (s.progress and self.dist.is_main),
                   desc=self.run.progress_desc, dynamic_ncols=True)
        if (self.guard is not None and self.guard.config.policy == "rollback"
                and not (self.out_dir / "last.safetensors").exists()):
            self.save("last.safetensors")  # the state a rollback before the first save returns to
        try:
            last = self._steps(bar)
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()
            self.tb.close()
            self.run.close()
        if self.stop is None:
            self.stop = {"reason": s.steps_field, "step": self.step, s.steps_field: s.steps,
                         "max_minutes": s.max_minutes}
        elif self.dist.is_main:
            self.logger.info("%s", stop_line(self.stop))
        return last

    def _steps(self, bar: tqdm) -> Path:
        s, run = self.settings, self.run
        fit_start, seconds_before = time.perf_counter(), self.seconds
        while self.step < s.steps:
            if s.max_minutes is not None and self.dist.broadcast(self.seconds >= 60.0 * s.max_minutes):
                self.stop = {"reason": "max_minutes", "step": self.step, s.steps_field: s.steps,
                             "max_minutes": s.max_minutes}
                self.log_row({run.step_key: self.step, "split": "stop", "event": "max_minutes",
                              "elapsed_s": self.seconds})
                self._validate()
                break
            t0 = time.perf_counter()
            report = run.step(self.step)
            action = "apply"
            if self.guard is not None and report.loss is not None:
                action = self.guard.judge(report.loss, report.grad_norm)
                if action == "rollback":
                    bar.n = self.step
                    bar.refresh()
                    continue
            if report.pending:
                run.finish(action)
            t1 = time.perf_counter()
            self.step += 1
            self.seconds = seconds_before + (t1 - fit_start)
            self.window.add(report.values if action == "apply" else None, t1 - t0)
            bar.update(1)
            if self.step % s.log_every == 0 or self.step == s.steps:
                self._train_row(bar)
            if self.step % s.eval_every == 0 or self.step == s.steps:
                self._validate()
            if self.step % s.save_interval == 0:
                self.save(f"step-{self.step:07d}.safetensors", resumable=False)
                self.save("last.safetensors")
        self.seconds = seconds_before + (time.perf_counter() - fit_start)
        return self.save("last.safetensors")

    def _train_row(self, bar: tqdm) -> None:
        values = self.run.train_row(self.window.means(), self.window, self.seconds)
        row = {self.run.step_key: self.step, "split": "train", **values}
        self.log_row(row)
        postfix = self.run.postfix(row, self.best_score if math.isfinite(self.best_score) else None)
        if postfix:
            bar.set_postfix(**postfix)
        self.window.reset()

    def _validate(self) -> None:
        if self.best_step == self.step and math.isfinite(self.best_score):
            return  # already validated at this step
        v = self.run.validate(self.step, self.seconds)  # every rank: the same model on the same tasks
        self.log_row({self.run.step_key: self.step, "split": "val", **v.row})
        if v.score > self.best_score:
            self.best_score, self.best_step = v.score, self.step
            self.run.keep(v)
            with v.weights() if v.weights is not None else nullcontext():
                self.save("best.safetensors", v.metrics, resumable=False)
        if self.on_validate is not None:
            self.on_validate(self.step, v)
