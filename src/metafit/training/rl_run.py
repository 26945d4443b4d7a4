"""Meta-RL runs: config, training loop, checkpoints, evaluation (``metafit rl train / eval``).

A run config names an environment family (``family: {name, settings}``), a learner
(``learner: {name, ...}``, see :data:`metafit.rl.learner.RL_LEARNERS`) and the loop (``train``).
The loop calls ``learner.train_iteration`` and, every ``eval_every`` iterations, evaluates on
``eval_tasks`` fixed validation tasks (returns at every adaptation point: each episode of an
RL² trial, MAML-RL before and after each inner step); the best validation score is kept as
``best.safetensors``, ``last.safetensors`` holds everything needed to resume exactly (learner,
its optimizer, the task and torch RNG streams, the weight average). With ``train.weight_average``
an exponential moving average of the weights is scored beside the live weights at every
validation, and ``best.safetensors`` keeps whichever scored higher. ``train.init_from`` starts a run
from another run's kept weights (same learner and network; e.g. a longer RL² trial). Logs: ``metrics.jsonl``, TensorBoard, and a
learning-curve PNG. Test: ``test_tasks`` fixed tasks from another seed, mean and 95% CI at every
adaptation point.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, SerializeAsAny, field_validator
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .. import __version__
from ..errors import CheckpointError, ConfigError
from ..rl import FAMILIES, make_family
from ..rl.learner import RLLearner, get_rl_learner
from ..stats import mean_ci
from ..validation import ConfigModel, parse_config
from ..data.cache import atomic_write_bytes
from ..errors import short_repr
from .checkpoint import (FORMAT, FORMAT_VERSION, check_optimizer_state, check_rng_state, check_tensors,
                         config_difference, join_optimizer_state, model_state, read_checkpoint,
                         remove_stale_temp_files, split_optimizer_state, write_checkpoint)
from .config import LoopConfig, apply_overrides, config_source
from .metrics_log import kept_rows, write_json
from .tracking import TensorBoardLog
from .trainer import check_run_folder, remove_run_files, resolve_device

__all__ = ["RLRunConfig", "WeightAverage", "builtin_rl_configs", "evaluate_rl_checkpoint", "load_rl",
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
    weight_average: float = Field(
        0.0, ge=0.0, lt=1.0, description="decay of an exponential moving average of the learner's weights, "
                                         "updated after every iteration (e.g. 0.995; 0: off). Each validation "
                                         "scores it beside the live weights and best.safetensors keeps whichever "
                                         "scores higher: policies trained by PPO swing between updates, and the "
                                         "average swings less")
    init_from: str | None = Field(
        None, description="start from the learner weights of this meta-RL checkpoint (a best.safetensors or "
                          "step-*.safetensors of an earlier run of the same learner and network; the family "
                          "settings and trial length may differ, e.g. RL2 trained on 10-episode trials "
                          "continued on 25) with a fresh optimizer; relative paths are from the working "
                          "directory. Ignored by --resume, which restores last.safetensors")
    init_widen: bool = Field(
        False, description="with init_from: the checkpoint holds a narrower network (RL2 with fewer "
                           "hidden_size units, every other network setting the same); load it into this "
                           "wider one so that the run starts from exactly the policy and value it kept "
                           "(RL2.load_widened: the new units start with zero outgoing weights)")


class RLRunConfig(ConfigModel):
    kind: Literal["rl"] = "rl"
    seed: int = Field(0, ge=0, description="seed of initialisation and training tasks")
    out_dir: str = Field("runs/rl", description="where checkpoints and logs go")
    family: RLFamilyConfig = RLFamilyConfig()
    learner: SerializeAsAny[ConfigModel] = Field(default_factory=lambda: rl_learner_config({"name": "rl2"}))
    train: RLTrainConfig = RLTrainConfig()

    def to_dict(self) -> dict[str, Any]:
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
    root = resources.files("metafit") / "configs" / "rl"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_rl_config(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> RLRunConfig:
    """A meta-RL run config from a YAML path, a built-in name or a mapping, with ``key=value``
    overrides (values parsed as YAML)."""
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


def _score(learner: RLLearner, returns: torch.Tensor) -> torch.Tensor:
    """Per-task score: the whole trial's reward for learners whose points are episodes of one
    trial (RL²), the return after the last adaptation point otherwise."""
    return returns.sum(1) if getattr(learner, "score_reduction", "last") == "sum" else returns[:, -1]


def _evaluate(learner: RLLearner, tasks: list, seed: int) -> dict[str, Any]:
    was = learner.training
    learner.eval()
    try:
        returns = learner.evaluate(tasks, torch.Generator().manual_seed(seed)).detach()
    finally:
        learner.train(was)
    points = learner.eval_points()
    per_point = {}
    for name, col in zip(points, returns.T):
        m, ci = mean_ci(col)
        per_point[name] = {"mean": m, "ci95": ci}
    score, score_ci = mean_ci(_score(learner, returns))
    return {"score": score, "ci95": score_ci, "tasks": len(tasks), "points": per_point}


class WeightAverage:
    """An exponential moving average of a learner's parameters (torch's EMA update rule), scored
    and saved by swapping it into the learner for a moment: the learner is never copied (MAML-RL
    holds simulator environments), and its buffers (value statistics, update counters) stay live."""

    def __init__(self, learner: RLLearner, decay: float) -> None:
        self.learner = learner
        self.names = [name for name, _ in learner.named_parameters()]
        self.params = [p.detach().clone() for p in learner.parameters()]
        self.n_averaged = 0
        self._ema = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self) -> None:
        live = [p.detach() for p in self.learner.parameters()]
        if self.n_averaged == 0:
            for a, p in zip(self.params, live):
                a.copy_(p)
        else:
            self._ema(self.params, live, self.n_averaged)
        self.n_averaged += 1

    @contextmanager
    def swapped_in(self) -> Iterator[RLLearner]:
        """The learner carrying the averaged parameters; its own are restored on exit."""
        params = list(self.learner.parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, a in zip(params, self.params):
                p.copy_(a)
        try:
            yield self.learner
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"average.{k}": v for k, v in zip(self.names, self.params)}
        out["average.n_averaged"] = torch.tensor(self.n_averaged)
        return out

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, a in zip(self.names, self.params):
            a.copy_(tensors[f"average.{k}"])
        self.n_averaged = int(tensors["average.n_averaged"])


def _save(path: Path, learner: RLLearner, config: RLRunConfig, iteration: int, metrics: dict,
          resume: dict | None = None, average: WeightAverage | None = None) -> Path:
    tensors = {f"model.{k}": v for k, v in learner.state_dict().items()}
    if average is not None:
        tensors.update(average.tensors())
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "metafit_version": __version__, "kind": "rl",
            "learner": config.learner.name, "config": config.to_dict(), "step": int(iteration), "metrics": metrics}
    if resume is not None:
        opt_state = learner.optimizer_state_dict()
        opt_tensors, scalars = split_optimizer_state(opt_state)
        opt_meta = {"param_groups": opt_state.get("param_groups", []), "scalars": scalars}
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.tasks"] = resume.pop("generator").get_state()
        meta["train_state"] = {**resume, "optimizer": opt_meta}
    return write_checkpoint(path, tensors, meta)


def load_rl(path: str | os.PathLike, device: str | None = None) -> RLLearner:
    """The learner of a meta-RL checkpoint (eval mode), with ``run_config`` and ``checkpoint_meta``,
    on ``device`` ("cpu", "cuda", "auto"; default the CPU)."""
    meta, tensors = read_checkpoint(path)
    if meta.get("kind") != "rl":
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
    widen = config.train.init_widen  # the stored weights may be narrower: their dtypes are checked, not names/shapes
    check_tensors(state, learner.state_dict(), path, what="the learner its config describes", shapes=not widen,
                  names=not widen)
    try:
        if config.train.init_widen:
            if not hasattr(learner, "load_widened"):
                raise CheckpointError(
                    f"RL: train.init_widen needs a learner that can widen kept weights (rl2); "
                    f"{config.learner.name!r} cannot. Set train.init_widen=false.")
            learner.load_widened(state)
        else:
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


#: the config sections a resumed meta-RL run must share with its checkpoint: they shape the
#: learner's networks, its optimizer state and the environments it was trained on
RL_RESUME_FIXED = ("family", "learner")


def _check_resumable(path: Path, meta: dict, tensors: dict[str, torch.Tensor], learner: RLLearner,
                     config: RLRunConfig, gen: torch.Generator, average: WeightAverage | None) -> None:
    """Refuse to resume from ``path`` unless its config agrees with ``config`` on
    :data:`RL_RESUME_FIXED` (the first differing field is named) and every tensor it holds fits
    this learner, its optimizer, the random streams and the weight average."""
    try:
        stored = make_rl_config(meta["config"]).to_dict()
    except ConfigError as err:
        raise CheckpointError(
            f"RL: the config stored in {str(path)!r} must be valid for this metafit version; got: "
            f"{str(err).rstrip('.')}. Use the metafit version that wrote it ({meta.get('metafit_version')})."
        ) from err
    diff = config_difference(stored, config.to_dict(), RL_RESUME_FIXED)
    if diff is not None:
        key, theirs, ours = diff
        raise CheckpointError(
            f"RL: {key} must be {short_repr(theirs)} as in the checkpoint being resumed ({str(path)!r}); got "
            f"{short_repr(ours)}. Resume with the run's config (--set {key}={json.dumps(theirs)}), or train into "
            "another out_dir."
        )
    check_tensors(model_state(tensors), learner.state_dict(), path, what="the learner its config describes")
    opt = meta["train_state"].get("optimizer") or {}
    current = learner.optimizer_state_dict() or {}
    optimizer = next((v for v in vars(learner).values() if isinstance(v, torch.optim.Optimizer)
                      and v.state_dict()["param_groups"] == current.get("param_groups")), None)
    params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else None
    check_optimizer_state(tensors, opt.get("scalars", {}), opt.get("param_groups", []),
                          current.get("param_groups", []), params, path)
    check_rng_state(tensors, "rng.torch", torch.get_rng_state(), path)
    check_rng_state(tensors, "rng.tasks", gen.get_state(), path)
    if average is not None:
        if "average.n_averaged" not in tensors:
            raise CheckpointError(
                f"RL: resume with train.weight_average needs the average in {str(path)!r}; got a run "
                "trained without it. Resume with the original config (weight_average 0).")
        kept = {k[len("average."):]: v for k, v in tensors.items() if k.startswith("average.")}
        count = kept.pop("n_averaged")
        check_tensors(kept, dict(zip(average.names, average.params)), path, prefix="average.",
                      what="the weight average of the learner")
        if count.dtype != torch.int64 or count.dim() != 0 or int(count) < 0:
            raise CheckpointError(
                f"Checkpoint: tensor 'average.n_averaged' of {str(path)!r} must be a non-negative torch.int64 "
                f"scalar; got {count.dtype} of shape {list(count.shape)}. The file is damaged or was edited.")


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
        if config.train.init_widen:
            if not hasattr(learner, "load_widened"):
                raise CheckpointError(
                    f"RL: train.init_widen needs a learner that can widen kept weights (rl2); "
                    f"{config.learner.name!r} cannot. Set train.init_widen=false.")
            learner.load_widened(state)
        else:
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


def _plot_curve(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _save as save_fig

    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    try:
        if train:
            ax.plot([r["iteration"] for r in train], [r["return"] for r in train], lw=1, alpha=0.6,
                    label="training batches")
        if val:
            xs = [r["iteration"] for r in val]
            ys = [r["score"] for r in val]
            ci = [r["ci95"] for r in val]
            ax.plot(xs, ys, marker="o", lw=1.6, label="validation tasks (95% CI)")
            ax.fill_between(xs, [y - c for y, c in zip(ys, ci)], [y + c for y, c in zip(ys, ci)], alpha=0.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("return")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_fig(fig, path)
    finally:
        plt.close(fig)


def train_rl(config: RLRunConfig, resume: bool = False, test: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train, keep the best checkpoint on the validation tasks, then test it; returns (and writes
    to ``<out_dir>/report.json``) a summary. Like the supervised trainer, a folder holding an
    earlier run is refused unless ``resume`` (continue it) or ``overwrite`` (delete what that run
    wrote first)."""
    tc, out = config.train, Path(config.out_dir)
    check_run_folder(out, resume, overwrite)
    if overwrite:
        remove_run_files(out)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(config.seed)
    device = rl_device(tc.device, config.learner.name)
    learner = build_learner(config).to(device)
    learner.train()
    family = learner.family
    average = WeightAverage(learner, tc.weight_average) if tc.weight_average else None
    val_tasks = family.sample_tasks(tc.eval_tasks, torch.Generator().manual_seed(tc.eval_seed))
    gen = torch.Generator().manual_seed(config.seed + 1)
    iteration, best, best_iter, best_weights, seconds, env_steps, rows = 0, -math.inf, 0, "live", 0.0, 0, []
    last = out / "last.safetensors"
    remove_stale_temp_files(out)  # left by writes of a killed run (no write of this run is in flight yet)
    if tc.init_from and not resume:
        _init_from(learner, tc.init_from, config)  # (the weight average starts from the first update's weights)
    if resume:
        if not last.is_file():
            raise CheckpointError(
                f"RL: resume needs {str(last)!r}; got no such file. Run without --resume first."
            )
        meta, tensors = read_checkpoint(last)  # metadata validated (RLCheckpointMeta, RLTrainStateMeta)
        ts = meta.get("train_state")
        if meta.get("kind") != "rl" or ts is None or meta.get("learner") != config.learner.name:
            raise CheckpointError(
                f"RL: resume needs a meta-RL last.safetensors of learner {config.learner.name!r}; got "
                f"{meta.get('learner') or meta.get('algorithm')!r}. Resume with the original config."
            )
        _check_resumable(last, meta, tensors, learner, config, gen, average)
        learner.load_state_dict(model_state(tensors))
        opt = ts.get("optimizer") or {}
        try:
            learner.load_optimizer_state_dict(join_optimizer_state(tensors, opt.get("scalars", {}),
                                                                   opt.get("param_groups", [])))
        except (ValueError, KeyError, RuntimeError) as err:  # a learner-specific optimizer layout
            raise CheckpointError(
                f"RL: the optimizer state in {str(last)!r} must fit learner {config.learner.name!r} as configured; "
                f"got {type(err).__name__}: {' '.join(str(err).split())[:150]}. Resume with the run's config."
            ) from err
        torch.set_rng_state(tensors["rng.torch"])
        gen.set_state(tensors["rng.tasks"])
        if average is not None:
            average.load(tensors)
        iteration, best, best_iter = int(meta["step"]), ts.get("best"), ts.get("best_iteration", 0)
        best_weights = ts.get("best_weights", "live")
        best = -math.inf if best is None else best
        seconds, env_steps = ts.get("seconds", 0.0), ts.get("env_steps", 0)
        # the log up to the resumed iteration: rows a killed run wrote after its checkpoint are replayed
        kept, rows = kept_rows(out / "metrics.jsonl", "iteration", iteration)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        atomic_write_bytes(out / "metrics.jsonl", lambda f: f.write("".join(kept).encode()))
    write_json(out / "config.json", config.to_dict())
    log = open(out / "metrics.jsonl", "a" if resume else "w")
    tb = TensorBoardLog(out, tc.tensorboard, purge_step=iteration + 1 if resume else None)
    bar = tqdm(total=tc.iterations, initial=iteration, disable=not tc.progress, desc=f"rl {config.learner.name}",
               dynamic_ncols=True)

    def write(row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        log.write(json.dumps(clean) + "\n")
        log.flush()
        rows.append(clean)
        tb.scalars(row["split"], {k: v for k, v in row.items() if k not in ("points",)}, row["iteration"],
                   skip=("iteration", "split"))

    def validate() -> None:
        nonlocal best, best_iter, best_weights
        res = _evaluate(learner, val_tasks, tc.eval_seed + 7)
        row = {"iteration": iteration, "split": "val", "score": res["score"], "ci95": res["ci95"],
               "points": {k: v["mean"] for k, v in res["points"].items()}, "elapsed_s": seconds}
        res_avg = None
        if average is not None and average.n_averaged > 0:
            with average.swapped_in() as averaged:
                res_avg = _evaluate(averaged, val_tasks, tc.eval_seed + 7)
            row["score_average"] = res_avg["score"]
        write(row)
        if res_avg is not None and res_avg["score"] > max(res["score"], best):
            best, best_iter, best_weights = res_avg["score"], iteration, "average"
            with average.swapped_in() as averaged:
                _save(out / "best.safetensors", averaged, config, iteration, {"val": res_avg, "weights": "average"})
        elif res["score"] > best:
            best, best_iter, best_weights = res["score"], iteration, "live"
            _save(out / "best.safetensors", learner, config, iteration, {"val": res, "weights": "live"})

    def state() -> dict:
        return {"generator": gen, "best": best if math.isfinite(best) else None, "best_iteration": best_iter,
                "best_weights": best_weights, "seconds": seconds, "env_steps": env_steps}

    start, seconds_before = time.perf_counter(), seconds
    try:
        while iteration < tc.iterations:
            if tc.max_minutes is not None and seconds >= 60 * tc.max_minutes:
                write({"iteration": iteration, "split": "stop", "elapsed_s": seconds})
                if best_iter != iteration:
                    validate()
                break
            stats = learner.train_iteration(gen)
            if average is not None:
                average.update()
            iteration += 1
            seconds = seconds_before + time.perf_counter() - start
            env_steps += int(stats.get("env_steps", 0))
            write({"iteration": iteration, "split": "train", **{k: float(v) for k, v in stats.items()},
                   "total_env_steps": env_steps, "elapsed_s": seconds})
            bar.update(1)
            bar.set_postfix(ret=f"{stats.get('return', float('nan')):.3f}",
                            best=f"{best:.3f}" if math.isfinite(best) else "-")
            if iteration % tc.eval_every == 0 or iteration == tc.iterations:
                validate()
            if iteration % tc.save_interval == 0:
                _save(out / f"step-{iteration:07d}.safetensors", learner, config, iteration, {})
                _save(last, learner, config, iteration, {}, state(), average)
        _save(last, learner, config, iteration, {}, state(), average)
    finally:
        bar.close()
        log.close()
        tb.close()
    from .plots import have_matplotlib

    if have_matplotlib():  # figures are the optional plots extra
        _plot_curve(rows, out / "learning_curve.png",
                    f"{config.learner.name} on {config.family.name} {config.family.settings or ''}".strip())
    report: dict[str, Any] = {"out_dir": str(out), "iterations": iteration, "train_seconds": seconds,
                              "env_steps": env_steps, "best_iteration": best_iter, "best_weights": best_weights,
                              "best_checkpoint": str(out / "best.safetensors"), "init_from": tc.init_from,
                              "val": {"score": best if math.isfinite(best) else None}}
    if test and (out / "best.safetensors").is_file():
        report["test"] = evaluate_rl_checkpoint(out / "best.safetensors", device=device.type)
    write_json(out / "report.json", report)
    return report


def evaluate_rl_checkpoint(path: str | os.PathLike, tasks: int | None = None, seed: int | None = None,
                           device: str | None = None) -> dict[str, Any]:
    """Returns at every adaptation point (mean, 95% CI) on fixed test tasks (default: the run's
    ``test_tasks`` from ``eval_seed + 1``), on ``device`` (default the CPU)."""
    learner = load_rl(path, device)
    tc = learner.run_config.train
    n = tasks if tasks is not None else tc.test_tasks
    if n < 1:
        raise ConfigError(f"RL eval: tasks must be >= 1; got {n}. Pass a positive --tasks.")
    s = seed if seed is not None else tc.eval_seed + 1
    task_list = learner.family.sample_tasks(n, torch.Generator().manual_seed(s))
    t0 = time.perf_counter()
    res = _evaluate(learner, task_list, s + 7)
    return {"checkpoint": str(path), "learner": learner.run_config.learner.name, "device": str(learner_device(learner)),
            "family": learner.run_config.family.model_dump(mode="json"),
            "seed": s, **res, "seconds": time.perf_counter() - t0}
