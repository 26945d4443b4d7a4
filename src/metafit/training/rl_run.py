"""Meta-RL runs: config, training loop, checkpoints, evaluation (``metafit rl train / eval``).

A run config names an environment family (``family: {name, settings}``), a learner
(``learner: {name, ...}``, see :data:`metafit.rl.learners.RL_LEARNERS`) and the loop (``train``).
Training runs in the one loop every learner kind shares (:class:`metafit.training.loop.Loop`,
with :class:`metafit.training.rl_learning.RLRun`): it calls ``learner.train_iteration`` and,
every ``eval_every`` iterations, evaluates on
``eval_tasks`` fixed validation tasks (returns at every adaptation point: each episode of an
RL² trial, MAML-RL before and after each inner step); the best validation score is kept as
``best.safetensors``, ``last.safetensors`` holds everything needed to resume exactly (learner,
its optimizer, the task and torch RNG streams, the weight average). With ``train.weight_average``
an exponential moving average of the weights is scored beside the live weights at every
validation, and ``best.safetensors`` keeps whichever scored higher. ``train.init_from`` starts a run
from another run's kept weights (same learner and network; e.g. a longer RL² trial). Logs:
``metrics.jsonl``, TensorBoard, and a learning-curve PNG. Test: ``test_tasks`` fixed tasks from
another seed, mean and 95% CI at every adaptation point.
"""

from __future__ import annotations

import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, SerializeAsAny, field_validator

from ..errors import CheckpointError, ConfigError
from ..rl.envs import FAMILIES, make_family
from ..rl.learners import RLLearner, get_rl_learner
from ..validation import ConfigModel, parse_config
from .checkpoint import check_tensors, model_state, read_checkpoint
from .checkpoint_meta import kind_of
from .config import LoopConfig, apply_overrides, config_source
from .loop import Loop, LoopSettings, check_run_folder
from .metrics_log import kept_rows, write_json
from .rl_learning import RL_RESUME_FIXED, RLRun, WeightAverage, evaluate_learner, plot_rl_curve
from .splits import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["RL_RESUME_FIXED", "RLRunConfig", "WeightAverage", "builtin_rl_configs", "evaluate_rl_checkpoint", "load_rl",
           "load_rl_config", "rl_device", "train_rl"]


class RLFamilyConfig(ConfigModel):
    name: str = Field("bandit", description="environment family: " + ", ".join(sorted(FAMILIES)))
    settings: dict[str, Any] = Field(default_factory=dict, description="family settings, e.g. {n_arms: 10}")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in FAMILIES:
            raise ValueError(f"must be one of {sorted(FAMILIES)}")
        return v


class RLTrainConfig(LoopConfig):
    iterations: int = Field(500, ge=1, description="outer updates")
    eval_every: int = Field(50, ge=1, description="validate every this many iterations")
    save_interval: int = Field(100, ge=1, description="keep a numbered checkpoint every this many iterations")
    eval_tasks: int = Field(200, ge=1, description="fixed validation tasks")
    test_tasks: int = Field(1000, ge=1, description="fixed test tasks for the final report")
    eval_seed: int = Field(2024, ge=0, description="seed of the validation tasks (test: eval_seed + 1)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu", description="where the learner, its environments and updates run (RL2: cpu or cuda; MAML-RL: "
                           "cpu); auto: cuda when available and supported. A GPU pays off for large batches only")
    init_from: str | None = Field(
        None, description="start from the learner weights of this meta-RL checkpoint (a best.safetensors or "
                          "step-*.safetensors of an earlier run of the same learner and network; the family "
                          "settings and trial length may differ, e.g. RL2 trained on 10-episode trials "
                          "continued on 25) with a fresh optimizer; relative paths are from the working "
                          "directory. Ignored by --resume, which restores last.safetensors")


