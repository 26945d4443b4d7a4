"""The run configuration: every section validated, frozen, and round-trippable through YAML,
``--set key=value`` overrides and checkpoint metadata."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, SerializeAsAny, model_validator

from ..algorithms import Algorithm, AlgorithmConfig, algorithm_config, build_algorithm
from ..data import DataSourceConfig, ImageAugment, data_config
from ..errors import ConfigError
from ..nn import EnsembleConfig, attach_input_normalization, backbone_config, build_backbone, resolve_backbone_config
from ..validation import ConfigModel, load_yaml, parse_config, set_by_path
from .monitor import MonitorConfig
from .pretrained import load_backbone_weights

__all__ = [
    "AugmentConfig",
    "EvalConfig",
    "LoopConfig",
    "MonitorConfig",
    "OptimizerSettings",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "build_model",
    "builtin_configs",
    "load_config",
    "make_config",
    "resolve_config",
]


#: most examples (support + query, over the tasks of one meta-batch) one training step may hold
MAX_EXAMPLES_PER_STEP = 2**18


class TaskConfig(ConfigModel):
    """The ``task`` section: the shape of the training tasks (ways, shots, queries per class)."""

    n_ways: int = Field(5, ge=2, le=1000, description="classes per task")
    k_shots: int = Field(1, ge=1, le=1000, description="support examples per class")
    n_queries: int = Field(15, ge=1, le=1000, description="query examples per class")
    within_group: bool = Field(False, description="draw all classes of a task from one group (alphabet)")


class EvalConfig(TaskConfig):
    """The ``eval`` section: the shape of the validation and test tasks (the fields of
    :class:`TaskConfig`), how many fixed episodes each split uses, their seed, and whether the best
    checkpoint is calibrated."""

    rotations: bool | None = Field(
        None, description="rotated classes in validation/test episodes (None: follow data.rotations)"
    )
    val_episodes: int = Field(200, ge=1, le=100_000,
                              description="fixed validation episodes used to pick the best checkpoint")
    test_episodes: int = Field(1000, ge=1, le=100_000, description="fixed test episodes for the final report")
    seed: int = Field(2024, ge=0, description="seed of the fixed validation/test episodes")
    calibrate: bool = Field(
        True, description="after training, fit a softmax temperature on the validation episodes and store it "
        "in the best checkpoint (classification)"
    )


class AugmentConfig(ConfigModel):
    """Training-time augmentation, applied to whole batches as tensors and seeded (see
    :mod:`metafit.data.augment`). Validation, test and adaptation images are never augmented."""

    crop: Literal["none", "random", "resized"] = Field(
        "none", description="random: a random image-size crop of the image zero-padded by crop_padding; resized: a "
        "random area fraction in [crop_scale_min, 1] and aspect ratio in [3/4, 4/3], resized back")
    crop_padding: int = Field(8, ge=0, le=512, description="crop=random: padding in pixels")
    crop_scale_min: float = Field(0.08, gt=0.0, le=1.0, description="crop=resized: smallest area fraction")
    flip: bool = Field(False, description="random horizontal flip")
    color_jitter: float = Field(0.0, ge=0.0, le=1.0, description="brightness, contrast and saturation factors drawn "
                                "from [1 - s, 1 + s] (0: off)")
    hue: float = Field(0.0, ge=0.0, le=0.5, description="hue shift drawn from [-hue, hue] of a full turn (0: off)")
    rand_augment: bool = Field(False, description="RandAugment (Cubuk et al. 2020) with rand_augment_n operations")
    rand_augment_n: int = Field(2, ge=1, le=10, description="RandAugment: operations per image")
    rand_augment_m: int = Field(9, ge=0, le=30, description="RandAugment: magnitude (0-30)")
    affine: bool = Field(False, description="random affine transform of training images")
    degrees: float = Field(10.0, ge=0.0, le=180.0, description="affine: rotation drawn from [-degrees, degrees]")
    translate: float = Field(0.1, ge=0.0, le=0.5, description="fraction of the image size")
    scale_min: float = Field(0.9, gt=0.0, le=10.0, description="affine: smallest zoom factor (at most scale_max)")
    scale_max: float = Field(1.1, gt=0.0, le=10.0, description="affine: largest zoom factor")
    shear: float = Field(0.0, ge=0.0, le=60.0, description="degrees")
    elastic_alpha: float = Field(
        0.0, ge=0.0, le=1000.0,
        description="elastic distortion (Simard et al. 2003): scale of the smoothed random displacement "
        "field, in pixels of the image at data.image_size (0: off; Simard used 34 at 28 x 28)",
    )
    elastic_sigma: float = Field(
        4.0, gt=0.0, le=100.0,
        description="elastic distortion: standard deviation in pixels of the Gaussian that smooths the field",
    )

    @model_validator(mode="after")
    def _scale(self):
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must not exceed scale_max")
        return self

    def augmenter(self) -> ImageAugment | None:
        """The pipeline these settings describe (None: no augmentation)."""
        affine = (dict(degrees=self.degrees, translate=self.translate, scale=(self.scale_min, self.scale_max),
                       shear=self.shear) if self.affine else None)
        aug = ImageAugment(crop=self.crop, crop_padding=self.crop_padding, crop_scale_min=self.crop_scale_min,
                           flip=self.flip, color_jitter=self.color_jitter, hue=self.hue,
                           rand_augment=self.rand_augment, rand_augment_n=self.rand_augment_n,
                           rand_augment_m=self.rand_augment_m, affine=affine,
                           elastic=(dict(alpha=self.elastic_alpha, sigma=self.elastic_sigma)
                                    if self.elastic_alpha > 0 else None))
        return aug if (aug.uses_kornia or affine is not None or aug.elastic is not None) else None


class LoopConfig(ConfigModel):
    """Settings of the training loop (:class:`metafit.training.loop.Loop`) shared by supervised
    (``train``) and meta-RL (``rl train``) runs: budget, cadence, threads and what is shown."""

    max_minutes: float | None = Field(
        None, gt=0.0, description="wall-clock budget: stop (and validate) once training took this long"
    )
    num_threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads (None: torch's default)")
    progress: bool = Field(True, description="show a progress bar")
    tensorboard: bool = Field(
        True, description="write TensorBoard event files to <out_dir>/tensorboard (needs the tensorboard package)"
    )
    eval_every: int = Field(500, ge=1, description="validate every this many steps")
    save_interval: int = Field(1000, ge=1, description="keep a numbered checkpoint every this many steps")
    weight_average: float = Field(
        0.0, ge=0.0, lt=1.0, description="decay of an exponential moving average of the weights, updated after "
                                         "every applied update (e.g. 0.999; 0: off). Each validation scores it "
                                         "beside the live weights and best.safetensors keeps whichever scores "
                                         "higher; few-shot runs average BatchNorm statistics too")


class OptimizerSettings(ConfigModel):
    """The outer-loop optimizer of a few-shot run and its learning-rate schedule."""

    optimizer: Literal["adam", "sgd"] = Field("adam", description="outer-loop optimizer (sgd uses momentum)")
    meta_lr: float = Field(1e-3, gt=0.0, description="outer-loop learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 penalty passed to the optimizer (0: off)")
    lr_schedule: Literal["constant", "step", "cosine", "linear"] = Field(
        "constant", description="learning rate after warm-up: constant; step (times lr_gamma every lr_step_size "
        "steps); cosine or linear (annealed to 0 at meta_steps)")
    lr_step_size: int = Field(2000, ge=1, description="step schedule: steps between decays")
    lr_gamma: float = Field(0.5, gt=0.0, le=1.0, description="step schedule: decay factor")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the global gradient norm (None: off)")


class TrainLoopConfig(LoopConfig):
    """The loop settings of a few-shot run (the ``train`` section less the optimizer's)."""

    meta_steps: int = Field(1000, ge=1, description="optimizer steps (one meta-batch each)")
    meta_batch_size: int = Field(1, ge=1, le=4096, description="tasks per optimizer step (episodic algorithms; "
                                 "transfer uses algorithm.batch_size images)")
    log_every: int = Field(50, ge=1, description="write a metrics line every this many steps")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where the run trains (auto: cuda when available, else cpu)")
    channels_last: bool = Field(True, description="channels_last memory format for conv backbones")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast the training forward pass to bfloat16 (evaluation stays fp32)"
    )


