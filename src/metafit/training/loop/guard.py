"""The divergence guard: the monitor's findings on a step (non-finite loss or gradient norm, loss
and gradient-norm spikes; see :mod:`metafit.training.monitor`) and what the policy does about
them (apply, skip, roll back, or stop with an error that says what to change)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ...errors import TrainingError
from ..monitor import Finding, Monitor, MonitorConfig

if TYPE_CHECKING:
    from .core import Loop

__all__ = ["Guard"]

#: the monitor's findings (the CLI prints INFO records of the trainer's logger; the monitor prints
#: its own lines above the progress bar)
monitor_logger = logging.getLogger("metafit.training.monitor")


class Guard:
    """Judges each monitored step of ``loop`` with a :class:`Monitor` and applies ``config.policy``."""

    def __init__(self, loop: "Loop", config: MonitorConfig) -> None:
        self.loop = loop
        self.config = config
        self.monitor = Monitor(config)
        self.events = {"skipped": 0, "rolled_back": 0, "flagged": 0}

    def judge(self, loss: float, grad_norm: float) -> str:
        """The verdict on the step about to be taken: "apply", "skip" or "rollback" (or raise).
        Loss and gradient norm are already averaged over ranks, so every rank decides alike."""
        mc, loop = self.config, self.loop
        findings = self.monitor.check(loss, grad_norm)
        if not findings:
            self.monitor.accept(loss, grad_norm)
            return "apply"
        nonfinite = any(f.event.startswith("nonfinite") for f in findings)
        action = {"warn": "stop" if nonfinite else "apply", "skip": "skip", "rollback": "rollback"}[mc.policy]
        self.monitor.in_a_row += 1
        self.events["flagged"] += 1
        if action == "rollback" and self.monitor.rollbacks >= mc.max_rollbacks:
            action = "stop"
        step = loop.step + 1
        for f in findings:
            loop.log_row({loop.run.step_key: step, "split": "monitor", "event": f.event, "value": f.value,
                          "threshold": f.threshold, "median": f.median, "action": action, "loss": loss,
                          "grad_norm": grad_norm, "elapsed_s": loop.seconds}, tensorboard=False)
        loop.tb.scalars("monitor", {"flagged": self.events["flagged"], "skipped": self.events["skipped"],
                                    "rolled_back": self.events["rolled_back"]}, step)
        if action == "stop" or self.monitor.in_a_row > mc.patience:
            self._say(step, findings, "stopped training")
        if action == "stop":
            self._stop(findings, nonfinite)
        if self.monitor.in_a_row > mc.patience:
            raise TrainingError(
                f"{loop.run.owner}: flagged steps must not follow each other more than monitor.patience="
                f"{mc.patience} times; got {self.monitor.in_a_row} in a row, the last at step {step} "
                f"({findings[0].describe()}). Training stopped; {loop.run.guard_advice[0].lower()}"
                f"{loop.run.guard_advice[1:]}, or relax the monitor thresholds (monitor.loss_spike, "
                "monitor.grad_spike), then run again with --resume."
            )
        if action == "skip":
            self.events["skipped"] += 1
            self._say(step, findings, "skipped the step (its update is dropped; monitor.policy=skip)")
        elif action == "rollback":
            self._rollback(step)
            self._say(step, findings, f"rolled back to the checkpoint of step {loop.step} (monitor.policy=rollback)")
        else:
            self._say(step, findings, "kept the step (its update is applied; monitor.policy=warn)")
        return action

    def _say(self, step: int, findings: list[Finding], outcome: str) -> None:
        """Print each finding of a flagged step with what was done about it (rank 0)."""
        if not self.loop.dist.is_main:
            return
        for f in findings:
            tqdm.write(f"step {step}: {f.describe()} -> {outcome}")
            if monitor_logger.hasHandlers():  # else logging's last-resort handler would print it a second time
                monitor_logger.warning("step %d: %s -> %s", step, f.describe(), outcome)

    def _stop(self, findings: list[Finding], nonfinite: bool) -> None:
        loop = self.loop
        last = loop.out_dir / "last.safetensors"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        f, owner, advice = findings[0], loop.run.owner, loop.run.guard_advice
        if nonfinite:
            what = "loss" if f.event == "nonfinite_loss" else "gradient norm"
            raise TrainingError(
                f"{owner}: the {what} must be finite; got {f.value} at step {loop.step + 1}. Training stopped and "
                f"{kept}. {advice} (or monitor.policy=skip or rollback to step over such batches), then run again "
                "(with --resume to continue from the last checkpoint)."
            )
        raise TrainingError(
            f"{owner}: rollbacks must not exceed monitor.max_rollbacks={self.config.max_rollbacks}; got another at "
            f"step {loop.step + 1} ({f.describe()}). Training stopped and {kept}. {advice}, then run again with "
            "--resume."
        )

    def _rollback(self, step: int) -> None:
        """Return weights and optimizer to ``last.safetensors``; the task stream, timers and
        best-so-far continue (the batches that caused the trouble are not replayed)."""
        loop = self.loop
        self.monitor.rollbacks += 1
        self.events["rolled_back"] += 1
        loop.run.finish("rollback")
        loop.restore(loop.out_dir / "last.safetensors", everything=False)
        loop.log_row({loop.run.step_key: step, "split": "monitor", "event": "rollback", "action": "rollback",
                      "to_step": loop.step, "elapsed_s": loop.seconds}, tensorboard=False)

    def state(self) -> dict:
        return {"monitor": self.monitor.state(), "events": dict(self.events)}

    def load_state(self, monitor: dict | None, events: dict | None) -> None:
        self.monitor.load_state(monitor)
        self.events = {**self.events, **(events or {})}