class RLRunConfig(ConfigModel):
    """A whole meta-RL run (``metafit rl train``): its seed and output folder, the environment
    ``family`` (name and settings), the ``learner`` (its name selects its config class) and the
    ``train`` section (loop, devices, validation and test tasks)."""

    kind: Literal["rl"] = "rl"
    seed: int = Field(0, ge=0, description="seed of initialisation and training tasks")
    out_dir: str = Field("runs/rl", description="where checkpoints and logs go")
    family: RLFamilyConfig = RLFamilyConfig()
    learner: SerializeAsAny[ConfigModel] = Field(default_factory=lambda: rl_learner_config({"name": "rl2"}))
    train: RLTrainConfig = RLTrainConfig()

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (what ``config.json`` and checkpoint metadata hold)."""
        return self.model_dump(mode="json")


def rl_learner_config(data: Any) -> ConfigModel:
    if isinstance(data, ConfigModel) and hasattr(data, "name"):
        return data
    data = dict(data or {})
    cls = get_rl_learner(data.get("name", "rl2"))
    return parse_config(cls.Config, data, "learner")


def make_rl_config(data: Any) -> RLRunConfig:
    if isinstance(data, RLRunConfig):
        return data
    data = dict(data or {})
    data["learner"] = rl_learner_config(data.get("learner"))
    return parse_config(RLRunConfig, data)


def builtin_rl_configs() -> dict[str, Path]:
    """The built-in meta-RL run configs shipped in ``metafit/configs/rl``: name (file stem) to YAML path."""
    root = resources.files("metafit") / "configs" / "rl"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_rl_config(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> RLRunConfig:
    """The validated meta-RL run config of ``source``, a YAML path, a built-in name (see
    ``builtin_rl_configs``) or a mapping, with ``overrides``, a list of ``key=value`` strings
    (values parsed as YAML), applied."""
    data = config_source(source, builtin_rl_configs(), "RL config")
    apply_overrides(data, overrides, "train.iterations=100")
    return make_rl_config(data)


def build_learner(config: RLRunConfig) -> RLLearner:
    family = make_family(config.family.name, **config.family.settings)
    return get_rl_learner(config.learner.name)(config.learner, family)


def rl_device(name: str, learner_name: str, field: str = "train.device",
              fix: str = "Use --set train.device=cpu.") -> torch.device:
    """The device ``train.device`` names for a learner: checks the learner runs there and the
    machine has it; ``auto`` is cuda when both hold, else the CPU."""
    supported = get_rl_learner(learner_name).devices
    if name == "auto":
        return torch.device("cuda" if "cuda" in supported and torch.cuda.is_available() else "cpu")
    if name not in supported:
        raise ConfigError(
            f"Config: {field} must be one that learner {learner_name!r} runs on ({', '.join(supported)}); "
            f"got {name!r}. {fix}"
        )
    return resolve_device(name, field, fix)


def learner_device(learner: RLLearner) -> torch.device:
    return next(iter(learner.parameters()), torch.empty(0)).device


def load_rl(path: str | os.PathLike, device: str | None = None) -> RLLearner:
    """The learner of the meta-RL checkpoint at ``path`` (eval mode), with ``run_config`` and
    ``checkpoint_meta``, on ``device`` ("cpu", "cuda", "auto"; default the CPU). A few-shot
    checkpoint, or one whose config or tensors do not fit this version, is a CheckpointError."""
    meta, tensors = read_checkpoint(path)
    if kind_of(meta) != "rl":
        raise CheckpointError(
            f"Checkpoint: {str(path)!r} must be a meta-RL checkpoint for metafit rl; got a "
            f"{meta.get('algorithm', 'few-shot')} checkpoint. Use metafit eval / metafit.load for it."
        )
    try:
        config = make_rl_config(meta["config"])
    except (ConfigError, KeyError) as err:
        raise CheckpointError(
            f"Checkpoint: the RL config stored in {str(path)!r} must be valid for this metafit version; got: "
            f"{str(err).rstrip('.')}. "
            f"Use the metafit version that wrote it ({meta.get('metafit_version')})."
        ) from err
    learner = build_learner(config)
    state = model_state(tensors)
    check_tensors(state, learner.state_dict(), path, what="the learner its config describes")
    try:
        learner.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"Checkpoint: tensors of {str(path)!r} must match the learner its config describes; got "
            f"{str(err).splitlines()[-1].strip()}. The file is damaged or from another version."
        ) from err
    learner.to(rl_device(device or "cpu", config.learner.name, "the evaluation device", "Use --device cpu."))
    learner.eval()
    learner.run_config = config
    learner.checkpoint_meta = {k: v for k, v in meta.items() if k != "config"}
    learner._tensors = tensors  # for resume
    return learner


def _init_from(learner: RLLearner, path: str, config: RLRunConfig) -> None:
    """Load the learner weights (``model.*``) of the meta-RL checkpoint ``path`` into ``learner``."""
    if not Path(path).is_file():
        raise CheckpointError(
            f"RL: train.init_from must name an existing meta-RL checkpoint; got {path!r} (no such file). Train "
            "the run it comes from first (its best.safetensors), or set train.init_from=null.")
    meta, tensors = read_checkpoint(path)
    if meta.get("kind") != "rl" or meta.get("learner") != config.learner.name:
        raise CheckpointError(
            f"RL: train.init_from must be a meta-RL checkpoint of learner {config.learner.name!r}; {path!r} is "
            f"of {meta.get('learner') or meta.get('algorithm')!r}. Pass a checkpoint this learner wrote.")
    state = model_state(tensors)
    check_tensors(state, learner.state_dict(), path, shapes=False, names=False)  # dtypes: never cast silently
    try:
        learner.load_state_dict(state)
    except RuntimeError as err:
        theirs = meta["config"].get("learner")
        theirs = theirs if isinstance(theirs, dict) else {}
        ours = config.learner.model_dump(mode="json")
        differ = {k: (theirs.get(k), v) for k, v in ours.items() if k in theirs and theirs[k] != v}
        raise CheckpointError(
            f"RL: train.init_from {path!r} must hold weights of the same network; got "
            f"{str(err).splitlines()[-1].strip()}. Learner settings that differ (theirs, ours): {differ}. "
            "Use the network settings of the run that wrote it.") from err
    learner.start_new_run()  # a new run: its learning-rate schedule starts at its beginning


def train_rl(config: RLRunConfig, resume: bool = False, test: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train (the one loop, :class:`metafit.training.loop.Loop`, with the meta-RL run,
    :class:`metafit.training.rl_learning.RLRun`), keep the best checkpoint on the validation
    tasks, then test it (unless ``test`` is false) and return (and write to
    ``<out_dir>/report.json``) a summary of the run ``config`` describes. Like the
    supervised trainer, a folder holding an earlier run is refused unless ``resume`` (continue
    it) or ``overwrite`` (delete what that run wrote first)."""
    tc, out = config.train, Path(config.out_dir)
    check_run_folder(out, resume, overwrite)  # before anything is built: a refusal comes at once
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(config.seed)
    device = rl_device(tc.device, config.learner.name)
    learner = build_learner(config).to(device)
    learner.train()
    run = RLRun(config, learner, make_rl_config)
    if tc.init_from and not resume:
        _init_from(learner, tc.init_from, config)  # (the weight average starts from the first update's weights)
    loop = Loop(run, LoopSettings.from_config(tc, "iterations"), out, logger=logger)
    loop.fit(resume, overwrite)
    from .plots import have_matplotlib

    if have_matplotlib():  # figures are the optional plots extra
        _, rows = kept_rows(out / "metrics.jsonl", "iteration", loop.step)
        plot_rl_curve(rows, out / "learning_curve.png",
                      f"{config.learner.name} on {config.family.name} {config.family.settings or ''}".strip())
    best = loop.best_score if loop.best_score != -float("inf") else None
    report: dict[str, Any] = {"out_dir": str(out), "iterations": loop.step, "train_seconds": loop.seconds,
                              "env_steps": run.env_steps, "best_iteration": loop.best_step,
                              "best_weights": run.best_weights, "best_checkpoint": str(out / "best.safetensors"),
                              "init_from": tc.init_from, "val": {"score": best}, "stop": loop.stop}
    if test and (out / "best.safetensors").is_file():
        report["test"] = evaluate_rl_checkpoint(out / "best.safetensors", device=device.type)
    write_json(out / "report.json", report)
    return report