class TrainConfig(TrainLoopConfig, OptimizerSettings):
    """The ``train`` section of a few-shot run: its loop (:class:`TrainLoopConfig`) and its
    optimizer (:class:`OptimizerSettings`)."""

    @classmethod
    def compose(cls, loop: Any = None, optimizer: Any = None) -> "TrainConfig":
        """A train section from its two parts, ``loop`` (the :class:`TrainLoopConfig` fields) and
        ``optimizer`` (the :class:`OptimizerSettings` fields), each a config object or a mapping of
        its fields (None: defaults)."""
        parts = {}
        for part, model, name in ((loop, TrainLoopConfig, "loop"), (optimizer, OptimizerSettings, "optimizer")):
            if isinstance(part, ConfigModel):  # (e.g. a whole train section: its fields of this part)
                part = part.model_dump(exclude_unset=True, include=set(model.model_fields))
            parts.update(parse_config(model, part, name, owner="Trainer").model_dump(exclude_unset=True))
        return parse_config(cls, parts, "train", owner="Trainer")

    def optimizer_settings(self) -> OptimizerSettings:
        """The optimizer part of this section, as an :class:`OptimizerSettings`."""
        return OptimizerSettings(**self.model_dump(include=set(OptimizerSettings.model_fields)))


class RunConfig(ConfigModel):
    """A whole few-shot run: its seed and output folder, and one section per concern (``data``,
    ``task``, ``eval``, ``augment``, ``algorithm``, ``backbone``, ``train``, ``monitor``). A
    meta-batch may hold at most ``MAX_EXAMPLES_PER_STEP`` examples."""

    seed: int = Field(0, ge=0, description="seed of initialisation and training episodes")
    out_dir: str = Field("runs/default", description="where checkpoints and logs go")
    data: SerializeAsAny[DataSourceConfig] = Field(
        default_factory=lambda: data_config({}), description="the data source (data.name selects it)")
    task: TaskConfig = Field(TaskConfig(), description="training tasks")
    eval: EvalConfig = Field(EvalConfig(), description="validation and test tasks")
    augment: AugmentConfig = AugmentConfig()
    algorithm: SerializeAsAny[AlgorithmConfig] = Field(default_factory=lambda: algorithm_config({}))
    backbone: SerializeAsAny[ConfigModel] = Field(default_factory=lambda: backbone_config({}))
    train: TrainConfig = TrainConfig()
    monitor: MonitorConfig = Field(MonitorConfig(), description="loss/gradient spike detection and its policy")

    @model_validator(mode="after")
    def _episode_size(self):
        task, examples = self.task, self.task.k_shots + self.task.n_queries
        per_task = examples * (task.n_ways if self.data.task_kind == "classification" else 1)
        total = per_task * self.train.meta_batch_size
        if total > MAX_EXAMPLES_PER_STEP:
            ways = f"task.n_ways {task.n_ways} x " if self.data.task_kind == "classification" else ""
            raise ValueError(
                f"a meta-batch must hold at most {MAX_EXAMPLES_PER_STEP:,} examples; got {total:,} "
                f"(train.meta_batch_size {self.train.meta_batch_size} x {ways}"
                f"(task.k_shots {task.k_shots} + task.n_queries {task.n_queries})). Make tasks or the meta-batch smaller"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (what ``config.json`` and checkpoint metadata hold)."""
        return self.model_dump(mode="json")


def make_config(data: Any = None) -> RunConfig:
    """Validate ``data``, a plain mapping (e.g. parsed YAML), into a :class:`RunConfig` and return
    it; a :class:`RunConfig` is returned as it is, None gives the defaults."""
    if isinstance(data, RunConfig):
        return data
    if not isinstance(data, Mapping):
        return parse_config(RunConfig, data)  # defaults for None, a one-line error otherwise
    data = dict(data)
    alg = algorithm_config(data.pop("algorithm", None))
    bb = backbone_config(data.pop("backbone", None))
    source = data_config(data.pop("data", None))
    return parse_config(RunConfig, {**data, "data": source, "algorithm": alg, "backbone": bb})


def builtin_configs() -> dict[str, Path]:
    """The built-in run configs shipped in ``metafit/configs``: name (file stem) to YAML path."""
    root = resources.files("metafit") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _read_yaml(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"Config: {str(path)!r} must be a readable file; got {err.strerror or err}. Check the path and its permissions."
        ) from None
    data = load_yaml(raw, repr(str(path)))
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(
            f"Config: {str(path)!r} must hold a mapping of sections (data:, algorithm:, train:, ...); got "
            f"{type(data).__name__}. Write it as 'key: value' lines."
        )
    return data or {}


def load_config(source: str | os.PathLike | dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a :class:`RunConfig` from ``source``, a YAML path, a built-in name (see
    ``builtin_configs``) or a mapping (None: the defaults), apply ``overrides``, a list of
    ``key=value`` strings (values parsed as YAML), and return it validated."""
    data = config_source(source, builtin_configs(), "config")
    apply_overrides(data, overrides, "train.meta_lr=0.001")
    return make_config(data)


def config_source(source: str | os.PathLike | dict | None, builtins: Mapping[str, Path], what: str) -> dict:
    """The mapping behind ``source``: a dict (copied), a YAML path, or a name in ``builtins``."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.is_file():
        return _read_yaml(path)
    if str(source) in builtins:
        return _read_yaml(builtins[str(source)])
    raise ConfigError(
        f"Config: the {what} must be a YAML file or a built-in name; got {str(source)!r}. "
        f"Built-in {what}s: {', '.join(sorted(builtins))}."
    )


def parse_override_value(key: str, raw: str):
    """The value of a ``key=value`` override: YAML (numbers, lists, booleans, null), parsed with
    the same bounds as config files; empty means null."""
    return load_yaml(raw, f"the value of --set {key}") if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str] | None, example: str) -> dict:
    """Apply ``key=value`` overrides (values parsed as YAML) to ``data`` in place."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(
                f"Config: an override must look like key=value; got {item!r}. Write e.g. --set {example}."
            )
        set_by_path(data, key.strip(), parse_override_value(key.strip(), raw))
    return data


