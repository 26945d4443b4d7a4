"""An exponential moving average of a model's weights, kept beside the training run.

``train.weight_average`` (few-shot and meta-RL runs alike): after every applied update the
average moves toward the live weights by torch's EMA rule (``torch.optim.swa_utils``); each
validation scores it beside the live weights, and ``best.safetensors`` keeps whichever scores
higher. The average is scored and saved by swapping it into the model for a moment, so the model
is never copied (an RL learner holds simulator environments). Resumable checkpoints carry it as
``average.<name>`` tensors and ``average.n_averaged``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..errors import CheckpointError
from .checkpoint import check_tensors

__all__ = ["WeightAverage"]


class WeightAverage:
    """An exponential moving average (decay ``decay``) of ``module``'s parameters and, with
    ``buffers``, of its floating-point buffers too (BatchNorm running statistics, which then match
    the averaged weights; integer buffers such as batch counters stay live). ``owner`` starts the
    messages of resume errors (``"Trainer"``, ``"RL"``)."""

    def __init__(self, module: nn.Module, decay: float, owner: str = "Trainer", buffers: bool = False) -> None:
        self.module, self.owner, self.buffers = module, owner, buffers
        live = self._live()
        self.names = list(live)
        self.averaged = [t.detach().clone() for t in live.values()]
        self.n_averaged = 0
        self._ema = get_ema_multi_avg_fn(decay)

    def _live(self) -> dict[str, torch.Tensor]:
        """The averaged tensors of the model, by name: parameters, then floating buffers."""
        out = {name: p for name, p in self.module.named_parameters()}
        if self.buffers:
            out.update((name, b) for name, b in self.module.named_buffers() if b.is_floating_point())
        return out

    @torch.no_grad()
    def update(self) -> None:
        """Move the average toward the live weights (the first call copies them)."""
        live = [t.detach() for t in self._live().values()]
        if self.n_averaged == 0:
            for a, t in zip(self.averaged, live):
                a.copy_(t)
        else:
            self._ema(self.averaged, live, self.n_averaged)
        self.n_averaged += 1

    @contextmanager
    def swapped_in(self) -> Iterator[nn.Module]:
        """The model carrying the averaged tensors; its own are restored on exit."""
        live = list(self._live().values())
        saved = [t.detach().clone() for t in live]
        with torch.no_grad():
            for t, a in zip(live, self.averaged):
                t.copy_(a)
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for t, s in zip(live, saved):
                    t.copy_(s)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The average as checkpoint tensors: ``average.<name>`` and ``average.n_averaged``."""
        out = {f"average.{k}": v for k, v in zip(self.names, self.averaged)}
        out["average.n_averaged"] = torch.tensor(self.n_averaged)
        return out

    def check(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Refuse checkpoint ``tensors`` (of ``path``) whose weight average does not fit this model's."""
        if "average.n_averaged" not in tensors:
            raise CheckpointError(
                f"{self.owner}: resume with train.weight_average needs the average in {str(path)!r}; got a run "
                "trained without it. Resume with the original config (weight_average 0).")
        kept = {k[len("average."):]: v for k, v in tensors.items() if k.startswith("average.")}
        count = kept.pop("n_averaged")
        check_tensors(kept, dict(zip(self.names, self.averaged)), path, prefix="average.",
                      what="the weight average of the model")
        if count.dtype != torch.int64 or count.dim() != 0 or int(count) < 0:
            raise CheckpointError(
                f"Checkpoint: tensor 'average.n_averaged' of {str(path)!r} must be a non-negative torch.int64 "
                f"scalar; got {count.dtype} of shape {list(count.shape)}. The file is damaged or was edited.")

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the average from checkpoint ``tensors`` (checked by :meth:`check`)."""
        for k, a in zip(self.names, self.averaged):
            a.copy_(tensors[f"average.{k}"])
        self.n_averaged = int(tensors["average.n_averaged"])
