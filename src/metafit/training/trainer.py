"""The Trainer: few-shot meta-training of an algorithm, built from a config or from objects.

``Trainer(config)`` (or :meth:`Trainer.from_config`) reads the data and builds the model the
config describes; ``Trainer(algorithm=model, data=splits, optimizer=..., loop=...)`` trains a
model built in Python (its backbone from the backbone registry, see
:func:`metafit.nn.register_backbone`), composing the config that its checkpoints record so that
``metafit.load`` rebuilds it. Either way training runs through the one loop
(:class:`metafit.training.loop.Loop`: budget, cadence, best / every ``save_interval`` / last
checkpoints, exact resume, divergence guard, logs) with the few-shot run
(:class:`metafit.training.supervised.SupervisedRun`: optimizer, schedule, clipping, samplers,
validation on fixed episodes). Algorithms only provide ``meta_loss``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..algorithms import Algorithm, get_algorithm
from ..data import DataSourceConfig, ImageClasses, data_config, load_splits
from ..errors import ConfigError
from ..nn import attach_input_normalization, backbone_spec, check_rebuildable, has_input_normalization
from .config import EvalConfig, RunConfig, TaskConfig, TrainConfig, build_model, make_config, resolve_config
from .distributed import DistContext, init_distributed
from .evaluate import EvalResult
from .loop import (RUN_FILES, Loop, LoopSettings, Validation, check_run_folder, remove_run_files, stop_line)
from .splits import (check_split_sizes, describe_split, make_sampler, resolve_device, split_lines, split_warnings,
                     with_base_classes)
from .supervised import RESUME_FIXED, RESUME_FREE, SupervisedRun, lr_at

__all__ = ["RESUME_FIXED", "RESUME_FREE", "RUN_FILES", "Trainer", "TrainResult", "check_run_folder",
           "compose_config", "describe_split", "make_sampler", "remove_run_files", "resolve_device", "split_lines",
           "stop_line"]

logger = logging.getLogger(__name__)


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


def _is_splits(data: Any) -> bool:
    return isinstance(data, Mapping) and all(isinstance(data.get(s), ImageClasses) for s in ("train", "val", "test"))


def _section(value: Any, cls: type, name: str) -> Any:
    from ..validation import parse_config

    return value if isinstance(value, cls) else parse_config(cls, value, name, owner="Trainer")


def compose_config(algorithm: Algorithm, data: Any, *, optimizer: Any = None, loop: Any = None, task: Any = None,
                   eval: Any = None, augment: Any = None, monitor: Any = None, seed: int = 0,
                   out_dir: str | Path | None = None) -> RunConfig:
    """The :class:`RunConfig` that describes ``algorithm`` (a model built in Python: its config
    and its backbone's registry entry) trained on ``data`` (a ``{"train", "val", "test"}`` dict of
    :class:`~metafit.data.ImageClasses`, a data config or its mapping) with the given sections
    (config objects or mappings; ``loop`` and ``optimizer`` make up ``train``). Task settings
    default to the algorithm's number of outputs, evaluation settings to the task's."""
    if not isinstance(algorithm, Algorithm):
        raise ConfigError(f"Trainer: algorithm must be a metafit Algorithm (see metafit.algorithms.build_algorithm); "
                          f"got {type(algorithm).__name__}. Build one with build_algorithm(config, backbone).")
    check_rebuildable(algorithm.backbone)  # a one-line error naming register_backbone otherwise
    spec = backbone_spec(algorithm.backbone)
    if _is_splits(data):
        images = data["train"].images
        source = data_config({"name": "folder", "image_size": int(images.shape[-1]),
                              "channels": int(images.shape[1]), "rotations": False})
    elif isinstance(data, DataSourceConfig):
        source = data
    else:
        source = data_config(data)
    if task is None and algorithm.task_kind == "classification":
        task = {"n_ways": algorithm.n_outputs}
    task = _section(task, TaskConfig, "task")
    eval = _section(eval if eval is not None else task.model_dump(), EvalConfig, "eval")
    sections = {"augment": augment, "monitor": monitor}
    return make_config({"seed": seed, "out_dir": str(out_dir or "runs/default"), "data": source,
                        "task": task, "eval": eval, "algorithm": algorithm.config, "backbone": spec,
                        "train": TrainConfig.compose(loop, optimizer),
                        **{k: v for k, v in sections.items() if v is not None}})


class Trainer:
    """Meta-train an algorithm (see the module docstring). ``splits`` may be passed to bypass
    dataset loading."""

    def __init__(self, config: RunConfig | None = None, splits: dict[str, ImageClasses] | None = None,
                 out_dir: str | Path | None = None, pretrained: bool = True,
                 on_validate: Callable[[int, EvalResult], None] | None = None, *, algorithm: Algorithm | None = None,
                 data: Any = None, optimizer: Any = None, loop: Any = None, task: Any = None, eval: Any = None,
                 augment: Any = None, monitor: Any = None, seed: int = 0) -> None:
        """From a ``config`` (``splits``: the data, instead of reading ``config.data``), or from
        objects: ``algorithm`` (a model built in Python), ``data`` (splits or a data config),
        ``optimizer`` (:class:`~metafit.training.config.OptimizerSettings`), ``loop``
        (:class:`~metafit.training.config.TrainLoopConfig` fields: meta_steps, eval_every, ...),
        and optionally ``task``, ``eval``, ``augment``, ``monitor``, ``seed``. ``out_dir`` is where
        checkpoints and logs go (None: the config's ``out_dir``). ``pretrained=False`` skips
        reading ``backbone.weights`` (a run about to resume from its own checkpoint).
        ``on_validate(step, result)`` is called after every validation (on every rank, with the
        same result); an exception it raises (e.g. ``optuna.TrialPruned``) stops training and
        propagates after the log is closed."""
        model = None
        if algorithm is not None:
            if config is not None or splits is not None:
                raise ConfigError("Trainer: algorithm must be given without config and splits; got both. Pass a "
                                  "config (the model is built from it) or the objects (algorithm=, data=, ...).")
            config = compose_config(algorithm, data, optimizer=optimizer, loop=loop, task=task, eval=eval,
                                    augment=augment, monitor=monitor, seed=seed, out_dir=out_dir)
            model = algorithm
            splits = dict(data) if _is_splits(data) else None
        elif config is None:
            raise ConfigError("Trainer: config must be given (or algorithm= and data=); got neither. Pass "
                              "metafit.training.load_config(...) or a model built in Python.")
        self._setup(resolve_config(config), splits, out_dir, pretrained, model)
        self.on_validate = on_validate
        self.loop = Loop(self.run, LoopSettings.from_config(self.config.train), self.out_dir, dist=self.dist,
                         monitor=self.config.monitor, on_validate=self._validated, logger=logger)

    @classmethod
    def from_config(cls, config: RunConfig, **kwargs: Any) -> "Trainer":
        """The trainer of ``config`` (the model built from it); ``kwargs`` as for the constructor."""
        return cls(config, **kwargs)

    def _setup(self, config: RunConfig, splits: dict | None, out_dir: Any, pretrained: bool,
               model: Algorithm | None) -> None:
        self.out_dir = Path(out_dir or config.out_dir)
        tc = config.train
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        self.device = resolve_device(tc.device)
        self.dist: DistContext = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        given = splits is not None
        self.splits = splits if given else load_splits(config.data)
        if config.data.name == "folder" and config.data.channels != (channels := int(self.splits["train"].images.shape[1])):
            # record the channel count inferred from the images, so checkpoints rebuild the same model
            config = config.model_copy(update={"data": config.data.model_copy(update={"channels": channels})})
        if getattr(config.data, "needs_statistics", lambda: False)():
            # normalisation statistics of the training images, recorded so checkpoints rebuild the same model
            config = config.model_copy(update={"data": config.data.with_statistics(self.splits["train"])})
        if get_algorithm(config.algorithm.name).training_data == "batches":
            config = with_base_classes(config, self.splits["train"])
        self._check_divisible(config)
        #: the classes of every split (see :func:`describe_split`): logged when training starts,
        #: written to ``split.json`` and into every checkpoint's metadata
        self.split = describe_split(self.splits, config, given=given)
        if self.split is not None:
            if self.dist.is_main:
                for line in split_lines(self.split):
                    logger.info("%s", line)
                for line in split_warnings(self.split, config):
                    logger.warning("%s", line)
            check_split_sizes(self.split, config)
        if model is None:
            torch.manual_seed(config.seed)
            model = build_model(config, pretrained=pretrained)
        elif (stats := config.data.input_statistics()) is not None and not has_input_normalization(model.backbone):
            attach_input_normalization(model.backbone, *stats)
        model = model.to(self.device)
        self.dist.broadcast_module(model)
        channels_last = tc.channels_last and self.device.type in ("cpu", "cuda")
        executor = getattr(model, "executor", None)
        if channels_last and executor is not None and executor.resolve(self.device)[0] == "vmap":
            # memory-format queries are not implemented under torch.func.vmap (cuDNN BatchNorm asks)
            channels_last = False
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.run = SupervisedRun(config, model, self.splits, self.split, self.device, self.dist, channels_last)

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

    # -- what the run and the loop hold ------------------------------------------------------------
    @property
    def config(self) -> RunConfig:
        return self.run.config

    @config.setter
    def config(self, value: RunConfig) -> None:
        self.run.config = value

    model = property(lambda self: self.run.model)
    optimizer = property(lambda self: self.run.optimizer)
    train_sampler = property(lambda self: self.run.train_sampler)
    val_sampler = property(lambda self: self.run.val_sampler)
    val_episodes = property(lambda self: self.run.val_episodes)
    best_result = property(lambda self: self.run.best_result)
    timing = property(lambda self: self.run.timing)
    step = property(lambda self: self.loop.step)
    best_step = property(lambda self: self.loop.best_step)
    best_val = property(lambda self: self.loop.best_score)
    train_seconds = property(lambda self: self.loop.seconds)
    stop = property(lambda self: self.loop.stop)
    events = property(lambda self: self.loop.guard.events)
    monitor = property(lambda self: self.loop.guard.monitor)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` under the ``train`` section's schedule and warm-up."""
        return lr_at(self.config.train, step)

    def validate(self) -> EvalResult:
        """The model's result on the fixed validation episodes (logs and checkpoints nothing)."""
        return self.run.evaluate()

    def _validated(self, step: int, validation: Validation) -> None:
        if self.on_validate is not None:
            self.on_validate(step, validation.kept)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, name: str, metrics: dict | None = None, resumable: bool = True) -> Path:
        """Write ``out_dir/name`` (rank 0 only; the other ranks wait until it is on disk) and return
        its path: the model, with ``metrics`` in its metadata (None: the best validation result, its
        step and the training time so far), and with ``resumable`` the optimizer, random and loop
        state that :meth:`resume` needs."""
        return self.loop.save(name, metrics, resumable)

    def resume(self, path: str | Path | None = None) -> None:
        """Restore model, optimizer, RNG and sampler state from ``path`` (default: last.safetensors)."""
        self.loop.resume(path)

    def fit(self, resume: bool | str | Path = False, overwrite: bool = False) -> TrainResult:
        """Train until ``train.meta_steps`` (or the ``train.max_minutes`` budget). A folder that
        already holds something is refused unless ``resume`` (continue the run there: True for its
        ``last.safetensors``, or a checkpoint path) or ``overwrite`` (delete that run's files
        first); a second ``fit()`` of the same trainer continues its own run."""
        self.loop.settings = LoopSettings.from_config(self.config.train)  # (the config may have changed)
        self.loop.out_dir = self.out_dir
        last = self.loop.fit(resume, overwrite)
        curve = self.write_learning_curve() if self.dist.is_main else None
        best = self.out_dir / "best.safetensors"
        return TrainResult(self.out_dir, self.step, self.best_step, self.best_result, self.train_seconds,
                           best if best.exists() else last, dict(self.stop), curve)

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
