"""The Trainer: owns optimizer, learning-rate schedule, gradient clipping, validation on fixed
held-out episodes, checkpoints (best, every ``save_interval``, last) and exact resume.

Algorithms only provide ``meta_loss`` (or ``meta_step``); everything else happens here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..algorithms import Algorithm, get_algorithm
from ..data import ClassBatchSampler, EpisodeSampler, ImageClasses, SinusoidFamily, SinusoidSampler, load_splits
from ..data.sampler import SamplerStreams
from ..errors import CheckpointError, ConfigError, TrainingError, short_repr
from ..types import LabelledBatch, TaskBatch
from .checkpoint import (check_optimizer_state, check_rng_state, check_tensors, config_difference, join_optimizer_state,
                         model_state, read_checkpoint, remove_stale_temp_files, save_checkpoint,
                         split_optimizer_state, stored_config)
from .config import RunConfig, build_model, resolve_config
from .distributed import DistContext, init_distributed
from .evaluate import EvalResult, evaluate_episodes
from .metrics_log import MetricsLog, write_json
from .monitor import Finding, Monitor
from .tracking import TensorBoardLog

__all__ = ["RUN_FILES", "Trainer", "TrainResult", "check_run_folder", "remove_run_files", "describe_split", "make_sampler",
           "resolve_device"]

logger = logging.getLogger(__name__)
#: the monitor's findings (apart from ``logger``, whose INFO records the CLI prints: the monitor
#: prints its own lines above the progress bar)
monitor_logger = logging.getLogger("metafit.training.monitor")

#: what a run writes into its folder (``overwrite=True`` deletes them before training): files by
#: name or pattern, and the TensorBoard folder
RUN_FILES = ("*.safetensors", "config.json", "split.json", "report.json", "metrics.jsonl", "metrics.csv",
             "learning_curve.png", "adaptation.png")
RUN_FOLDERS = ("tensorboard",)


def resolve_device(name: str, field: str = "train.device",
                   fix: str = "Use --set train.device=cpu (or auto).") -> torch.device:
    """The torch device a config's ``field`` names; ``auto`` is cuda when available. A device this
    machine lacks is a ConfigError that names ``field`` and ends with ``fix``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Config: {field} must be available on this machine; got 'cuda' without a CUDA GPU. {fix}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"Config: {field} must be available on this machine; got 'mps' without Apple MPS. {fix}")
    return torch.device(name)


def make_sampler(data: ImageClasses | SinusoidFamily, config: RunConfig, split: str,
                 seed: int) -> EpisodeSampler | SinusoidSampler | ClassBatchSampler:
    """The sampler for ``split``: training tasks (with augmentation) or evaluation tasks
    (``val``/``test``: the ``eval`` section, no augmentation). Algorithms that pretrain on
    standard mini-batches (``training_data == "batches"``) get a :class:`ClassBatchSampler`
    for the training split."""
    t = config.task if split == "train" else config.eval
    if isinstance(data, SinusoidFamily):
        return data.sampler(t.k_shots, t.n_queries, seed)
    workers = getattr(config.data, "workers", None)
    if split == "train" and get_algorithm(config.algorithm.name).training_data == "batches":
        return ClassBatchSampler(data, rotations=config.data.rotations, augment=config.augment.augmenter(),
                                 seed=seed, owner="Sampler (train split)", workers=workers)
    rotations = config.data.rotations
    if split != "train" and config.eval.rotations is not None:
        rotations = config.eval.rotations
    return EpisodeSampler(
        data, t.n_ways, t.k_shots, t.n_queries,
        rotations=rotations, within_group=t.within_group,
        augment=config.augment.augmenter() if split == "train" else None,
        seed=seed, owner=f"Sampler ({split} split)", workers=workers,
    )


def _with_base_classes(config: RunConfig, train: ImageClasses) -> RunConfig:
    """Record the number of pretraining classes (training classes x rotations) in the config, so
    that checkpoints rebuild the same classifier; refuse a config that says otherwise."""
    n = train.n_classes * (4 if config.data.rotations else 1)
    have = config.algorithm.n_base_classes
    if have is None:
        return config.model_copy(update={"algorithm": config.algorithm.model_copy(update={"n_base_classes": n})})
    if have != n:
        raise ConfigError(
            f"Config: algorithm.n_base_classes must equal the training classes (x4 with rotations); got "
            f"{have} for {n} classes in the data. Remove the field (it is filled in) or fix the data."
        )
    return config


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
    import shutil

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


