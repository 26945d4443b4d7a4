"""End-to-end entry points used by the CLI and by scripts: train then test, evaluate a checkpoint
on fixed episodes or on Lake's one-shot runs. Reports are written as JSON (atomically)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from ..data import DATASETS, ImageClasses, data_config, load_image_folder, load_runs, load_splits
from ..data.store import ImageFormat, PolarityImages, PolarityUse, check_polarity, polarity_flips
from ..errors import ConfigError, DataError, short_repr
from ..validation import parse_config
from .checkpoint import load, with_algorithm_overrides
from .config import RunConfig, TaskConfig
from .evaluate import EvalResult, evaluate_episodes, evaluate_tasks
from .metrics_log import write_json
from .trainer import Trainer, check_run_folder, make_sampler

__all__ = ["cross_domain_data", "evaluate_checkpoint", "evaluate_runs", "train", "with_algorithm_overrides"]

TEST_SEED_OFFSET = 1  # test episodes use eval.seed + 1 so they never coincide with validation


def train(config: RunConfig | Trainer, resume: bool | str = False, splits: dict[str, ImageClasses] | None = None,
          test: bool = True, on_validate=None, overwrite: bool = False) -> dict[str, Any]:
    """Meta-train, then evaluate the best checkpoint on ``eval.test_episodes`` fixed test episodes.
    Returns (and writes to ``<out_dir>/report.json``) a summary. ``config``: a run config (the
    :class:`Trainer` is built from it; ``metafit train CONFIG`` calls this), or a trainer built
    in Python (e.g. ``Trainer(algorithm=model, data=splits, ...)``; ``splits`` and
    ``on_validate`` are then its own). ``on_validate(step, result)``
    is called after every validation (see :class:`Trainer`). An ``out_dir`` that already holds
    something is refused unless ``resume`` (continue that run) or ``overwrite`` (delete its
    checkpoints, logs and report first). ``report["stop"]`` says why training ended (all
    ``train.meta_steps``, or the ``train.max_minutes`` budget at ``step``); ``report["split"]``
    lists the classes of every split (image data)."""
    if isinstance(config, Trainer):
        trainer, config = config, config.config
    else:
        check_run_folder(config.out_dir, resume, overwrite)  # before the data is read: a refusal comes at once
        trainer = Trainer(config, splits, pretrained=not resume, on_validate=on_validate)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    config = trainer.config
    if not trainer.dist.is_main:  # distributed: rank 0 calibrates, tests and writes the report
        return {"out_dir": str(result.out_dir), "steps": result.steps, "rank": trainer.dist.rank,
                "best_checkpoint": str(result.checkpoint), "val": result.best_val.to_dict() if result.best_val else None,
                "train_seconds": result.train_seconds, "best_step": result.best_step, "timing": trainer.timing,
                "stop": result.stop}
    report: dict[str, Any] = {
        "out_dir": str(result.out_dir),
        "steps": result.steps,
        "stop": result.stop,
        "train_seconds": result.train_seconds,
        "timing": trainer.timing,
        "best_step": result.best_step,
        "best_checkpoint": str(result.checkpoint),
        "val": result.best_val.to_dict() if result.best_val else None,
        "learning_curve": str(result.learning_curve) if result.learning_curve else None,
    }
    if trainer.split is not None:
        report["split"] = trainer.split
    temperature = None
    if config.eval.calibrate and config.data.task_kind == "classification":
        from .calibration import calibrate_checkpoint

        report["calibration"] = calibrate_checkpoint(result.checkpoint, splits=trainer.splits,
                                                     device=str(trainer.device))
        temperature = report["calibration"]["temperature"]
    if test:
        model = load(result.checkpoint, trainer.device)
        ec = config.eval
        test_res = _evaluate(model, trainer.splits["test"], config, ec, ec.test_episodes,
                             ec.seed + TEST_SEED_OFFSET, trainer.device, trainer.channels_last,
                             temperature=temperature)
        report["test"] = {**test_res.to_dict(), "n_ways": ec.n_ways, "k_shots": ec.k_shots,
                          "n_queries": ec.n_queries, "within_group": ec.within_group}
    write_json(result.out_dir / "report.json", report)
    return report


def _evaluate(model, data, config: RunConfig, task: TaskConfig, episodes: int, seed: int,
              device, channels_last: bool, progress=None, split: str = "test",
              inner_steps: int | None = None, temperature: float | None = None,
              keep_predictions: int = 0) -> EvalResult:
    ev = config.model_copy(update={"eval": config.eval.model_copy(update=task.model_dump())})
    sampler = make_sampler(data, ev, split, 0)
    eps = sampler.fixed_episodes(episodes, seed)
    return evaluate_episodes(model, sampler, eps, device, channels_last, progress, inner_steps, temperature,
                             keep_predictions)

_SPLIT_DIRS = ("train", "val", "test")


def _parse_source(spec: Any) -> tuple[str, str | None]:
    """``folder:PATH``, ``NAME`` or ``NAME:PATH`` -> (name, path or None)."""
    names = sorted(n for n in DATASETS if n != "sinusoid")
    fix = (f"Pass folder:PATH (a class-per-folder tree) or a built-in source ({', '.join(names)}), "
           "optionally NAME:PATH.")
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"Eval: data must be a data source; got {short_repr(spec)}. {fix}")
    name, sep, path = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in names:
        raise ConfigError(f"Eval: data must name a known image source; got {short_repr(spec)}. {fix}")
    path = path.strip() if sep else None
    if sep and not path:
        raise ConfigError(f"Eval: data must name a folder after the colon; got {short_repr(spec)}. {fix}")
    if name == "folder" and path is None:
        raise ConfigError(f"Eval: data 'folder' must give its folder as folder:PATH; got {short_repr(spec)}. "
                          "Pass e.g. --data folder:/path/to/classes.")
    return name, path


def _with_polarity(data: ImageClasses, fmt: ImageFormat, polarity: str, invert: bool) -> tuple[ImageClasses, dict]:
    """``data`` with its images inverted first where ``invert`` (a source that inverts otherwise
    than the checkpoint), then read with ``polarity`` (:func:`polarity_flips`, per image)."""
    if data.lazy:
        base = PolarityImages(data.images, fmt, "flip") if invert else data.images
        images = PolarityImages(base, fmt, polarity) if polarity != "as_trained" else base
        if polarity == "auto":
            use = {"requested": polarity, "used": "per image on read", "flipped": None, "images": data.n_images,
                   "training_background": fmt.background}
            text = "polarity auto, decided per image as the images are read"
        else:
            pu = PolarityUse(polarity, data.n_images if polarity == "flip" else 0, data.n_images, fmt.background)
            use, text = pu.to_dict(), pu.describe()
        return dataclasses.replace(data, images=images), {**use, "text": text}
    idx = data.image_indices()
    x = data.images
    flips = torch.zeros(len(x), dtype=torch.bool)
    for start in range(0, len(x), 4096):
        part = x[start:start + 4096]
        flips[start:start + 4096] = polarity_flips(fmt, 255 - part if invert else part, polarity)
    flip_all = flips ^ invert
    if bool(flip_all.any()):
        x = x.clone()
        x[flip_all] = 255 - x[flip_all]
    use = PolarityUse(polarity, int(flips[idx].sum()), len(idx), fmt.background)
    return dataclasses.replace(data, images=x), {**use.to_dict(), "text": use.describe()}


def cross_domain_data(spec: str, fmt: ImageFormat | None, split: str = "test", polarity: str = "auto",
                      cache_dir: str | None = None) -> tuple[ImageClasses, dict[str, Any]]:
    """The classes of another data source to evaluate a checkpoint on, read with the
    checkpoint's image format ``fmt`` (size, channels, inversion) and ``polarity``, and a
    description for the report. ``spec``: ``folder:PATH`` (every class is a test class unless
    PATH has train/, val/ and test/ sub-folders: then ``split``'s folder), or a built-in source
    ``NAME`` (its default root) or ``NAME:PATH`` (its ``split``)."""
    name, path = _parse_source(spec)
    check_polarity(polarity, "Eval", "Pass --polarity auto, as_trained or flip.")
    if fmt is None:
        raise ConfigError(f"Eval: data {short_repr(spec)} needs a model of images; got a model that takes vectors. "
                          "Drop --data.")
    invert = False
    if name == "folder":
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"Eval: data must name a folder of class folders; got {short_repr(spec)}, which is not "
                            "a folder. Check the path.")
        if all((root / s).is_dir() for s in _SPLIT_DIRS):
            root, which = root / split, f"its {split}/ folder"
        elif split != "test":
            raise ConfigError(f"Eval: split must be 'test' for {short_repr(spec)} (no train/, val/, test/ folders: "
                              f"every class is a test class); got {split!r}. Drop --split.")
        else:
            which = "every class a test class (no train/val/test folders)"
        from ..data.source import memory_budget_bytes  # noqa: PLC0415

        data = load_image_folder(root, fmt.size, fmt.channels, fmt.invert, cache_dir, fmt.fit, "lazy")
        if data.images.nbytes <= memory_budget_bytes(None):
            data = load_image_folder(root, fmt.size, fmt.channels, fmt.invert, cache_dir, fmt.fit, "memory")
        where = str(root)
    else:
        cls = DATASETS[name]
        fields: dict[str, Any] = {"name": name, "rotations": False}
        if path is not None:
            fields["root"] = path
        for key, value in (("image_size", fmt.size), ("channels", fmt.channels), ("invert", fmt.invert),
                           ("fit", fmt.fit), ("cache_dir", cache_dir)):
            if key in cls.model_fields and value is not None:
                fields[key] = value
        cfg = data_config(fields)
        src = cfg.image_format()
        if src is None or src.channels != fmt.channels or src.size != fmt.size:
            got = src.describe() if src is not None else "vectors"
            raise ConfigError(f"Eval: data {short_repr(spec)} must give images like the checkpoint's "
                              f"({fmt.describe()}); got {got}. Use a source with such images, or folder:PATH.")
        invert = src.invert != fmt.invert
        data = cfg.load_splits()[split]
        which, where = f"its {split} split", str(path or getattr(cfg, "root", None) or "the default root")
    data, use = _with_polarity(data, fmt, polarity, invert)
    text = use.pop("text")
    info = {"source": spec, "name": name, "root": where, "split": which, "classes": data.n_classes,
            "images": data.n_images, "image_format": fmt.describe(), "polarity": use, "polarity_text": text}
    return data, info


class EvalRequest(TaskConfig):
    """The settings of one evaluation of a checkpoint (``metafit eval``), validated as a config."""

    episodes: int = Field(ge=1, le=100_000, description="fixed episodes")
    seed: int = Field(ge=0, le=2**32 - 1, description="episode seed")
    inner_steps: int | None = Field(None, ge=0, le=100_000, description="adaptation steps of a gradient-based learner")


def _eval_data(model, config: RunConfig, task: TaskConfig, split: str, source: str | None, polarity: str,
               splits: dict[str, ImageClasses] | None) -> tuple[ImageClasses, dict[str, Any] | None]:
    """The classes :func:`evaluate_checkpoint` evaluates on, and the cross-domain description."""
    if source is None:
        return (splits or load_splits(config.data))[split], None
    recorded = model.checkpoint_meta.get("image_format")
    fmt = ImageFormat(**recorded) if recorded else config.data.image_format()
    data, data_info = cross_domain_data(source, fmt, split, polarity, getattr(config.data, "cache_dir", None))
    if data.n_classes < task.n_ways:
        raise ConfigError(
            f"Eval: --ways must be at most the {data.n_classes} {split} classes of {short_repr(source)}; got "
            f"{task.n_ways}. Lower --ways or add classes."
        )
    return data, data_info


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, n_ways: int | None = None, k_shots: int | None = None,
                        n_queries: int | None = None, episodes: int | None = None, split: str = "test",
                        within_group: bool | None = None, rotations: bool | None = None, seed: int | None = None,
                        data_root: str | None = None, device: str = "cpu", progress=None,
                        splits: dict[str, ImageClasses] | None = None,
                        inner_steps: int | None = None, data: str | None = None, polarity: str = "auto",
                        algorithm_overrides: dict[str, Any] | None = None,
                        plots: str | os.PathLike | None = None) -> dict[str, Any]:
    """Accuracy (regression: mean squared error) of a checkpoint on fixed episodes of a split
    (task settings default to the checkpoint's ``eval`` section); returns a dict of the settings
    used and the :class:`EvalResult` fields. ``n_ways``, ``k_shots``, ``n_queries``, ``within_group``,
    ``episodes`` and ``seed`` override that section's task shape, number of episodes and seed (None:
    the section's: ``val_episodes`` for the val split, else ``test_episodes``; the test split's seed
    is offset as in training), so the episodes of the defaults are those the trainer validated on
    and reports. ``data_root`` points the checkpoint's data source at another
    folder; ``splits`` passes the class splits already loaded instead; ``device`` is where the model
    runs; ``progress``, when given, is called with 1 after each episode. ``inner_steps`` overrides
    a gradient-based learner's adaptation steps; ``algorithm_overrides`` changes adaptation-only fields of the algorithm
    (see :func:`with_algorithm_overrides`); where they change it, the checkpoint's calibrated temperature
    is not applied (``out["calibration"]`` says so). ``data`` evaluates on another data source
    (cross-domain, :func:`cross_domain_data`): ``folder:PATH`` (every class a test class unless
    the tree has train/val/test folders, then ``split``'s) or a built-in source ``NAME`` /
    ``NAME:PATH``, its images read with the checkpoint's image format and ``polarity`` (``auto``,
    ``as_trained``, ``flip``); rotated classes are off unless ``rotations``; ``out["data"]`` says
    what was used. ``plots``: a folder to draw the evaluation in
    (classification; see :func:`metafit.training.plots.write_eval_plots`): ``confusion.png`` over
    all evaluated queries by dataset class and ``episodes.png`` with a few example episodes;
    ``out["plots"]`` names the files."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"Eval: split must be one of 'train', 'val', 'test'; got {split!r}. Choose a listed split.")
    # ``data`` (another source: cross-domain) evaluates on the classes of :func:`cross_domain_data`
    source, data_info = data, None
    if source is not None and (splits is not None or data_root is not None):
        raise ConfigError("Eval: data must be given alone; got data together with "
                          f"{'splits' if splits is not None else 'data_root'}. Pass the folder in data (folder:PATH).")
    trained = load(checkpoint, device)
    model = with_algorithm_overrides(trained, algorithm_overrides)
    config: RunConfig = model.run_config
    if source is not None and rotations is None:
        rotations = False  # another domain: rotated classes only where asked
    if data_root is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"root": data_root})})
    if rotations is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"rotations": rotations})})
    ec = config.eval
    if seed is None:
        seed = ec.seed + (TEST_SEED_OFFSET if split == "test" else 0)
    request = parse_config(EvalRequest, {
        "n_ways": n_ways if n_ways is not None else ec.n_ways,
        "k_shots": k_shots if k_shots is not None else ec.k_shots,
        "n_queries": n_queries if n_queries is not None else ec.n_queries,
        "within_group": within_group if within_group is not None else ec.within_group,
        "episodes": episodes if episodes is not None else (ec.val_episodes if split == "val" else ec.test_episodes),
        "seed": seed, "inner_steps": inner_steps,
    }, owner="Eval", fix="Pass a value in that range (metafit eval --ways/--shots/--queries/--episodes/--seed/--inner-steps).")
    task = TaskConfig(**request.model_dump(include=set(TaskConfig.model_fields)))
    n_eps = request.episodes
    data, data_info = _eval_data(model, config, task, split, source, polarity, splits)
    t0 = time.perf_counter()
    dev = torch.device(device)
    if inner_steps is not None and not hasattr(model.config, "eval_inner_steps"):
        raise ConfigError(
            f"Eval: inner steps only apply to gradient-based learners; got --inner-steps {inner_steps} for "
            f"{model.config.name!r}. Drop --inner-steps."
        )
    temperature = (model.checkpoint_meta.get("calibration") or {}).get("temperature")
    stale_temperature = "calibration" in trained.checkpoint_meta and "calibration" not in model.checkpoint_meta
    if plots is not None:
        from .plots import PLOT_EPISODES, require_matplotlib, write_eval_plots

        require_matplotlib("Eval", "--plots")
        if model.task_kind == "regression":
            raise ConfigError(
                f"Eval: --plots must be used with a classification checkpoint; got a regression one "
                f"({config.data.name}). Drop --plots (the sinusoid quickstart draws adapted curves).")
    res = _evaluate(model, data, config, task, n_eps, seed, dev, dev.type in ("cpu", "cuda"), progress, split,
                    inner_steps, temperature, keep_predictions=PLOT_EPISODES if plots is not None else 0)
    rot = ec.rotations if ec.rotations is not None else getattr(config.data, "rotations", False)
    out = {"checkpoint": str(checkpoint), "split": split, **task.model_dump(), "rotations": rot, "seed": seed,
           **res.to_dict(), "seconds": time.perf_counter() - t0}
    if inner_steps is not None:
        out["inner_steps"] = inner_steps
    if algorithm_overrides:
        out["algorithm_overrides"] = dict(algorithm_overrides)
    if stale_temperature:
        out["calibration"] = ("the calibrated temperature is not applied: it was fitted without these "
                              "algorithm overrides")
    if data_info is not None:
        out["data"] = data_info
    if plots is not None:
        out["plots"] = write_eval_plots(res.predictions, plots)
    return out


def evaluate_runs(checkpoint: str | os.PathLike, runs_dir: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """Accuracy and error rate of ``checkpoint`` on Lake's one-shot runs (one N-way 1-shot task per
    run) in the folder ``runs_dir``, evaluated on ``device``; returns a dict of the
    :class:`EvalResult` fields, the error rate and each run's accuracy (``per_run``)."""
    model = load(checkpoint, device)
    dc = model.run_config.data
    runs = load_runs(runs_dir, dc.image_size, dc.in_channels, invert=dc.name == "omniglot" or dc.invert)
    res = evaluate_tasks(model, [t for _, t in runs], device)
    per_run = {name: acc for (name, _), acc in zip(runs, res.per_episode)}
    return {"checkpoint": str(checkpoint), "runs_dir": str(runs_dir), **res.to_dict(),
            "error_rate": 1.0 - res.mean, "per_run": per_run}
