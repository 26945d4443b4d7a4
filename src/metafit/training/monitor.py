"""Training monitors: non-finite values, loss spikes and gradient-norm spikes, with a policy.

A step is *flagged* when its loss or gradient norm is not finite, when its loss lies more than
``loss_spike`` robust standard deviations (1.4826 x the median absolute deviation) above the
median of the last ``window`` accepted steps, when its gradient norm exceeds ``grad_spike`` times
the median of that window, or when it exceeds ``max_grad_norm``. A loss or gradient-norm spike
must also exceed ``over_recent_max`` times the largest value of the window (and a loss spike
``loss_floor``, below which a loss is never a spike): the loss of one
episode (or a few) is heavy-tailed, the more so as it approaches zero, and ordinary episode noise
reaches 30 times the median (and 30 robust standard deviations) but stays below about 2.2 times
the window's largest value in the shipped configs, while a diverging step, a NaN or a 100-fold
loss lies far beyond it. Spikes are judged only once
``min_history`` steps were seen, and flagged steps never enter the window, so one spike does not
raise the bar for the next. What happens to a flagged step is the ``policy``:

- ``warn``: log it and take the step anyway (a non-finite step stops training: its update would
  destroy the weights);
- ``skip``: log it and drop the step's update (the batch is consumed);
- ``rollback``: log it, reload weights and optimizer state from the last checkpoint
  (``last.safetensors``; one is written when training starts) and continue with new batches.

Every flagged step becomes a ``"split": "monitor"`` row in ``metrics.jsonl``. More than
``patience`` flagged steps in a row, or more than ``max_rollbacks`` rollbacks, stop training
with an error that says what to change.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from ..validation import ConfigModel

__all__ = ["Finding", "Monitor", "MonitorConfig"]


class MonitorConfig(ConfigModel):
    policy: Literal["warn", "skip", "rollback"] = Field(
        "warn", description="what a flagged step does: warn (apply it), skip (drop its update), rollback "
        "(reload the last checkpoint)"
    )
    loss_spike: float | None = Field(
        8.0, gt=0.0, description="flag a loss this many robust standard deviations above the recent median (None: off)"
    )
    grad_spike: float | None = Field(
        10.0, gt=1.0, description="flag a gradient norm this many times the recent median (None: off)"
    )
    max_grad_norm: float | None = Field(None, gt=0.0, description="flag any gradient norm above this value (None: off)")
    over_recent_max: float | None = Field(
        4.0, ge=1.0, description="a loss or gradient-norm spike must also exceed this multiple of the largest "
        "value among the recent accepted steps, so that ordinary episode noise is not flagged (None: off)"
    )
    loss_floor: float | None = Field(
        1.0, ge=0.0, description="a loss at or below this value is never a spike: a near-perfect model's episode "
        "losses swing by large factors at tiny values (None: no floor)"
    )
    window: int = Field(100, ge=5, le=100000, description="recent accepted steps the spike tests compare against")
    min_history: int = Field(20, ge=3, description="accepted steps needed before spikes are judged")
    patience: int = Field(10, ge=1, description="flagged steps in a row before training stops with an error")
    max_rollbacks: int = Field(5, ge=0, description="rollbacks allowed in one run before training stops")


@dataclass(frozen=True)
class Finding:
    event: Literal["nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_spike", "grad_norm_limit"]
    value: float
    threshold: float | None = None
    median: float | None = None

    def describe(self) -> str:
        what = {"nonfinite_loss": "non-finite loss", "nonfinite_grad": "non-finite gradient norm",
                "loss_spike": "loss spike", "grad_spike": "gradient-norm spike",
                "grad_norm_limit": "gradient norm above max_grad_norm"}[self.event]
        extra = f" (threshold {self.threshold:.4g}, recent median {self.median:.4g})" if self.threshold is not None \
            and self.median is not None else (f" (limit {self.threshold:.4g})" if self.threshold is not None else "")
        return f"{what}: {self.value:.4g}{extra}"


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class Monitor:
    """Judges each step's (loss, gradient norm); the Trainer applies the policy."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.losses: deque[float] = deque(maxlen=config.window)
        self.norms: deque[float] = deque(maxlen=config.window)
        self.in_a_row = 0
        self.rollbacks = 0

    def check(self, loss: float, grad_norm: float) -> list[Finding]:
        cfg, found = self.config, []
        if not math.isfinite(loss):
            found.append(Finding("nonfinite_loss", loss))
        if not math.isfinite(grad_norm):
            found.append(Finding("nonfinite_grad", grad_norm))
        if found:
            return found
        if cfg.max_grad_norm is not None and grad_norm > cfg.max_grad_norm:
            found.append(Finding("grad_norm_limit", grad_norm, cfg.max_grad_norm))
        if len(self.losses) >= cfg.min_history:
            ratio = cfg.over_recent_max
            if cfg.loss_spike is not None:
                med = _median(list(self.losses))
                mad = _median([abs(v - med) for v in self.losses])
                spread = max(1.4826 * mad, 1e-3 * abs(med), 1e-12)
                threshold = med + cfg.loss_spike * spread
                if ratio is not None:
                    threshold = max(threshold, ratio * max(self.losses))
                if cfg.loss_floor is not None:
                    threshold = max(threshold, cfg.loss_floor)
                if loss > threshold:
                    found.append(Finding("loss_spike", loss, threshold, med))
            if cfg.grad_spike is not None:
                med = _median(list(self.norms))
                threshold = cfg.grad_spike * med
                if ratio is not None:
                    threshold = max(threshold, ratio * max(self.norms))
                if med > 0 and grad_norm > threshold:
                    found.append(Finding("grad_spike", grad_norm, threshold, med))
        return found

    def accept(self, loss: float, grad_norm: float) -> None:
        """Record an unflagged step in the window."""
        self.losses.append(loss)
        self.norms.append(grad_norm)
        self.in_a_row = 0

    def state(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms), "rollbacks": self.rollbacks}

    def load_state(self, state: dict | None) -> None:
        if not state:
            return
        self.losses.clear()
        self.norms.clear()
        self.losses.extend(state.get("losses", []))
        self.norms.extend(state.get("norms", []))
        self.rollbacks = int(state.get("rollbacks", 0))