#: learners with an inner gradient loop: they take second derivatives through the backbone, or run
#: tasks under torch.func.vmap, and neither works with the fused CPU attention kernel
INNER_LOOP = ("maml", "anil", "metasgd", "reptile")


def resolve_config(config: RunConfig) -> RunConfig:
    """``config`` with what the backbone learns from its files recorded (see
    :func:`metafit.nn.resolve_backbone_config`), so checkpoints rebuild the model offline, and a
    transformers backbone's ``attention: auto`` settled for the algorithm (``eager`` for learners
    with an inner loop: the fused CPU attention kernel has neither a second derivative nor a vmap
    batching rule)."""
    bb = resolve_backbone_config(config.backbone)
    if getattr(bb, "attention", None) == "auto":
        bb = bb.model_copy(update={"attention": "eager" if config.algorithm.name in INNER_LOOP else "sdpa"})
    return config if bb is config.backbone else config.model_copy(update={"backbone": bb})


def build_model(config: RunConfig, pretrained: bool = True) -> Algorithm:
    """The algorithm with its backbone, freshly initialised from ``config``; with ``pretrained``
    and ``backbone.weights`` set, the backbone starts from that file's weights, and the returned
    model's ``weights_report`` says what was loaded (None otherwise; an ensemble backbone whose members
    name ``weights`` loads each into its member, and the report is the list of theirs, unless the
    ensemble's own ``weights`` file is loaded over them). Rebuilding a model whose
    weights come next (checkpoint loading) passes ``pretrained=False``: the file is not read."""
    config = resolve_config(config)
    backbone = build_backbone(config.backbone, config.data.in_channels, config.data.input_size, pretrained=pretrained)
    if (stats := config.data.input_statistics()) is not None:
        attach_input_normalization(backbone, *stats)
    report = None
    bb = config.backbone
    if pretrained and isinstance(bb, EnsembleConfig):
        report = [load_backbone_weights(member, m.weights, prefix=m.weights_prefix, strict=m.weights_strict)
                  for member, m in zip(backbone.members, bb.member_configs()) if m.weights] or None
    if pretrained and getattr(bb, "weights", None):
        report = load_backbone_weights(backbone, bb.weights, prefix=bb.weights_prefix, strict=bb.weights_strict)
    kind = config.data.task_kind
    n_outputs = config.task.n_ways if kind == "classification" else config.data.out_features
    model = build_algorithm(config.algorithm, backbone, n_outputs, kind)
    model.weights_report = report
    return model