#: class names are listed (printed and stored in checkpoints) for splits of at most this many classes
MAX_LISTED_CLASSES = 20


def describe_split(splits: dict[str, Any], config: RunConfig, given: bool = False) -> dict[str, Any] | None:
    """What the run trains, validates and tests on: the classes of every split (their number,
    images, and names where at most :data:`MAX_LISTED_CLASSES`), whether rotated copies count as
    classes, and how the split was made. None for data that is not a set of classes (sinusoids:
    every split draws tasks from the same family with its own seed). ``given``: the splits were
    passed in (``Trainer(splits=...)``), not read as the data config says."""
    if not all(isinstance(splits.get(s), ImageClasses) for s in ("train", "val", "test")):
        return None
    dc = config.data
    rotations = bool(getattr(dc, "rotations", False))
    eval_rotations = rotations if config.eval.rotations is None else bool(config.eval.rotations)
    how = "the splits passed to the Trainer" if given else dc.split_description() if hasattr(
        dc, "split_description") else (
        f"protocol {dc.protocol}" if getattr(dc, "protocol", None) else "the source's own split")
    return {
        "source": dc.name,
        "how": how,
        "classes": {s: splits[s].n_classes for s in ("train", "val", "test")},
        "images": {s: splits[s].n_images for s in ("train", "val", "test")},
        "rotations": {"train": rotations, "val": eval_rotations, "test": eval_rotations},
        "names": {s: list(splits[s].class_names) for s in ("train", "val", "test")
                  if splits[s].n_classes <= MAX_LISTED_CLASSES},
    }


def split_lines(split: dict[str, Any]) -> list[str]:
    """``split`` (see :func:`describe_split`; from a checkpoint, any key but ``source`` may be
    missing) as printable lines."""
    c, rot = split.get("classes") or {}, split.get("rotations") or {}
    counts = ", ".join(f"{s} {c[s]} classes" + (" (x4 with rotations)" if rot.get(s) else "")
                       for s in ("train", "val", "test") if s in c)
    how = f": {split['how']}" if split.get("how") else ""
    lines = [f"data split: {counts or 'classes not recorded'} ({split.get('source')} data{how})"]
    for s, names in (split.get("names") or {}).items():
        lines.append(f"  {s} classes: " + ", ".join(n if n.isprintable() else short_repr(n, 60) for n in names))
    return lines


def _check_split_sizes(split: dict[str, Any], config: RunConfig) -> None:
    """Refuse a split with fewer classes (rotated copies included) than its tasks' n_ways, before
    anything is trained: a short test split would otherwise be found only after training."""
    episodic = get_algorithm(config.algorithm.name).training_data != "batches"
    for s, field, n_ways in (("train", "task.n_ways", config.task.n_ways if episodic else 0),
                             ("val", "eval.n_ways", config.eval.n_ways), ("test", "eval.n_ways", config.eval.n_ways)):
        have = split["classes"][s] * (4 if split["rotations"][s] else 1)
        if have >= n_ways:
            continue
        counts = "/".join(str(split["classes"][k]) for k in ("train", "val", "test"))
        more = {"train": "smaller data.val_fraction/data.test_fraction", "val": "a larger data.val_fraction",
                "test": "a larger data.test_fraction"}[s]
        fix = (f"Lower {field}, or give the split more classes ({more}, or more class folders in {s}/)"
               if split["how"].startswith(("the classes of", "the train/")) else f"Lower {field}")
        raise ConfigError(
            f"Trainer: the {s} split must have at least {field}={n_ways} classes; got {have} "
            f"({'rotations included; ' if split['rotations'][s] else ''}train/val/test classes {counts}, "
            f"{split['how']}). {fix}."
        )


