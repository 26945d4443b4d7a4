"""What a learner kind provides to the one training loop (:class:`~metafit.training.loop.Loop`).

A *run* is one learner kind's side of training: it owns the model, its optimizer, its data or
task streams, and knows how to take one step, validate, and describe its checkpoints. The loop
owns everything else: the budget, the cadence of logging, validation and checkpoints, the best /
every-``save_interval`` / last checkpoints, exact resume of its own state, the divergence guard
and monitor, the metrics log, TensorBoard, the progress bar, distributed agreement and why
training stopped. Supervised few-shot training (``training/supervised.py``) and meta-RL training
(``training/rl_learning.py``) are the two runs metafit ships; a third kind implements
:class:`LoopRun` and registers its checkpoint fields with
:func:`metafit.training.checkpoint_meta.register_kind`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

__all__ = ["LoopRun", "LoopSettings", "StepReport", "Validation", "Window"]


@dataclass(frozen=True)
class LoopSettings:
    """The loop's budget and cadence, whatever the learner kind calls them in its config.

    ``steps`` is the number of optimizer steps to train; every ``eval_every`` steps the loop
    validates, every ``save_interval`` steps it keeps a numbered and a resumable checkpoint, every
    ``log_every`` steps it writes a training row. ``max_minutes`` is the wall-clock budget (None:
    none); ``progress`` shows a progress bar, ``tensorboard`` writes TensorBoard event files;
    ``steps_field`` is the config field that ``steps`` came from (named in stop reasons)."""

    steps: int  #: optimizer steps (few-shot ``train.meta_steps``, meta-RL ``train.iterations``)
    eval_every: int
    save_interval: int
    log_every: int = 1
    max_minutes: float | None = None
    progress: bool = True
    tensorboard: bool = True
    #: the config field of ``steps`` (named in stop reasons and messages)
    steps_field: str = "meta_steps"

    @classmethod
    def from_config(cls, train: Any, steps_field: str = "meta_steps") -> "LoopSettings":
        """The settings of ``train``, a config section with the
        :class:`~metafit.training.config.LoopConfig` fields; ``steps`` is read from its field named
        ``steps_field`` (``meta_steps``, ``iterations``), ``log_every`` defaults to 1 where the
        section has none."""
        return cls(steps=getattr(train, steps_field), eval_every=train.eval_every, save_interval=train.save_interval,
                   log_every=getattr(train, "log_every", 1), max_minutes=train.max_minutes, progress=train.progress,
                   tensorboard=train.tensorboard, steps_field=steps_field)


@dataclass
class StepReport:
    """What one step of a run tells the loop."""

    #: values averaged over the steps of each training row (only steps whose update was applied)
    values: dict[str, float] = field(default_factory=dict)
    #: judged by the monitor with ``grad_norm`` before the update (None: the step is not monitored)
    loss: float | None = None
    grad_norm: float | None = None
    #: the update waits for the monitor's verdict: the loop calls ``run.finish(action)``
    pending: bool = False


@dataclass
class Validation:
    """One validation: its score (higher is better), its log row and what ``best.safetensors``
    records should it be the best so far."""

    score: float
    row: dict[str, Any]
    metrics: dict[str, Any]
    #: what the run keeps about it when it is the best (an EvalResult, which weights, ...)
    kept: Any = None
    #: the weights to write into best.safetensors, swapped in for the write (None: the live ones)
    weights: Callable[[], AbstractContextManager] | None = None


class Window:
    """Running sums of the step values since the last training row; ``n`` counts the steps
    whose values were summed (applied updates), ``steps`` and ``seconds`` every step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n, self.steps, self.seconds = 0, 0, 0.0

    def add(self, values: dict[str, float] | None, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        if values is not None:
            for k, v in values.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.n += 1

    def means(self) -> dict[str, float] | None:
        return {k: v / self.n for k, v in self.sums.items()} if self.n else None

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "n": self.n, "steps": self.steps, "seconds": self.seconds}

    def load_state(self, state: dict | None) -> None:
        self.reset()
        if state:  # checkpoints of older versions hold none: they were written at a logged step
            self.sums = dict(state.get("sums", {}))
            self.n, self.steps, self.seconds = state.get("n", 0), state.get("steps", 0), state.get("seconds", 0.0)


class LoopRun(Protocol):
    """The protocol a learner kind implements to be trained by the loop (see the module docstring).

    A structural type: a run need not subclass it, and it is not instantiated itself."""

    #: the checkpoint kind (``few-shot``, ``rl``): ``kind`` in the metadata, checked on resume
    kind: str
    #: who speaks in error messages ("Trainer", "RL")
    owner: str
    #: the metrics-log column counting steps ("step", "iteration"); ``csv``: also write metrics.csv
    step_key: str
    csv: bool
    progress_desc: str
    #: the fix a stopped (diverged) run suggests, e.g. "Lower train.meta_lr or set train.grad_clip"
    guard_advice: str

    def files(self) -> dict[str, dict]:
        """JSON files (name -> content) written into the run folder when training starts."""

    def step(self, step: int) -> StepReport:
        """One training step (``step`` steps done so far): an update, or gradients pending."""

    def finish(self, action: str) -> None:
        """Settle a pending update as the monitor decided: ``action`` is ``apply`` (take the
        optimizer step), ``skip`` (drop the gradients) or ``rollback`` (drop them; the loop reloads
        the weights)."""

    def train_row(self, means: dict[str, float] | None, window: Window, seconds: float) -> dict[str, Any]:
        """A training row's values (the loop adds the step and ``split``): ``means`` are the step
        values averaged over the applied steps since the last row (None: none applied), ``window``
        the running sums behind them (steps and seconds), ``seconds`` the training time so far."""

    def postfix(self, row: dict[str, Any], best: float | None) -> dict[str, str] | None:
        """What the progress bar shows after the training ``row`` (None: nothing new); ``best`` is
        the best validation score so far (None before the first validation)."""

    def validate(self, step: int, seconds: float) -> Validation:
        """Validate the model after ``step`` steps and ``seconds`` of training time; returns the
        :class:`Validation` (score, log row, metrics of a best checkpoint). Called on every rank."""

    def keep(self, validation: Validation) -> None:
        """Remember ``validation`` as the best so far (its ``kept``)."""

    def metrics(self, best_step: int, seconds: float) -> dict[str, Any]:
        """The ``metrics`` of step-* and last checkpoints, given ``best_step`` (the step of the best
        validation so far) and ``seconds`` of training time."""

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The model's tensors (``model.*``) and the kind's metadata fields (key, config, ...)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """What resuming needs beyond the loop's own state: tensors (optimizer ``optim.*``, random
        streams), the optimizer's metadata and the kind's ``run`` metadata."""

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], path: Path, everything: bool) -> None:
        """Check then load a checkpoint's state: weights and optimizer, and with ``everything``
        (resume, not rollback) the random streams and the kind's ``run`` state. ``meta`` and
        ``tensors`` are the checkpoint's (see :func:`~metafit.training.checkpoint.read_checkpoint`),
        ``path`` its file (named in errors)."""

    def close(self) -> None:
        """Training ended (release workers)."""