def evaluate_rl_checkpoint(path: str | os.PathLike, tasks: int | None = None, seed: int | None = None,
                           device: str | None = None) -> dict[str, Any]:
    """Evaluate the meta-RL checkpoint at ``path``: returns at every adaptation point (mean, 95%
    CI) on ``tasks`` fixed test tasks drawn from ``seed`` (defaults: the run's ``test_tasks`` and
    ``eval_seed + 1``), on ``device`` (default the CPU). Returns a dict with those figures, the
    checkpoint, learner, device, family, seed and seconds taken."""
    learner = load_rl(path, device)
    tc = learner.run_config.train
    n = tasks if tasks is not None else tc.test_tasks
    if n < 1:
        raise ConfigError(f"RL eval: tasks must be >= 1; got {n}. Pass a positive --tasks.")
    s = seed if seed is not None else tc.eval_seed + 1
    task_list = learner.family.sample_tasks(n, torch.Generator().manual_seed(s))
    t0 = time.perf_counter()
    res = evaluate_learner(learner, task_list, s + 7)
    return {"checkpoint": str(path), "learner": learner.run_config.learner.name, "device": str(learner_device(learner)),
            "family": learner.run_config.family.model_dump(mode="json"),
            "seed": s, **res, "seconds": time.perf_counter() - t0}