def _split_warnings(split: dict[str, Any], config: RunConfig) -> list[str]:
    out = []
    if split["source"] == "folder" and split["rotations"]["train"]:
        out.append(
            "warning: data.rotations is on: every class also counts as 3 more classes, its copies rotated by 90, "
            "180 and 270 degrees (in training, and in validation/test unless eval.rotations=false). Right for "
            "handwriting like Omniglot, wrong where a rotated image is something else (6 and 9) or never occurs "
            "(photos): set data.rotations=false.")
    n_ways = config.eval.n_ways
    for s in ("val", "test"):
        have = split["classes"][s]
        if split["rotations"][s] and have < n_ways:
            out.append(
                f"warning: the {s} split has {have} classes, fewer than eval.n_ways={n_ways}: its {n_ways}-way tasks "
                f"reach {n_ways} classes only with rotated copies of the same classes. Lower eval.n_ways or give "
                f"the split more classes" + (f" (a larger data.{s}_fraction, or more class folders in {s}/)."
                                            if split["how"].startswith(("the classes of", "the train/"))
                                            else "."))
    return out


def stop_line(stop: dict[str, Any]) -> str:
    """One line saying why training ended early (a ``TrainResult.stop`` / report ``stop``)."""
    if stop.get("reason") != "max_minutes":
        return f"training ran all {stop.get('meta_steps')} steps (train.meta_steps)"
    return (f"the time budget train.max_minutes={stop['max_minutes']:g} ended training at step {stop['step']} of "
            f"{stop['meta_steps']} (raise train.max_minutes, or set it to null to run all train.meta_steps; "
            "--resume --set train.max_minutes=... continues this run)")


_EMPTY_WINDOW = {"loss": 0.0, "acc": 0.0, "n": 0, "steps": 0, "seconds": 0.0}

#: the config fields that a resumed run must share with its checkpoint: they shape the model (its
#: tensors, how inputs reach it, what it computes and how it adapts) or the optimizer state that
#: the checkpoint restores; where the data lives, the step budget and the logging may change
RESUME_FIXED = ("algorithm", "backbone", "data", "task", "train.optimizer", "train.momentum", "train.weight_decay")
RESUME_FREE = ("backbone.weights", "backbone.weights_prefix", "backbone.weights_strict", "backbone.pretrained",
               "data.root", "data.cache_dir", "data.download", "data.workers", "data.storage", "data.memory_budget_gb")


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int
    best_step: int
    best_val: EvalResult | None
    train_seconds: float
    checkpoint: Path
    #: why training ended: ``{"reason": "meta_steps" | "max_minutes", "step", "meta_steps", "max_minutes"}``
    stop: dict[str, Any] | None = None
    #: ``<out_dir>/learning_curve.png`` (None: not drawn, see :meth:`Trainer.write_learning_curve`)
    learning_curve: Path | None = None


