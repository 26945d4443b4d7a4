"""Few-shot (supervised) training as a run of the one loop (:class:`metafit.training.loop.Loop`).

The run owns the algorithm, its optimizer and learning-rate schedule, the training sampler and
the fixed validation episodes; a step is one meta-batch: forward (``meta_loss``), backward,
gradients averaged over ranks and clipped, then held until the loop's monitor allows the update.
With ``train.weight_average`` an exponential moving average of the weights (BatchNorm statistics
included) follows every applied update; each validation scores it beside the live weights and
``best.safetensors`` keeps whichever scores higher.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ..algorithms import Algorithm
from ..data import ClassBatchSampler, ImageClasses
from ..data.sampler import SamplerStreams
from ..types import LabelledBatch, TaskBatch
from .checkpoint import (check_optimizer_state, check_rng_state, check_tensors, few_shot_meta, join_optimizer_state,
                         model_state, split_optimizer_state, stored_config)
from .config import RunConfig
from .distributed import DistContext
from .evaluate import EvalResult, evaluate_episodes
from .loop import StepReport, Validation, Window, check_same_config
from .splits import make_sampler
from .weight_average import WeightAverage

__all__ = ["RESUME_FIXED", "RESUME_FREE", "SupervisedRun"]

#: the config fields that a resumed run must share with its checkpoint: they shape the model (its
#: tensors, how inputs reach it, what it computes and how it adapts) or the optimizer state that
#: the checkpoint restores; where the data lives, the step budget and the logging may change
RESUME_FIXED = ("algorithm", "backbone", "data", "task", "train.optimizer", "train.momentum", "train.weight_decay")
RESUME_FREE = ("backbone.weights", "backbone.weights_prefix", "backbone.weights_strict", "backbone.pretrained",
               "data.root", "data.cache_dir", "data.download", "data.workers", "data.storage", "data.memory_budget_gb")
_PHASES = ("data_s", "augment_s", "forward_s", "backward_s", "optimizer_s")


def make_optimizer(params: list[torch.nn.Parameter], tc: Any) -> torch.optim.Optimizer:
    """The optimizer :class:`~metafit.training.config.OptimizerSettings` ``tc`` describes."""
    if tc.optimizer == "adam":
        return torch.optim.Adam(params, lr=tc.meta_lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(params, lr=tc.meta_lr, momentum=tc.momentum, weight_decay=tc.weight_decay)


def lr_at(tc: Any, step: int) -> float:
    """The learning rate of step ``step`` under the schedule of train section ``tc``."""
    lr = tc.meta_lr
    if tc.warmup_steps and step < tc.warmup_steps:
        return lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.meta_steps - tc.warmup_steps))
    if tc.lr_schedule == "step":
        lr *= tc.lr_gamma ** (step // tc.lr_step_size)
    elif tc.lr_schedule == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
    elif tc.lr_schedule == "linear":  # Reptile's anneal to 0 over meta_steps
        lr *= 1.0 - progress
    return lr


class SupervisedRun:
    """Meta-train ``model`` (built from ``config``) on ``splits``; see the module docstring."""

    kind, owner, step_key, csv, progress_desc = "few-shot", "Trainer", "step", True, "meta-train"
    guard_advice = "Lower train.meta_lr or set train.grad_clip"

    def __init__(self, config: RunConfig, model: Algorithm, splits: dict[str, ImageClasses], split: dict | None,
                 device: torch.device, dist: DistContext, channels_last: bool) -> None:
        self.config, self.model, self.splits, self.split = config, model, splits, split
        self.device, self.dist, self.channels_last = device, dist, channels_last
        self.train_sampler = make_sampler(splits["train"], config, "train", config.seed + 1)
        self.val_sampler = make_sampler(splits["val"], config, "val", 0)
        self.val_episodes = self.val_sampler.fixed_episodes(config.eval.val_episodes, config.eval.seed)
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config.train)
        self.best_result: EvalResult | None = None
        decay = config.train.weight_average
        self.average = WeightAverage(model, decay, owner=self.owner, buffers=True) if decay else None
        self.best_weights = "live"  # which weights best.safetensors holds: live or average
        # seconds per phase: waiting for / assembling data, augmenting it, forward, backward, optimizer
        self.timing = dict.fromkeys(_PHASES, 0.0)
        self._lr, self._grad_norm, self._t3, self._phases = 0.0, 0.0, 0.0, (0.0,) * 4

    # -- the loop's protocol -------------------------------------------------------------------
    def files(self) -> dict[str, dict]:
        out = {"config.json": self.config.to_dict()}
        if self.split is not None:
            out["split.json"] = {**self.split, "class_names": {
                s: list(self.splits[s].class_names) for s in ("train", "val", "test")}}
        return out

    def step(self, step: int) -> StepReport:
        tc = self.config.train
        t0 = time.perf_counter()
        self._lr = lr_at(tc, step)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr
        aug_before = getattr(self.train_sampler, "augment_seconds", 0.0)
        batch = self.batch()
        self._sync()
        t1 = time.perf_counter()
        aug = getattr(self.train_sampler, "augment_seconds", 0.0) - aug_before
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
            out = self.model.meta_loss(batch)
        self._sync()
        t2 = time.perf_counter()
        out.loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.dist.all_reduce_grads(params)
        loss, acc = self.dist.mean([float(out.loss.detach()), float(out.accuracy)], self.device)
        self._sync()
        self._t3 = time.perf_counter()
        if tc.grad_clip is not None:
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
        else:
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self._phases = (t1 - t0 - aug, aug, t2 - t1, self._t3 - t2)  # counted unless the step is rolled back
        return StepReport({"loss": loss, "acc": acc}, loss, self._grad_norm, pending=True)

    def finish(self, action: str) -> None:
        if action == "apply":
            self.optimizer.step()
        else:  # skip (the update is dropped) or rollback (the weights are reloaded)
            self.optimizer.zero_grad(set_to_none=True)
        if action != "rollback":
            self.dist.average_buffers(self.model)
            if action == "apply" and self.average is not None:
                self.average.update()
            self._sync()
            for key, dt in zip(_PHASES, (*self._phases, time.perf_counter() - self._t3)):
                self.timing[key] += dt

    def train_row(self, means: dict[str, float] | None, window: Window, seconds: float) -> dict[str, Any]:
        metric = "mse" if self.model.task_kind == "regression" else "accuracy"
        return {"loss": means["loss"] if means else None, metric: means["acc"] if means else None, "lr": self._lr,
                "grad_norm": self._grad_norm, "step_s": window.seconds / window.steps, "elapsed_s": seconds,
                **self.timing}

    def postfix(self, row: dict[str, Any], best: float | None) -> dict[str, str] | None:
        metric = "mse" if "mse" in row else "accuracy"
        if row["loss"] is None:
            return None
        return {"loss": f"{row['loss']:.3f}", metric[:3]: f"{row[metric]:.3f}",
                "best_val": f"{self.best_result.mean:.3f}" if self.best_result else "-"}

    def validate(self, step: int, seconds: float) -> Validation:
        res = self.evaluate()
        row = {"loss": res.loss, res.metric: res.mean, "ci95": res.ci95, "elapsed_s": seconds}
        best, weights = res, "live"
        if self.average is not None and self.average.n_averaged > 0:
            with self.average.swapped_in():
                avg = self.evaluate()
            row[f"{res.metric}_average"] = avg.mean
            if avg.score > res.score:
                best, weights = avg, "average"
        which = {"weights": weights} if self.average is not None else {}
        return Validation(best.score, row, {"val": best.to_dict(), **which, "train_seconds": seconds}, kept=best,
                          weights=self.average.swapped_in if weights == "average" else None)

    def keep(self, validation: Validation) -> None:
        self.best_result = validation.kept
        self.best_weights = validation.metrics.get("weights", "live")

    def metrics(self, best_step: int, seconds: float) -> dict[str, Any]:
        extra = {"best_weights": self.best_weights} if self.average is not None else {}
        return {"best_val": self.best_result.to_dict() if self.best_result else None, "best_step": best_step,
                **extra, "train_seconds": seconds}

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        _, fields = few_shot_meta(self.model, self.config)
        if self.split is not None:
            fields["split"] = self.split
        return {f"model.{k}": v for k, v in self.model.state_dict().items()}, fields

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        sd = self.optimizer.state_dict()
        optim, scalars = split_optimizer_state(sd)
        tensors = {"rng.sampler": self.train_sampler.get_state(), **optim,
                   **(self.average.tensors() if self.average is not None else {})}
        optimizer = {"name": self.config.train.optimizer, "param_groups": sd["param_groups"], "scalars": scalars}
        run = {"best_result": self.best_result.to_dict() if self.best_result else None, "timing": dict(self.timing),
               "best_weights": self.best_weights}
        return tensors, optimizer, run

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], path: Path, everything: bool) -> None:
        ts = meta["train_state"]
        stored = stored_config(meta, path).to_dict()
        check_same_config(self.owner, stored, self.config.to_dict(), RESUME_FIXED, RESUME_FREE, path)
        state = model_state(tensors)
        check_tensors(state, self.model.state_dict(), path)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt = ts["optimizer"]  # (required for this kind)
        check_optimizer_state(tensors, opt.get("scalars", {}), opt["param_groups"],
                              self.optimizer.state_dict()["param_groups"], params, path)
        if everything:
            sampler_state = self.train_sampler.get_state()
            older = (sampler_state.numel() // 2,) if isinstance(self.train_sampler, SamplerStreams) else ()
            sampler = check_rng_state(tensors, "rng.sampler", sampler_state, path, sizes=older)  # older: one stream
        if self.average is not None:
            self.average.check(tensors, path)
        self.model.load_state_dict(state)
        self.optimizer.load_state_dict(join_optimizer_state(tensors, opt.get("scalars", {}), opt["param_groups"],
                                                            self.device))
        if self.average is not None:  # a rollback returns the average to the checkpoint's too
            self.average.load(tensors)
        if not everything:
            return
        self.train_sampler.set_state(sampler)
        run = ts.get("run") or {}
        self.best_result = EvalResult(**run["best_result"]) if run.get("best_result") else None
        self.timing = {**dict.fromkeys(_PHASES, 0.0), **run.get("timing", {})}
        self.best_weights = run.get("best_weights", "live")

    def close(self) -> None:
        self.train_sampler.close()  # stop decoding workers (lazy storage)

    # -- helpers -------------------------------------------------------------------------------
    def batch(self) -> TaskBatch | LabelledBatch:
        """The next training batch of this rank, on the device (channels_last where set)."""
        world, rank = self.dist.world_size, self.dist.rank
        if isinstance(self.train_sampler, ClassBatchSampler):
            batch = self.train_sampler.sample(self.config.algorithm.batch_size // world, rank, world).to(self.device)
            if self.channels_last and batch.x.ndim == 4:
                batch = LabelledBatch(batch.x.contiguous(memory_format=torch.channels_last), batch.y)
            return batch
        batch = self.train_sampler.sample(self.config.train.meta_batch_size // world, rank, world).to(self.device)
        if self.channels_last and batch.support_x.ndim == 5:  # [B, N, C, H, W] images
            cl, b = torch.channels_last, batch
            batch = TaskBatch(b.support_x.flatten(0, 1).contiguous(memory_format=cl).view_as(b.support_x),
                              b.support_y, b.query_x.flatten(0, 1).contiguous(memory_format=cl).view_as(b.query_x),
                              b.query_y, b.n_ways)
        return batch

    def evaluate(self) -> EvalResult:
        """The model on the fixed validation episodes."""
        return evaluate_episodes(self.model, self.val_sampler, self.val_episodes, self.device, self.channels_last)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