class Trainer:
    """Meta-train ``config``'s algorithm. ``splits`` may be passed to bypass dataset loading."""

    def __init__(self, config: RunConfig, splits: dict[str, ImageClasses] | None = None,
                 out_dir: str | Path | None = None, pretrained: bool = True,
                 on_validate: Callable[[int, EvalResult], None] | None = None) -> None:
        """``pretrained=False`` skips reading ``backbone.weights`` (a run about to resume from
        its own checkpoint). ``on_validate(step, result)`` is called after every validation (on
        every rank, with the same result); an exception it raises (e.g. ``optuna.TrialPruned``)
        stops training and propagates after the log is closed."""
        config = resolve_config(config)
        self.config = config
        self.on_validate = on_validate
        self.out_dir = Path(out_dir or config.out_dir)
        tc = config.train
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        self.device = resolve_device(tc.device)
        self.dist: DistContext = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.splits = splits if splits is not None else load_splits(config.data)
        if config.data.name == "folder" and config.data.channels != (channels := int(self.splits["train"].images.shape[1])):
            # record the channel count inferred from the images, so checkpoints rebuild the same model
            config = config.model_copy(update={"data": config.data.model_copy(update={"channels": channels})})
            self.config = config
        if getattr(config.data, "needs_statistics", lambda: False)():
            # normalisation statistics of the training images, recorded so checkpoints rebuild the same model
            config = self.config = config.model_copy(
                update={"data": config.data.with_statistics(self.splits["train"])})
        if get_algorithm(config.algorithm.name).training_data == "batches":
            config = self.config = _with_base_classes(config, self.splits["train"])
        self._check_divisible(config)
        #: the classes of every split (see :func:`describe_split`): logged when training starts,
        #: written to ``split.json`` and into every checkpoint's metadata
        self.split = describe_split(self.splits, config, given=splits is not None)
        if self.split is not None:
            if self.dist.is_main:
                for line in split_lines(self.split):
                    logger.info("%s", line)
                for line in _split_warnings(self.split, config):
                    logger.warning("%s", line)
            _check_split_sizes(self.split, config)
        torch.manual_seed(config.seed)
        self.model: Algorithm = build_model(config, pretrained=pretrained).to(self.device)
        self.dist.broadcast_module(self.model)
        self.channels_last = tc.channels_last and self.device.type in ("cpu", "cuda")
        executor = getattr(self.model, "executor", None)
        if self.channels_last and executor is not None and executor.resolve(self.device)[0] == "vmap":
            # memory-format queries are not implemented under torch.func.vmap (cuDNN BatchNorm asks)
            self.channels_last = False
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_sampler = make_sampler(self.splits["train"], config, "train", config.seed + 1)
        self.val_sampler = make_sampler(self.splits["val"], config, "val", 0)
        self.val_episodes = self.val_sampler.fixed_episodes(config.eval.val_episodes, config.eval.seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if tc.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=tc.meta_lr, weight_decay=tc.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=tc.meta_lr, momentum=tc.momentum,
                                             weight_decay=tc.weight_decay)
        self.step = 0
        self.best_val: float = -math.inf
        self.best_step = 0
        self.best_result: EvalResult | None = None
        self.train_seconds = 0.0
        # seconds per phase: waiting for / assembling data, augmenting it, forward, backward, optimizer
        self.timing = {"data_s": 0.0, "augment_s": 0.0, "forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
        self.monitor = Monitor(config.monitor)
        self.events = {"skipped": 0, "rolled_back": 0, "flagged": 0}
        # running sums of the steps since the last training row (checkpointed: a resumed run logs the same rows)
        self.window = dict(_EMPTY_WINDOW)
        self.stop: dict[str, Any] | None = None  # why the last fit() ended
        self._fitted = False  # a second fit() of this trainer continues its own run in out_dir

    def _check_divisible(self, config: RunConfig) -> None:
        world = self.dist.world_size
        if world == 1:
            return
        batches = get_algorithm(config.algorithm.name).training_data == "batches"
        field, size = (("algorithm.batch_size", config.algorithm.batch_size) if batches
                       else ("train.meta_batch_size", config.train.meta_batch_size))
        if size % world:
            raise ConfigError(
                f"Config: {field} must be divisible by the number of processes ({world}); got {size}. "
                f"It is the global batch, split evenly across ranks: use a multiple of {world} or change "
                "--nproc_per_node."
            )

    # -- schedule -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        tc = self.config.train
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

    # -- checkpoints ----------------------------------------------------------------------
    def _resume_tensors(self) -> dict[str, torch.Tensor]:
        optim, _ = split_optimizer_state(self.optimizer.state_dict())
        return {"rng.torch": torch.get_rng_state(), "rng.sampler": self.train_sampler.get_state(), **optim}

    def _resume_meta(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        _, scalars = split_optimizer_state(sd)
        return {
            "train_state": {
                "optimizer": self.config.train.optimizer,
                "param_groups": sd["param_groups"],
                "optimizer_scalars": scalars,
                "best_val": self.best_val if math.isfinite(self.best_val) else None,
                "best_step": self.best_step,
                "best_result": self.best_result.to_dict() if self.best_result else None,
                "train_seconds": self.train_seconds,
                "timing": self.timing,
                "monitor": self.monitor.state(),
                "events": self.events,
                "window": self.window,
            }
        }

    def save(self, name: str, metrics: dict | None = None, resumable: bool = True) -> Path:
        """Write a checkpoint (rank 0 only; the other ranks wait until it is on disk)."""
        path = self.out_dir / name
        if self.dist.is_main:
            extra = {**({"split": self.split} if self.split is not None else {}),
                     **(self._resume_meta() if resumable else {})}
            save_checkpoint(
                path, self.model, self.config, step=self.step, metrics=metrics or {},
                extra_tensors=self._resume_tensors() if resumable else None,
                extra_meta=extra or None,
            )
        self.dist.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> None:
        """Restore model, optimizer, RNG and sampler state from ``path`` (default: last.safetensors)."""
        path = Path(path) if path else self.out_dir / "last.safetensors"
        if not path.is_file():
            raise CheckpointError(
                f"Trainer: resume needs an existing checkpoint; got no file at {str(path)!r}. "
                "Run without --resume first, or point --resume at a last.safetensors file."
            )
        self._restore(path, everything=True)

    def _restore(self, path: Path, everything: bool) -> None:
        """Load model and optimizer state from ``path``; ``everything`` also restores the RNG and
        sampler streams, timings and best-so-far (resume) rather than continuing them (rollback).
        Every tensor is checked against this trainer's model and optimizer before it is used."""
        meta, tensors = read_checkpoint(path)  # metadata validated (CheckpointMeta, TrainStateMeta)
        ts = meta.get("train_state")
        if meta.get("kind") == "rl":
            raise CheckpointError(
                f"Trainer: resume needs a few-shot checkpoint; got a meta-RL checkpoint {str(path)!r}. Resume it "
                "with metafit rl train --resume."
            )
        if ts is None:
            raise CheckpointError(
                f"Trainer: resume needs a checkpoint with training state; got {str(path)!r} which holds "
                "only model weights (best/step checkpoints do not). Resume from last.safetensors."
            )
        stored = stored_config(meta, path).to_dict()
        diff = config_difference(stored, self.config.to_dict(), RESUME_FIXED, RESUME_FREE)
        if diff is not None:
            key, theirs, ours = diff
            raise CheckpointError(
                f"Trainer: {key} must be {short_repr(theirs)} as in the checkpoint being resumed ({str(path)!r}); "
                f"got {short_repr(ours)}. Resume with the run's config (--set {key}={json.dumps(theirs)}), or "
                "train into another out_dir."
            )
        state = model_state(tensors)
        check_tensors(state, self.model.state_dict(), path)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        scalars = ts.get("optimizer_scalars", {})
        check_optimizer_state(tensors, scalars, ts["param_groups"],
                              self.optimizer.state_dict()["param_groups"], params, path)
        if everything:
            rng = check_rng_state(tensors, "rng.torch", torch.get_rng_state(), path)
            sampler_state = self.train_sampler.get_state()
            older = (sampler_state.numel() // 2,) if isinstance(self.train_sampler, SamplerStreams) else ()
            sampler = check_rng_state(tensors, "rng.sampler", sampler_state, path, sizes=older)  # older: one stream
        self.model.load_state_dict(state)
        self.optimizer.load_state_dict(join_optimizer_state(tensors, scalars, ts["param_groups"],
                                                            self.device))
        self.step = int(meta["step"])
        if not everything:
            return
        torch.set_rng_state(rng)
        self.train_sampler.set_state(sampler)
        self.monitor.load_state(ts.get("monitor"))
        self.events = {**self.events, **ts.get("events", {})}
        self.best_val = ts["best_val"] if ts.get("best_val") is not None else -math.inf
        self.best_step = ts.get("best_step", 0)
        self.best_result = EvalResult(**ts["best_result"]) if ts.get("best_result") else None
        self.train_seconds = ts.get("train_seconds", 0.0)
        self.timing = {**dict.fromkeys(self.timing, 0.0), **ts.get("timing", {})}
        self.window = {**_EMPTY_WINDOW, **(ts.get("window") or {})}  # older checkpoints: saved at a logged step

    # -- the loop -------------------------------------------------------------------------
    def _batch(self) -> TaskBatch | LabelledBatch:
        if isinstance(self.train_sampler, ClassBatchSampler):
            batch = self.train_sampler.sample(self.config.algorithm.batch_size // self.dist.world_size,
                                              self.dist.rank, self.dist.world_size).to(self.device)
            if self.channels_last and batch.x.ndim == 4:
                batch = LabelledBatch(batch.x.contiguous(memory_format=torch.channels_last), batch.y)
            return batch
        batch = self.train_sampler.sample(self.config.train.meta_batch_size // self.dist.world_size,
                                          self.dist.rank, self.dist.world_size).to(self.device)
        if self.channels_last and batch.support_x.ndim == 5:  # [B, N, C, H, W] images
            cl = torch.channels_last
            b = batch
            batch = TaskBatch(b.support_x.flatten(0, 1).contiguous(memory_format=cl).view_as(b.support_x),
                              b.support_y, b.query_x.flatten(0, 1).contiguous(memory_format=cl).view_as(b.query_x),
                              b.query_y, b.n_ways)
        return batch

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def validate(self) -> EvalResult:
        return evaluate_episodes(self.model, self.val_sampler, self.val_episodes, self.device, self.channels_last)

    def _prepare_folder(self, resume: bool | str | Path, overwrite: bool) -> None:
        """Refuse a folder holding an earlier run unless resuming or overwriting (rank 0 looks, every
        rank raises alike); with ``overwrite``, delete that run's files (rank 0)."""
        continuing = self._fitted and not resume and not overwrite
        problem = None
        if self.dist.is_main:
            # temp files of writes that a killed run left half done (no write of this run is in flight)
            remove_stale_temp_files(self.out_dir)
            try:
                check_run_folder(self.out_dir, resume, overwrite or continuing)
            except ConfigError as err:
                problem = str(err)
        problem = self.dist.broadcast(problem)
        if problem is not None:
            raise ConfigError(problem)
        if overwrite and self.dist.is_main:
            removed = remove_run_files(self.out_dir)
            if removed:
                logger.info("overwrite: deleted the earlier run's files in %s (%s)", self.out_dir,
                            ", ".join(removed[:6]) + (f" and {len(removed) - 6} more" if len(removed) > 6 else ""))
        self.dist.barrier()

    def fit(self, resume: bool | str | Path = False, overwrite: bool = False) -> TrainResult:
        """Train until ``train.meta_steps`` (or the ``train.max_minutes`` budget). A folder that
        already holds something is refused unless ``resume`` (continue the run there: True for its
        ``last.safetensors``, or a checkpoint path) or ``overwrite`` (delete that run's files
        first); a second ``fit()`` of the same trainer continues its own run."""
        tc = self.config.train
        main = self.dist.is_main
        continuing = self._fitted and not resume and not overwrite
        self._prepare_folder(resume, overwrite)
        if resume:
            self.resume(None if resume is True else resume)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / "config.json", self.config.to_dict())
            if self.split is not None:
                write_json(self.out_dir / "split.json", {**self.split, "class_names": {
                    s: list(self.splits[s].class_names) for s in ("train", "val", "test")}})
        self._fitted = True
        self.stop = None
        # on resume, the rows logged after the checkpoint's step are removed: the replayed steps log them again
        log = MetricsLog(self.out_dir, append=bool(resume) or continuing,
                         resume_step=self.step if resume else None) if main else None
        tb = TensorBoardLog(self.out_dir, main and tc.tensorboard, purge_step=self.step + 1 if resume else None)
        bar = tqdm(total=tc.meta_steps, initial=self.step, disable=not (tc.progress and main), desc="meta-train",
                   dynamic_ncols=True)
        if self.config.monitor.policy == "rollback" and not (self.out_dir / "last.safetensors").exists():
            self.save("last.safetensors", self._metrics())  # the state a rollback before the first save returns to
        window = self.window
        fit_start, seconds_before = time.perf_counter(), self.train_seconds
        try:
            while self.step < tc.meta_steps:
                if tc.max_minutes is not None and self.dist.broadcast(self.train_seconds >= 60.0 * tc.max_minutes):
                    self.stop = {"reason": "max_minutes", "step": self.step, "meta_steps": tc.meta_steps,
                                 "max_minutes": tc.max_minutes}
                    self._write(log, tb, {"step": self.step, "split": "stop", "event": "max_minutes",
                                          "elapsed_s": self.train_seconds})
                    self._validate_and_keep_best(log, tb)
                    break
                t0 = time.perf_counter()
                lr = self.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                aug_before = getattr(self.train_sampler, "augment_seconds", 0.0)
                batch = self._batch()
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
                loss_value, acc_value = self.dist.mean([float(out.loss.detach()), float(out.accuracy)], self.device)
                self._sync()
                t3 = time.perf_counter()
                if tc.grad_clip is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
                else:
                    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
                action = self._judge(log, tb, loss_value, grad_norm)
                if action == "rollback":
                    bar.n = self.step
                    bar.refresh()
                    continue
                if action == "apply":
                    self.optimizer.step()
                self.dist.average_buffers(self.model)
                self._sync()
                t4 = time.perf_counter()
                self.step += 1
                for key, dt in zip(self.timing, (t1 - t0 - aug, aug, t2 - t1, t3 - t2, t4 - t3)):
                    self.timing[key] += dt
                self.train_seconds = seconds_before + (t4 - fit_start)
                window["steps"] += 1
                window["seconds"] += t4 - t0
                if action == "apply":
                    window["loss"] += loss_value
                    window["acc"] += acc_value
                    window["n"] += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.meta_steps:
                    metric = "mse" if self.model.task_kind == "regression" else "accuracy"
                    n = max(window["n"], 1)
                    row = {"step": self.step, "split": "train", "loss": window["loss"] / n if window["n"] else None,
                           metric: window["acc"] / n if window["n"] else None, "lr": lr, "grad_norm": grad_norm,
                           "step_s": window["seconds"] / window["steps"], "elapsed_s": self.train_seconds,
                           **self.timing}
                    self._write(log, tb, row)
                    if window["n"]:
                        bar.set_postfix(loss=f"{row['loss']:.3f}", **{metric[:3]: f"{row[metric]:.3f}"},
                                        best_val=f"{self.best_result.mean:.3f}" if self.best_result else "-")
                    window.update(_EMPTY_WINDOW)
                if self.step % tc.eval_every == 0 or self.step == tc.meta_steps:
                    self._validate_and_keep_best(log, tb)
                if self.step % tc.save_interval == 0:
                    self.save(f"step-{self.step:07d}.safetensors", self._metrics(), resumable=False)
                    self.save("last.safetensors", self._metrics())
            self.train_seconds = seconds_before + (time.perf_counter() - fit_start)
            last = self.save("last.safetensors", self._metrics())
        finally:
            bar.close()
            if log is not None:
                log.close()
            tb.close()
            self.train_sampler.close()  # stop decoding workers (lazy storage)
        if self.stop is None:
            self.stop = {"reason": "meta_steps", "step": self.step, "meta_steps": tc.meta_steps,
                         "max_minutes": tc.max_minutes}
        elif main:
            logger.info("%s", stop_line(self.stop))
        curve = self.write_learning_curve() if main else None
        best = self.out_dir / "best.safetensors"
        return TrainResult(self.out_dir, self.step, self.best_step, self.best_result,
                           self.train_seconds, best if best.exists() else last, dict(self.stop), curve)

    def write_learning_curve(self) -> Path | None:
        """Draw ``<out_dir>/learning_curve.png`` from the run's metrics.jsonl with the report's
        plotting (:func:`metafit.training.curves.plot_curves` of this one run): training loss and
        accuracy (regression: MSE) and the validation metric with its 95% CI band, against
        training time. :meth:`fit` calls it when training ends (all steps, or the time budget);
        not at every validation, so drawing never counts as training time. Without matplotlib it
        logs a note and returns None."""
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from .plots import PLOTS_EXTRA

            logger.info("learning curve not drawn: matplotlib is not installed (%s; then `metafit report %s` "
                        "draws the curves from metrics.jsonl)", PLOTS_EXTRA, self.out_dir)
            return None
        from .curves import plot_curves, read_run

        run = read_run(self.out_dir)
        run.name = self.out_dir.name
        return plot_curves([run], self.out_dir / "learning_curve.png")

    @staticmethod
    def _write(log: MetricsLog | None, tb: TensorBoardLog, row: dict) -> None:
        if log is not None:
            log.write(row)
        split = row.get("split")
        if split in ("train", "val"):
            tb.scalars(split, row, row["step"])

    # -- monitoring ------------------------------------------------------------------------
    def _judge(self, log: MetricsLog | None, tb: TensorBoardLog, loss: float, grad_norm: float) -> str:
        """Apply the monitor's verdict on this step: "apply", "skip" or "rollback" (or raise).
        Loss and gradient norm are already averaged over ranks, so every rank decides alike."""
        mc = self.config.monitor
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
        step = self.step + 1
        for f in findings:
            row = {"step": step, "split": "monitor", "event": f.event, "value": f.value,
                   "threshold": f.threshold, "median": f.median, "action": action, "loss": loss,
                   "grad_norm": grad_norm, "elapsed_s": self.train_seconds}
            if log is not None:  # rank 0
                log.write(row)
        tb.scalars("monitor", {"flagged": self.events["flagged"], "skipped": self.events["skipped"],
                               "rolled_back": self.events["rolled_back"]}, step)
        if action == "stop" or self.monitor.in_a_row > mc.patience:
            self._say(log, step, findings, "stopped training")
        if action == "stop":
            self._stop(findings, nonfinite)
        if self.monitor.in_a_row > mc.patience:
            raise TrainingError(
                f"Trainer: flagged steps must not follow each other more than monitor.patience={mc.patience} "
                f"times; got {self.monitor.in_a_row} in a row, the last at step {step} ({findings[0].describe()}). "
                "Training stopped; lower train.meta_lr, set train.grad_clip, or relax the monitor thresholds "
                "(monitor.loss_spike, monitor.grad_spike), then run again with --resume."
            )
        if action == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.events["skipped"] += 1
            self._say(log, step, findings, "skipped the step (its update is dropped; monitor.policy=skip)")
        elif action == "rollback":
            self._rollback(log, step)
            self._say(log, step, findings, f"rolled back to the checkpoint of step {self.step} "
                                           "(monitor.policy=rollback)")
        else:
            self._say(log, step, findings, "kept the step (its update is applied; monitor.policy=warn)")
        return action

    @staticmethod
    def _say(log: MetricsLog | None, step: int, findings: list[Finding], outcome: str) -> None:
        """Print each finding of a flagged step with what was done about it (rank 0)."""
        if log is None:
            return
        for f in findings:
            tqdm.write(f"step {step}: {f.describe()} -> {outcome}")
            if monitor_logger.hasHandlers():  # else logging's last-resort handler would print it a second time
                monitor_logger.warning("step %d: %s -> %s", step, f.describe(), outcome)

    def _stop(self, findings: list[Finding], nonfinite: bool) -> None:
        last = self.out_dir / "last.safetensors"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        f = findings[0]
        if nonfinite:
            what = "loss" if f.event == "nonfinite_loss" else "gradient norm"
            raise TrainingError(
                f"Trainer: the {what} must be finite; got {f.value} at step {self.step + 1}. Training "
                f"stopped and {kept}. Lower train.meta_lr or set train.grad_clip (or monitor.policy=skip "
                "or rollback to step over such batches), then run again (with --resume to continue from "
                "the last checkpoint)."
            )
        raise TrainingError(
            f"Trainer: rollbacks must not exceed monitor.max_rollbacks={self.config.monitor.max_rollbacks}; got "
            f"another at step {self.step + 1} ({f.describe()}). Training stopped and {kept}. Lower "
            "train.meta_lr or set train.grad_clip, then run again with --resume."
        )

    def _rollback(self, log: MetricsLog | None, step: int) -> None:
        """Reload weights and optimizer state from ``last.safetensors``; the task stream, timers
        and best-so-far continue (the batches that caused the trouble are not replayed)."""
        path = self.out_dir / "last.safetensors"
        self.monitor.rollbacks += 1
        self.events["rolled_back"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._restore(path, everything=False)
        if log is not None:
            log.write({"step": step, "split": "monitor", "event": "rollback", "action": "rollback",
                       "to_step": self.step, "elapsed_s": self.train_seconds})

    def _metrics(self) -> dict:
        return {"best_val": self.best_result.to_dict() if self.best_result else None,
                "best_step": self.best_step, "train_seconds": self.train_seconds}

    def _validate_and_keep_best(self, log: MetricsLog | None, tb: TensorBoardLog) -> None:
        if self.best_step == self.step and self.best_result is not None:
            return  # already validated at this step
        res = self.validate()  # every rank: the same model on the same episodes
        self._write(log, tb, {"step": self.step, "split": "val", "loss": res.loss, res.metric: res.mean,
                              "ci95": res.ci95, "elapsed_s": self.train_seconds})
        if res.score > self.best_val:
            self.best_val, self.best_step, self.best_result = res.score, self.step, res
            self.save("best.safetensors", {"val": res.to_dict(), "train_seconds": self.train_seconds},
                      resumable=False)
        if self.on_validate is not None:
            self.on_validate(self.step, res)
