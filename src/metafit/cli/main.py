"""``metafit`` command line: train, eval, adapt, predict, export, serve, tune, report, info, configs, rl, quickstart.

Errors of metafit print as one line on stderr with exit code 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..errors import ConfigError, MetafitError, short_repr

__all__ = ["build_parser", "entrypoint", "main"]


def _print(msg: str = "") -> None:
    print(msg, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse with metafit's error shape: one line on stderr, exit code 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(1, f"error: {self.prog}: {message}. Run '{self.prog} --help' for the usage.\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metafit", description="Practical meta-learning: train, evaluate, adapt.")
    p.add_argument("--version", action="version", version=f"metafit {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="meta-train from a YAML config (or a built-in config name)")
    t.add_argument("config", help="YAML file or built-in name (see `metafit configs`)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.meta_lr=0.0005 (repeatable)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue exactly from <out_dir>/last.safetensors (or the given checkpoint)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in a run folder that is not empty (its checkpoints, logs and report are "
                        "deleted first; without --resume or --overwrite such a folder is refused)")
    t.add_argument("--data-dir", help="dataset folder (sets data.root)")
    t.add_argument("--out-dir", help="run folder (sets out_dir)")
    t.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    t.add_argument("--check", action="store_true",
                   help="validate the config and size the model, then stop (nothing is read, trained or written)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on fixed episodes (mean and 95%% CI)")
    e.add_argument("checkpoint")
    e.add_argument("--ways", type=int, help="classes per task (default: the checkpoint's eval.n_ways)")
    e.add_argument("--shots", type=int, help="support examples per class")
    e.add_argument("--queries", type=int, help="query examples per class")
    e.add_argument("--episodes", type=int, help="number of fixed episodes (default: eval.test_episodes)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--inner-steps", type=int, help="adaptation steps of a gradient-based learner (default: its eval_inner_steps)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE",
                   help="change an adaptation field for this evaluation (e.g. algorithm.head=centroid)")
    e.add_argument("--within-group", action="store_true", help="draw every task from one group (alphabet)")
    e.add_argument("--rotations", choices=["on", "off"], help="rotated classes in episodes (default: as trained)")
    e.add_argument("--seed", type=int, help="episode seed (default: the trainer's test seed)")
    e.add_argument("--data-dir", help="dataset folder, if it moved since training")
    e.add_argument("--data", metavar="SOURCE", help="evaluate on another dataset (cross-domain): folder:PATH (every "
                   "class a test class unless PATH has train/val/test), or a built-in source NAME or NAME:PATH")
    e.add_argument("--polarity", choices=["auto", "as_trained", "flip"], default="auto", help="with --data: image polarity (auto: "
                   "flip images whose border shows the opposite polarity to the training images')")
    e.add_argument("--runs", metavar="DIR", help="evaluate on Lake's one-shot runs folder instead")
    e.add_argument("--json", metavar="PATH", help="also write the report to this JSON file")
    e.add_argument("--plots", metavar="DIR", help="also draw DIR/confusion.png (by class) and DIR/episodes.png (example episodes)")
    e.add_argument("--device", default="cpu")

    a = sub.add_parser("adapt", help="adapt a trained model to your labelled images; save the task")
    a.add_argument("checkpoint")
    a.add_argument("--support", required=True, metavar="DIR", help="support images, one folder per label: DIR/<label>/<image>")
    a.add_argument("--out", required=True, metavar="TASK", help="where to save the adapted task (.safetensors)")
    a.add_argument("--steps", type=int, help="adaptation steps of a gradient-based learner")
    a.add_argument("--polarity", choices=["auto", "as_trained", "flip"], default="auto", help="image polarity: auto (flip images "
                   "whose border shows the opposite polarity to the training images'), as_trained or flip")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="change an adaptation-only algorithm field, e.g. algorithm.finetune_steps=20 (repeatable)")
    a.add_argument("--device", default="cpu")

    pr = sub.add_parser("predict", help="predict labels of images with an adapted task (or checkpoint + --support)")
    pr.add_argument("model", metavar="CHECKPOINT|TASK", help="a saved task, or a checkpoint together with --support")
    pr.add_argument("--images", required=True, nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    pr.add_argument("--support", metavar="DIR", help="with a checkpoint: support images, DIR/<label>/<image>")
    pr.add_argument("--steps", type=int, help="with a checkpoint: adaptation steps of a gradient-based learner")
    pr.add_argument("--polarity", choices=["auto", "as_trained", "flip"], help="image polarity: auto, as_trained or flip "
                    "(default: the task's own; with a checkpoint, auto)")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="change an adaptation-only algorithm field, e.g. algorithm.finetune_steps=20 (repeatable)")
    pr.add_argument("--out", metavar="FILE", help="write .csv or .json (default: CSV on standard output)")
    pr.add_argument("--top-k", type=int, default=3, help="most probable labels listed per image")
    pr.add_argument("--abstain-below", type=float, metavar="P",
                    help="answer 'unknown' where the top probability is below P (0 < P <= 1)")
    pr.add_argument("--batch-size", type=int, default=256, help="images converted and predicted at a time")
    pr.add_argument("--device", default="cpu")

    ex = sub.add_parser("export", help="write an adapted task (or checkpoint + --support) as one ONNX graph")
    ex.add_argument("model", metavar="TASK|CHECKPOINT", help="a saved task, or a checkpoint together with --support")
    ex.add_argument("--out", required=True, metavar="FILE", help="where to write the graph (e.g. task.onnx)")
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    ex.add_argument("--support", metavar="DIR", help="with a checkpoint: support images, DIR/<label>/<image>")
    ex.add_argument("--steps", type=int, help="with a checkpoint: adaptation steps of a gradient-based learner")
    ex.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="with a checkpoint: change an adaptation-only algorithm field (repeatable)")
    ex.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")

    cb = sub.add_parser("calibrate", help="fit a softmax temperature on validation episodes; store it in the checkpoint")
    cb.add_argument("checkpoint")
    cb.add_argument("--episodes", type=int, help="validation episodes (default: the checkpoint's eval.val_episodes)")
    cb.add_argument("--ways", type=int, help="classes per task (default: the checkpoint's eval.n_ways)")
    cb.add_argument("--shots", type=int, help="support examples per class")
    cb.add_argument("--out", metavar="PATH", help="write a calibrated copy instead of updating the checkpoint")
    cb.add_argument("--data-dir", help="dataset folder, if it moved since training")
    cb.add_argument("--device", default="cpu")

    sv = sub.add_parser("serve", help="serve a checkpoint over HTTP: create tasks, predict (FastAPI)")
    sv.add_argument("checkpoint")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-tasks", type=int, default=64, help="adapted tasks kept (least recently used evicted)")
    sv.add_argument("--max-images", type=int, default=256, help="images per request")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="request body size limit")
    sv.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per image (width x height)")
    sv.add_argument("--max-request-decoded-mb", type=float, default=1024.0,
                    help="decoded image bytes one request may need (checked from the image headers: 413 beyond)")
    sv.add_argument("--max-decoding-mb", type=float, default=256.0,
                    help="decoded image bytes held at once by all requests being decoded")
    sv.add_argument("--api-key-env", default="METAFIT_API_KEY", metavar="VAR",
                    help="environment variable holding the API key (requests must send it when it is set)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level; info prints an access log line per request")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--set", dest="overrides", action="append", default=[], metavar="algorithm.KEY=VALUE", help="change an adaptation-only algorithm field, e.g. algorithm.finetune_steps=20 (repeatable)")

    tu = sub.add_parser("tune", help="hyperparameter search with Optuna (TPE sampler, median pruner); resumable",
                        description="Search config fields: every trial trains CONFIG with sampled values into "
                                    "OUT/trial-<n>; unpromising trials are pruned at validations. Running the same "
                                    "command again resumes the study; --storage shares it between machines.")
    tu.add_argument("config", help="YAML file or built-in name (see `metafit configs`)")
    tu.add_argument("--space", required=True, metavar="SPACE",
                    help="YAML mapping config fields to distributions, e.g. 'train.meta_lr: {type: float, low: 1.0e-4, "
                         "high: 1.0e-2, log: true}' (or a built-in space name)")
    tu.add_argument("--trials", type=int, required=True, metavar="N",
                    help="finished (complete + pruned) trials the study should hold in total; a resumed study runs "
                         "only the missing ones")
    tu.add_argument("--storage", metavar="URL", help="database URL of the study (default sqlite:///OUT/study.db); "
                                                     "e.g. postgresql://user@host/db to share it between machines")
    tu.add_argument("--study-name", metavar="NAME", help="study name in the storage (default: the config's name)")
    tu.add_argument("--out", metavar="DIR", help="output folder (default runs/tune-<config name>)")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="fixed config value for every trial, e.g. --set train.meta_steps=2000 (repeatable)")
    tu.add_argument("--data-dir", help="dataset folder (sets data.root)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the sampler (use a different one on each machine "
                                                         "sharing a study)")

    rp = sub.add_parser("report", help="Markdown table and learning curves (PNG) of one or several run folders")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (the out_dir of `metafit train`)")
    rp.add_argument("--out", metavar="DIR", help="where report.md and curves.png go (default: <parent of the "
                                                 "first run>/report)")
    rp.add_argument("--metric", choices=["accuracy", "loss"], default="accuracy",
                    help="curves of the task metric (accuracy, or MSE for regression) or of the loss")
    rp.add_argument("--x", choices=["time", "images"], default="time",
                    help="x-axis of the curves: training time (default) or training images seen (a step is one "
                         "episode for ProtoNet but a mini-batch for transfer, so steps are not compared)")

    i = sub.add_parser("info", help="show what a checkpoint holds")
    i.add_argument("checkpoint")

    c = sub.add_parser("configs", help="list the built-in configs, or every config field with --fields")
    c.add_argument("--fields", nargs="?", const="", default=None, metavar="NAME",
                   help="list every config key with its default and meaning, grouped by section and by algorithm, "
                        "backbone and data source; with NAME (e.g. maml, resnet12, folder, train) only that one")

    rl = sub.add_parser("rl", help="meta-reinforcement learning: train / eval / configs (RL2, MAML-RL)")
    rsub = rl.add_subparsers(dest="rl_command", required=True, metavar="RL_COMMAND")
    rt = rsub.add_parser("train", help="train a meta-RL learner from a YAML config (or a built-in name)")
    rt.add_argument("config", help="YAML file or built-in name (see `metafit rl configs`)")
    rt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.iterations=200 (repeatable)")
    rt.add_argument("--resume", action="store_true", help="continue exactly from <out_dir>/last.safetensors")
    rt.add_argument("--overwrite", action="store_true",
                    help="replace the run in out_dir (its checkpoints, logs and report are deleted first)")
    rt.add_argument("--out-dir", help="run folder (sets out_dir)")
    rt.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    re_ = rsub.add_parser("eval", help="returns per adaptation step (mean and 95%% CI) on fixed test tasks")
    re_.add_argument("checkpoint")
    re_.add_argument("--tasks", type=int, help="test tasks (default: the run's train.test_tasks)")
    re_.add_argument("--seed", type=int, help="seed of the test tasks (default: the run's eval_seed + 1)")
    re_.add_argument("--out", help="also write the result as JSON here")
    re_.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                     help="where to run the evaluation (RL2: cpu or cuda; default cpu)")
    rsub.add_parser("configs", help="list the built-in meta-RL configs")

    q = sub.add_parser("quickstart", help="a short real run: MAML on sinusoids (built in), or ProtoNet on Omniglot")
    q.add_argument("--task", choices=["auto", "sinusoid", "omniglot"], default="auto",
                   help="auto: Omniglot when a data folder is given (--data-dir, METAFIT_DATA_DIR, --download) "
                        "or already cached, else sinusoids")
    q.add_argument("--data-dir", help="folder with the Omniglot zips (default: METAFIT_DATA_DIR)")
    q.add_argument("--download", action="store_true", help="download Omniglot (checksum-verified) if missing")
    q.add_argument("--steps", type=int, help="meta-training steps (default: sinusoid 10000, omniglot 500)")
    q.add_argument("--out-dir", help="run folder (default runs/quickstart-<task>)")
    return p


def _cmd_train(args) -> int:
    from ..algorithms import get_algorithm
    from ..training import load_config, train

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.root={args.data_dir}")
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    cfg = load_config(args.config, overrides)
    if args.check:
        return _check_config(cfg)
    if get_algorithm(cfg.algorithm.name).training_data == "batches":
        what = f"mini-batches of {cfg.algorithm.batch_size} images over all training classes"
    else:
        what = f"{cfg.task.n_ways}-way {cfg.task.k_shots}-shot tasks"
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if main_rank:
        _print(f"metafit {__version__}: training {cfg.algorithm.name} ({what}) for {cfg.train.meta_steps} steps "
               f"-> {cfg.out_dir}" + (f" on {world} processes" if world > 1 else ""))
    with contextlib.ExitStack() as stack:
        if main_rank:  # what training logs: pretrained weights, the data split, --overwrite, a budget stop
            stack.enter_context(_printing_log("metafit.training.pretrained"))
            stack.enter_context(_printing_log("metafit.training.trainer"))
        report = train(cfg, resume=args.resume, test=not args.no_test, overwrite=args.overwrite)
    if main_rank:
        _print_train_report(report)
    return 0


def _check_config(cfg) -> int:
    from ..nn import MAX_PARAMETERS, count_backbone_weights
    from ..training.config import resolve_config

    cfg = resolve_config(cfg)
    n = count_backbone_weights(cfg.backbone, cfg.data.in_channels, cfg.data.input_size)
    if n is not None and n > MAX_PARAMETERS:
        raise ConfigError(
            f"Config: the backbone must have at most {MAX_PARAMETERS:,} weights; got {n:,}. "
            "Make the backbone narrower or the images smaller."
        )
    weights = f"{n:,} backbone weights" if n is not None else "weights from the backbone's files"
    _print(f"config OK: {cfg.algorithm.name} on {cfg.data.name} data, {cfg.backbone.name} backbone ({weights}), "
           f"{cfg.train.meta_steps} steps -> {cfg.out_dir} (--check: nothing read, trained or written)")
    return 0


@contextlib.contextmanager
def _printing_log(name: str):
    """Print the INFO records of logger ``name`` (training code logs, the CLI prints)."""
    class _Print(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _print(record.getMessage())

    logger, handler = logging.getLogger(name), _Print(logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _print_train_report(report: dict) -> None:
    val = report.get("val")
    if val and val.get("metric") == "mse":
        _print(f"best validation MSE {val['mean']:.4f} +/- {val['ci95']:.4f} at step {report['best_step']} "
               f"-> {report['best_checkpoint']}")
        test = report.get("test")
        if test:
            _print(f"test MSE ({test['k_shots']}-shot, {test['episodes']} fixed tasks): {test['mean']:.4f} "
                   f"+/- {test['ci95']:.4f} (95% CI)")
    else:
        if val:
            _print(f"best validation accuracy {100 * val['mean']:.2f}% +/- {100 * val['ci95']:.2f}% "
                   f"at step {report['best_step']} -> {report['best_checkpoint']}")
        test = report.get("test")
        if test:
            _print(f"test accuracy ({test['n_ways']}-way {test['k_shots']}-shot, {test['episodes']} fixed episodes): "
                   f"{100 * test['mean']:.2f}% +/- {100 * test['ci95']:.2f}% (95% CI)")
    stop = report.get("stop") or {}
    ended = (f"; stopped by the time budget train.max_minutes={stop['max_minutes']:g} at step {stop['step']} of "
             f"{stop['meta_steps']}" if stop.get("reason") == "max_minutes" else "")
    _print(f"training time {report['train_seconds'] / 60:.1f} min{ended}; "
           f"report: {Path(report['out_dir']) / 'report.json'}")
    if report.get("learning_curve"):
        _print(f"learning curve: {report['learning_curve']}")


def _cmd_eval(args) -> int:
    from tqdm.auto import tqdm

    from ..training import evaluate_checkpoint, evaluate_runs
    from ..training.metrics_log import write_json

    if args.runs:
        report = evaluate_runs(args.checkpoint, args.runs, device=args.device)
        _print(f"Lake one-shot runs ({report['episodes']} runs): accuracy {100 * report['mean']:.2f}% "
               f"+/- {100 * report['ci95']:.2f}%, error rate {100 * report['error_rate']:.2f}%")
    else:
        bar = tqdm(total=args.episodes, desc="eval", dynamic_ncols=True, disable=None)
        try:
            report = evaluate_checkpoint(
                args.checkpoint, n_ways=args.ways, k_shots=args.shots, n_queries=args.queries,
                episodes=args.episodes, split=args.split, within_group=True if args.within_group else None,
                rotations=None if args.rotations is None else args.rotations == "on",
                seed=args.seed, data_root=args.data_dir, device=args.device, progress=bar.update,
                inner_steps=args.inner_steps, algorithm_overrides=_algorithm_overrides(args.overrides),
                data=args.data, polarity=args.polarity, plots=args.plots)
        finally:
            bar.close()
        steps = f", {report['inner_steps']} inner steps" if "inner_steps" in report else ""
        if report.get("data"):
            d = report["data"]
            _print(f"data: {d['source']} ({d['classes']} {report['split']} classes, {d['split']}); images read as "
                   f"{d['image_format']}; {d['polarity_text']}")
        if report.get("metric") == "mse":
            _print(f"{report['split']} {report['k_shots']}-shot regression{steps}: MSE {report['mean']:.4f} "
                   f"+/- {report['ci95']:.4f} (95% CI over {report['episodes']} tasks, seed {report['seed']})")
        else:
            _print(f"{report['split']} {report['n_ways']}-way {report['k_shots']}-shot"
                   f"{' within-group' if report['within_group'] else ''}{steps}: accuracy {100 * report['mean']:.2f}% "
                   f"+/- {100 * report['ci95']:.2f}% (95% CI over {report['episodes']} episodes, seed {report['seed']})")
            if report.get("ece") is not None:
                cal = (f", {100 * report['ece_calibrated']:.2f}% with the calibrated temperature "
                       f"{report['temperature']:.3f}" if report.get("ece_calibrated") is not None else
                       " (uncalibrated: run metafit calibrate)")
                _print(f"expected calibration error {100 * report['ece']:.2f}%{cal}")
    if args.json:
        write_json(args.json, report)
        _print(f"report: {args.json}")
    if args.plots and args.runs:
        _print("note: --plots draws evaluations on fixed episodes; with --runs nothing was drawn")
    for name, path in (report.get("plots") or {}).items():
        _print(f"{name} plot: {path}")
    return 0


def _algorithm_overrides(items: list[str]) -> dict:
    from ..training.config import parse_override_value

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("algorithm.") or "." in key[len("algorithm."):]:
            raise ConfigError(
                f"Eval: --set must look like algorithm.KEY=VALUE; got {item!r}. Only algorithm fields "
                "(e.g. algorithm.head=centroid) can change when evaluating a checkpoint."
            )
        out[key[len("algorithm."):]] = parse_override_value(key, raw)
    return out


def _cmd_adapt(args) -> int:
    from ..data import list_labelled_images
    from ..training.inference import load_model

    files, labels = list_labelled_images(args.support)
    model = load_model(args.checkpoint, args.device, _algorithm_overrides(args.overrides))
    task = model.adapt(files, labels, steps=args.steps, polarity=args.polarity)
    path = task.save(args.out)
    counts = {n: labels.count(n) for n in task.class_names}
    _print(f"adapted {model.config.algorithm.name} to {task.n_classes} classes from {len(files)} images "
           f"({', '.join(f'{n}: {c}' for n, c in counts.items())}); images read as {model.image_format.describe()}")
    _print(f"{task.support_polarity.describe()}; predictions use polarity {task.polarity}")
    _print(f"task: {path}")
    return 0


def _cmd_predict(args) -> int:
    import csv
    import io

    from tqdm.auto import tqdm

    from ..data import list_images, list_labelled_images
    from ..training.inference import is_task_file, load_model, load_task
    from ..training.metrics_log import write_json

    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError(
            f"Predict: --top-k and --batch-size must be >= 1; got {args.top_k} and {args.batch_size}. Pass positive values."
        )
    notes: list = []
    if is_task_file(args.model):
        if args.support:
            raise ConfigError(
                f"Predict: --support must not be given with a saved task; got {args.model!r} (a task) and --support. "
                "Drop --support, or pass the checkpoint instead of the task."
            )
        task = load_task(args.model, device=args.device)
    else:
        if not args.support:
            from ..training import read_checkpoint

            read_checkpoint(args.model)  # a missing or damaged file: say that, not "needs --support"
            raise ConfigError(
                f"Predict: a checkpoint needs --support DIR to adapt first; got {args.model!r} without it. "
                "Pass --support, or a task saved by `metafit adapt`."
            )
        files, labels = list_labelled_images(args.support)
        task = load_model(args.model, args.device, _algorithm_overrides(args.overrides)).adapt(
            files, labels, steps=args.steps, polarity=args.polarity or "auto")
        notes.append(("support", task.support_polarity))
    images = list_images(args.images)
    bar = tqdm(total=len(images), desc="predict", unit="img", dynamic_ncols=True, disable=None)
    try:
        pred = task.predict(images, batch_size=args.batch_size, progress=bar.update, abstain_below=args.abstain_below,
                            polarity=args.polarity)
    finally:
        bar.close()
    notes.append(("images", pred.polarity))
    rows = [{"file": str(f), "label": label, "probability": float(p.max()), "abstained": label is None,
             "top_k": [{"label": n, "probability": q} for n, q in top]}
            for f, label, p, top in zip(images, pred.labels, pred.probabilities, pred.top_k(args.top_k))]
    if args.out and args.out.lower().endswith(".json"):
        write_json(args.out, {"classes": list(task.class_names), "polarity": pred.polarity.to_dict(),
                              "predictions": rows})
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "label", "probability", "top_k"])  # label "unknown": abstained
        for r in rows:
            w.writerow([r["file"], "unknown" if r["abstained"] else r["label"], f"{r['probability']:.6f}",
                        ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r["top_k"])])
        if args.out:
            from ..data.cache import atomic_write_bytes

            atomic_write_bytes(Path(args.out), lambda f: f.write(buf.getvalue().encode()))
        else:
            sys.stdout.write(buf.getvalue())
    # what polarity was used, once the output is written (only for models with a polarity convention;
    # beside CSV on stdout the notes go to stderr)
    for what, use in notes:
        if use.background is not None:
            print(f"{what}: {use.describe()}", file=sys.stdout if args.out else sys.stderr, flush=True)
    if args.out:
        _print(f"{len(rows)} predictions over {task.n_classes} classes -> {args.out}")
    return 0


def _cmd_export(args) -> int:
    from ..data import list_labelled_images
    from ..training.export import export_onnx, export_spec
    from ..training.inference import is_task_file, load_model, load_task

    if is_task_file(args.model):
        if args.support:
            raise ConfigError(
                f"Export: --support must not be given with a saved task; got {args.model!r} (a task) and --support. "
                "Drop --support, or pass the checkpoint instead of the task."
            )
        task = load_task(args.model)
    else:
        if not args.support:
            from ..training import read_checkpoint

            read_checkpoint(args.model)  # a missing or damaged file: say that, not "needs --support"
            raise ConfigError(
                f"Export: a checkpoint needs --support DIR to adapt first; got {args.model!r} without it. "
                "Pass --support, or a task saved by `metafit adapt`."
            )
        files, labels = list_labelled_images(args.support)
        task = load_model(args.model, "cpu", _algorithm_overrides(args.overrides)).adapt(files, labels, steps=args.steps)
    path = export_onnx(task, args.out, opset=args.opset)
    spec = export_spec(task)
    shape = ", ".join(str(d) for d in spec["input"]["shape"])
    _print(f"exported {spec['algorithm']} task over {task.n_classes} classes {short_repr(list(task.class_names))} "
           f"-> {path}")
    _print(f"input: {spec['input']['name']} float32 [{shape}] in [0, 1] (N: any batch size)")
    _print(f"outputs: logits [N, {task.n_classes}], probabilities [N, {task.n_classes}] "
           f"(softmax(logits / {spec['temperature']:g}))")
    _print(f"preprocessing: {spec['preprocessing']}")
    if spec["batch_statistics"]:
        _print("note: BatchNorm uses the statistics of each batch (as in PyTorch): feed a task's images together")
    return 0


def _cmd_calibrate(args) -> int:
    from ..training.calibration import calibrate_checkpoint

    r = calibrate_checkpoint(args.checkpoint, episodes=args.episodes, n_ways=args.ways, k_shots=args.shots,
                             out=args.out, data_root=args.data_dir, device=args.device)
    _print(f"temperature {r['temperature']:.4f} fitted on {r['episodes']} validation episodes "
           f"({r['n_ways']}-way {r['k_shots']}-shot): ECE {100 * r['ece_before']:.2f}% -> {100 * r['ece_after']:.2f}%, "
           f"NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}")
    _print(f"stored in {r['checkpoint']}")
    return 0


def _cmd_serve(args) -> int:
    import os

    try:
        import uvicorn

        from ..serve import ServeLimits, create_app
    except ImportError as err:
        raise ConfigError(
            f"Serve: the serve extra must be installed; got {err}. Run pip install -c constraints.txt -e \".[serve]\"."
        ) from err
    from ..training.inference import load_model

    for name, value in (("--port", args.port), ("--max-tasks", args.max_tasks), ("--max-images", args.max_images),
                        ("--max-body-mb", args.max_body_mb), ("--max-image-pixels", args.max_image_pixels),
                        ("--max-request-decoded-mb", args.max_request_decoded_mb),
                        ("--max-decoding-mb", args.max_decoding_mb)):
        if value <= 0 or (name == "--port" and value > 65535):
            raise ConfigError(f"Serve: {name} must be positive (a port at most 65535); got {value}. Fix the option.")
    key = os.environ.get(args.api_key_env) or None
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_images=args.max_images,
                         max_image_pixels=args.max_image_pixels, max_tasks=args.max_tasks, api_key=key,
                         max_request_decoded_bytes=int(args.max_request_decoded_mb * 2**20),
                         max_decoding_bytes=int(args.max_decoding_mb * 2**20))
    # bind before anything is announced: a port in use is a one-line error, not a late exit 3
    import errno
    import socket

    from ..errors import short_repr

    try:
        family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise ConfigError(f"Serve: --host must be an address of this machine; got {short_repr(args.host)} ({err}). "
                          "Pass e.g. 127.0.0.1 or 0.0.0.0.") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a listener still conflicts
        sock.bind((args.host, args.port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"Serve: --port must be free on {short_repr(args.host)}; got {args.port}, which another process "
                              "is using. Stop that process or pass another --port.") from None
        raise ConfigError(f"Serve: --host and --port must be bindable; got {short_repr(args.host)}:{args.port} "
                          f"({err.strerror or err}). Pass another address or port.") from None
    try:
        model = load_model(args.checkpoint, args.device, _algorithm_overrides(args.overrides))
        app = create_app(model, limits)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
        _print(f"serving {model.config.algorithm.name} from {args.checkpoint} on http://{args.host}:{args.port} "
               f"(API docs at /docs; API key {'required' if key else 'off'})")
        if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            _print(f"warning: listening on {args.host} without an API key; set {args.api_key_env} to require one")
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ConfigError(f"Serve: the server must start on {args.host}:{args.port}; got a startup failure "
                          "(logged above). Fix what the log names and start it again.")
    return 0


def _cmd_tune(args) -> int:
    from ..training import tune
    from ..training.tune import trials_table

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.root={json.dumps(args.data_dir)}")  # a JSON string is a quoted YAML scalar
    _print(f"metafit {__version__}: tuning {args.config} over {args.space} until the study holds {args.trials} "
           "finished trials")
    try:
        with _printing_log("metafit.training.tune"):
            summary = tune(args.config, args.space, args.trials, storage=args.storage, study_name=args.study_name,
                           out_dir=args.out, overrides=overrides, seed=args.seed)
    except KeyboardInterrupt:
        print("interrupted; finished trials are kept in the study: run the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    counts = summary["n_trials"]
    _print(f"\nstudy {summary['study_name']}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
           + f" (objective: {summary['objective']})")
    if summary["trials"]:
        _print(trials_table(summary, limit=10, best_first=True))
    best = summary["best"]
    files = summary["files"]
    if best:
        _print(f"best: trial {best['number']} -> {files['best']} (your config with only the searched fields changed)")
        if overrides:
            _print("the trials' --set values (" + ", ".join(overrides) + ") are not in it: it keeps the config's "
                   "own budget")
        _print(f"train it: {best['train_command']}")
    else:
        _print("no trial completed yet (all pruned or failed): widen the space or raise train.meta_steps")
    _print(f"tables: {files['trials_md']}, {files['trials_csv']}; plot: {files['history']}; summary: {files['summary']}")
    return 0


def _cmd_report(args) -> int:
    from ..training import report_runs

    result = report_runs(args.runs, args.out, metric=args.metric, x=args.x)
    _print(result["table"])
    for note in result["notes"]:
        _print(note)
    _print("curve panels (runs share one only where their numbers mean the same):")
    for panel in result["panels"]:
        _print(f"  {panel['title']}: {', '.join(panel['runs'])}")
    _print(f"report: {result['report']}\ncurves: {result['curves']}")
    return 0


def _short(value) -> str:
    """A config value for one line: numbers in lists rounded."""
    if isinstance(value, list):
        return "[" + ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)


def _info_task(path: str) -> int:
    """``metafit info`` of a task file saved by ``metafit adapt`` / ``task.save``."""
    from ..errors import CheckpointError
    from ..training.checkpoint import validate_meta
    from ..training.inference import TaskMeta, _task_raw
    from ..validation import load_json

    where = f"the metadata of {path!r}"
    meta: TaskMeta = validate_meta(TaskMeta, load_json(_task_raw(Path(path)), f"Task: {where}", CheckpointError),
                                   where, "The file is damaged or was edited; adapt again and save.", owner="Task")
    names = [str(n) for n in meta.class_names]
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    model = meta.checkpoint or "not recorded"
    if not (meta.checkpoint and Path(meta.checkpoint).is_file()):
        model += " (missing: metafit.load_task(TASK, checkpoint=PATH) takes the checkpoint it was adapted with)"
    _print(f"task         {path} (adapted by metafit adapt / task.save)")
    _print(f"algorithm    {meta.algorithm} ({meta.adapted_type})")
    _print(f"classes      {len(names)}: {shown}")
    _print(f"model        {model}")
    _print(f"metafit      {meta.metafit_version or 'unknown'} (task format {meta.format_version})")
    return 0


def _cmd_info(args) -> int:
    from ..training import read_checkpoint
    from ..training.checkpoint import load
    from ..training.inference import is_task_file

    if is_task_file(args.checkpoint):
        return _info_task(args.checkpoint)
    meta, tensors = read_checkpoint(args.checkpoint)  # metadata validated against the checkpoint schema
    n_params = sum(v.numel() for k, v in tensors.items() if k.startswith("model."))
    version = f"{meta.get('metafit_version') or 'unknown'} (format {meta['format_version']})"
    if meta.get("kind") == "rl":
        from ..training.rl_run import load_rl

        rl_cfg = load_rl(args.checkpoint).run_config  # the stored config and every tensor checked
        tr = rl_cfg.train
        _print(f"checkpoint   {args.checkpoint}")
        _print(f"learner      {rl_cfg.learner.name} ({json.dumps(rl_cfg.learner.model_dump(mode='json'))})")
        _print(f"family       {rl_cfg.family.name} {json.dumps(rl_cfg.family.settings)}")
        _print(f"trained for  {tr.iterations} iterations, validated on {tr.eval_tasks} tasks every {tr.eval_every}")
        _print(f"iteration    {meta['step']}   values {n_params:,} (weights and buffers)   "
               f"resumable {'train_state' in meta}")
        _print(f"metafit      {version}")
        if meta.get("metrics"):
            _print(f"metrics      {json.dumps(meta['metrics'])}")
        return 0
    run_cfg = load(args.checkpoint).run_config  # the stored config and every tensor checked
    cfg = run_cfg.to_dict()
    _print(f"checkpoint   {args.checkpoint}")
    _print(f"algorithm    {run_cfg.algorithm.name} ({json.dumps(cfg['algorithm'])})")
    _print(f"backbone     {json.dumps(cfg['backbone'])}")
    d, t = cfg["data"], cfg["task"]
    if d["name"] == "sinusoid":
        _print(f"data         sinusoid amplitude=[{d['amplitude_min']}, {d['amplitude_max']}] "
               f"phase=[{d['phase_min']:.3g}, {d['phase_max']:.3g}] x=[{d['x_min']}, {d['x_max']}]")
        _print(f"trained on   {t['k_shots']}-shot regression tasks ({t['n_queries']} query points)")
    else:
        split = meta.get("split")
        # only what describes this source's data: not where it was cached or how it was decoded, nor
        # the split fractions of a tree that came with train/, val/ and test/ folders
        skip = {"name", "cache_dir", "storage", "workers", "memory_budget_gb", "download"}
        if split and split.get("how", "").startswith("the train/, val/ and test/ folders"):
            skip |= {"val_fraction", "test_fraction", "split_seed"}
        shown = " ".join(f"{k}={_short(v)}" for k, v in d.items() if k not in skip and v is not None)
        _print(f"data         {d['name']} {shown}")
        if split:
            from ..training.trainer import split_lines

            first, *rest = split_lines(split)
            _print(f"split        {first.removeprefix('data split: ')}")
            for line in rest:
                _print(f"             {line.strip()}")
        _print(f"images       read as {run_cfg.data.image_format().describe()} (metafit adapt/predict)")
        alg = cfg["algorithm"]
        if alg.get("n_base_classes"):  # pretrained on standard mini-batches (transfer)
            _print(f"trained on   mini-batches of {alg['batch_size']} images over {alg['n_base_classes']} base classes")
        else:
            _print(f"trained on   {t['n_ways']}-way {t['k_shots']}-shot {t['n_queries']}-query tasks")
    _print(f"step         {meta['step']}   values {n_params:,} (weights and buffers)   resumable {'train_state' in meta}")
    _print(f"metafit      {version}")
    if meta.get("metrics"):
        _print(f"metrics      {json.dumps(meta['metrics'])}")
    return 0


def _cmd_configs(args) -> int:
    from ..training import builtin_configs

    if args.fields is not None:
        return _show_fields(args.fields)
    for name, path in sorted(builtin_configs().items()):
        _print(f"{name:32s} {path}")
    return 0


def _field_help(field) -> str:
    """A field's description, with its choices where it takes one of a few literal values."""
    from typing import Literal, get_args, get_origin

    choices = [a for arg in (field.annotation, *get_args(field.annotation)) if get_origin(arg) is Literal
               for a in get_args(arg)]
    text = field.description or ""
    if choices and not all(str(c) in text for c in choices):
        text = f"{text} (one of: {', '.join(map(str, choices))})" if text else f"one of: {', '.join(map(str, choices))}"
    return text


def _entry_summary(cls, module_cls=None) -> str:
    """One line about a registry entry: its ``summary``, else its module's first sentence."""
    import sys as _sys

    text = getattr(cls, "summary", "") or ""
    if not text and module_cls is not None:
        doc = (_sys.modules.get(module_cls.__module__).__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(doc.split())
        text = "" if doc.endswith(":") else doc  # a module of several entries says nothing about one
    return text.rstrip(".")


def _show_fields(only: str) -> int:
    """Every config field with its default and meaning, grouped by section and by registry entry
    (``algorithm (name: maml)``); ``only`` (an algorithm, backbone, data source or section name)
    shows just that part."""
    from pydantic import BaseModel

    from ..algorithms import ALGORITHMS
    from ..data import DATASETS
    from ..nn import BACKBONES
    from ..training import RunConfig, make_config
    from ..validation import did_you_mean

    registries = {"data": {k: (v, None) for k, v in DATASETS.items()},
                  "algorithm": {k: (v.Config, v) for k, v in ALGORITHMS.items()},
                  "backbone": {k: (v[0], v[1]) for k, v in BACKBONES.items()}}
    kinds = {"data": "data sources", "algorithm": "algorithms", "backbone": "backbones"}
    cfg = make_config({})
    blocks: list[tuple[str, str, str, list[tuple[str, str, str]]]] = []  # (section, entry, header, fields)
    top = [(key, repr(getattr(cfg, key)), _field_help(field)) for key, field in RunConfig.model_fields.items()
           if not isinstance(getattr(cfg, key), BaseModel)]
    blocks.append(("run", "", "run (top-level keys)", top))
    for section, field in RunConfig.model_fields.items():
        model = getattr(cfg, section)
        if not isinstance(model, BaseModel):
            continue
        if section in registries:  # one block per registered entry, selected by <section>.name
            for name, (cls, module_cls) in registries[section].items():
                default = ", the default" if getattr(model, "name", None) == name else ""
                summary = _entry_summary(cls, module_cls)
                rows = [(f"{section}.{key}",
                         "required" if f.is_required() else repr(f.get_default(call_default_factory=True)),
                         _field_help(f)) for key, f in cls.model_fields.items() if key != "name"]
                blocks.append((section, name, f"{section} (name: {name}{default})" + (f": {summary}" if summary else ""),
                               rows))
            continue
        rows = [(f"{section}.{key}", repr(getattr(model, key)), _field_help(f))
                for key, f in type(model).model_fields.items()]
        blocks.append((section, "", f"{section}" + (f": {field.description}" if field.description else ""), rows))
    if only:
        chosen = [b for b in blocks if only in (b[0], b[1])]
        if not chosen:
            names = [n for reg in registries.values() for n in reg]
            sections = [b[0] for b in blocks if not b[1]]
            listed = "; ".join(f"{kinds[s]}: {', '.join(reg)}" for s, reg in registries.items())
            raise ConfigError(
                f"Configs: --fields NAME must name an algorithm, backbone, data source or config section "
                f"({listed}; sections: {', '.join(dict.fromkeys(sections + list(registries)))}); got {short_repr(only)}."
                f"{did_you_mean(only, names + sections + list(registries))} "
                "Run 'metafit configs --fields' to list every field."
            )
        blocks = chosen
    width = max((len(key) for b in blocks for key, _, _ in b[3]), default=20) + 2
    for i, (_, _, header, rows) in enumerate(blocks):
        _print(("" if i == 0 else "\n") + header)
        for key, default, help_ in rows:
            _print(f"  {key:{width}s} {default:24s} {help_}".rstrip())
    return 0


# MSE of MAML on 5-shot sinusoid regression after 1, 5 and 10 inner steps, read off Finn et al. (2017), Fig. 2
# and the appendix's k=5 panel (the paper gives the curve, not a table).
MAML_PAPER_SINUSOID = {1: 0.67, 5: 0.38, 10: 0.35}


def _cmd_quickstart(args) -> int:
    from ..data import find_omniglot

    task = args.task
    if task == "auto":  # Omniglot when asked for (a folder, METAFIT_DATA_DIR, --download) or cached
        if args.data_dir or os.environ.get("METAFIT_DATA_DIR") or args.download:
            task = "omniglot"
        else:
            try:
                find_omniglot()
                task = "omniglot"
            except MetafitError:
                task = "sinusoid"
    if task == "sinusoid":
        return _quickstart_sinusoid(args)
    return _quickstart_omniglot(args, find_omniglot(args.data_dir, download=args.download))


def _replacing(out_dir) -> str:
    """The quickstart's note that it replaces an earlier run in its folder (empty if there is none)."""
    folder = Path(out_dir)
    if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
        return f"\n  Run folder {out_dir}: the earlier run there is replaced (pass another --out-dir to keep it)."
    return ""


def _quickstart_sinusoid(args) -> int:
    from ..training import evaluate_checkpoint, load, load_config, train
    from ..training.plots import plot_sinusoid_adaptation

    steps = args.steps or 10000
    out = args.out_dir or "runs/quickstart-sinusoid"
    cfg = load_config("sinusoid_maml", [
        f"out_dir={out}", f"train.meta_steps={steps}", f"train.eval_every={max(1, steps // 4)}",
        f"train.save_interval={max(1, steps // 2)}", f"train.log_every={max(1, min(500, steps // 10))}",
    ])
    _print("metafit quickstart: MAML on few-shot sinusoid regression (built in, no download)\n"
           f"  meta-train {steps} steps (the paper uses 70000: `metafit train sinusoid_maml`), keep the best\n"
           "  checkpoint on 200 validation tasks, then adapt to 600 unseen sinusoids from 5 points each."
           + _replacing(out))
    with _printing_log("metafit.training.trainer"):
        report = train(cfg, overwrite=True)
    _print_train_report(report)
    ckpt = report["best_checkpoint"]
    _print("\n5-shot MSE on 600 unseen tasks (100 query points each), 95% CI:")
    _print(f"  {'inner steps':>11s}  {'metafit':>17s}  {'MAML paper (Fig. 2)':>19s}")
    for s, paper in MAML_PAPER_SINUSOID.items():
        r = evaluate_checkpoint(ckpt, inner_steps=s)
        _print(f"  {s:>11d}  {r['mean']:8.3f} +/- {r['ci95']:.3f}  {paper:>19.2f}")
    from ..training.plots import PLOTS_EXTRA, have_matplotlib

    if have_matplotlib():
        png = plot_sinusoid_adaptation(load(ckpt), cfg.data.sinusoid_family(), Path(out) / "adaptation.png",
                                       k_shots=cfg.eval.k_shots, steps=(0, 1, 10), seed=cfg.eval.seed + 7)
        _print(f"plot of adapted curves: {png}")
    else:
        _print(f"plot of adapted curves: skipped, matplotlib is not installed ({PLOTS_EXTRA})")
    _print(f"next: metafit eval {ckpt} --inner-steps 5\n"
           "      metafit train sinusoid_maml   (the paper's 70000 steps, a few minutes on one CPU core)")
    return 0


def _quickstart_omniglot(args, root) -> int:
    from ..training import load_config, train

    steps = args.steps or 500
    eval_every = max(1, steps // 2)
    cfg = load_config("omniglot_protonet_5w1s", [
        f"data.root={root}", f"out_dir={args.out_dir or 'runs/quickstart'}",
        "task.n_ways=20", f"train.meta_steps={steps}", f"train.eval_every={eval_every}",
        f"train.save_interval={eval_every}", "train.lr_schedule=constant", "train.max_minutes=null",
        "eval.val_episodes=100", "eval.test_episodes=600",
    ])
    _print(f"metafit quickstart: Prototypical Networks on Omniglot ({root})\n"
           f"  meta-train {steps} steps on 20-way 1-shot tasks, validate on held-out characters,\n"
           f"  keep the best checkpoint, then test on 600 fixed 5-way 1-shot episodes of unseen characters."
           + _replacing(cfg.out_dir))
    with _printing_log("metafit.training.trainer"):
        report = train(cfg, overwrite=True)
    _print_train_report(report)
    _print(f"next: metafit eval {report['best_checkpoint']} --ways 20 --shots 1\n"
           f"      metafit train omniglot_protonet_20w1s --data-dir {root}   (the full recipe, about an hour on 2 CPU cores)")
    return 0


def _cmd_rl(args) -> int:
    from ..training import rl_run

    if args.rl_command == "configs":
        for name, path in sorted(rl_run.builtin_rl_configs().items()):
            first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
            _print(f"{name:28s} {first}")
        return 0
    if args.rl_command == "train":
        overrides = list(args.overrides) + ([f"out_dir={args.out_dir}"] if args.out_dir else [])
        cfg = rl_run.load_rl_config(args.config, overrides)
        _print(f"metafit {__version__}: training {cfg.learner.name} on {cfg.family.name} "
               f"{cfg.family.settings or ''} for {cfg.train.iterations} iterations -> {cfg.out_dir}")
        report = rl_run.train_rl(cfg, resume=args.resume, test=not args.no_test, overwrite=args.overwrite)
        _print(f"best validation score {report['val']['score']:.4g} at iteration {report['best_iteration']} "
               f"-> {report['best_checkpoint']}" if report["val"]["score"] is not None else "no validation yet")
        if "test" in report:
            _print_rl_eval(report["test"])
        _print(f"training time {report['train_seconds'] / 60:.1f} min, {report['env_steps']:,} environment steps; "
               f"learning curve: {Path(report['out_dir']) / 'learning_curve.png'}")
        return 0
    res = rl_run.evaluate_rl_checkpoint(args.checkpoint, tasks=args.tasks, seed=args.seed, device=args.device)
    _print_rl_eval(res)
    if args.out:
        from ..training.metrics_log import write_json

        write_json(args.out, res)
        _print(f"wrote {args.out}")
    return 0


def _print_rl_eval(res: dict) -> None:
    _print(f"{res['tasks']} test tasks: score {res['score']:.4g} +/- {res['ci95']:.3g} (95% CI)")
    _print("| adaptation point | mean return | 95% CI |\n|---|---|---|")
    for name, v in res["points"].items():
        _print(f"| {name} | {v['mean']:.4g} | +/- {v['ci95']:.3g} |")


COMMANDS = {"rl": _cmd_rl, "train": _cmd_train, "eval": _cmd_eval, "adapt": _cmd_adapt, "predict": _cmd_predict,
            "calibrate": _cmd_calibrate, "serve": _cmd_serve, "tune": _cmd_tune, "report": _cmd_report,
            "info": _cmd_info, "configs": _cmd_configs, "quickstart": _cmd_quickstart,
            "export": _cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from PIL import Image

    # metafit refuses oversized images with its own one-line error (data.store.open_image); Pillow's
    # warning for images between its two thresholds would print a second line
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (1, one line printed)
        return done.code if isinstance(done.code, int) else 1
    try:
        return COMMANDS[args.command](args)
    except MetafitError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except OSError as err:  # a path that cannot be read or written: name it
        if args.debug:
            raise
        what = f" {short_repr(os.fsdecode(err.filename))}" if err.filename is not None else ""
        print(f"error: cannot use{what}: {err.strerror or err}. Check the path, its permissions and the free disk space.",
              file=sys.stderr, flush=True)
        return 1
    except MemoryError:
        if args.debug:
            raise
        print("error: out of memory. Use smaller tasks, batches, images or a smaller model.", file=sys.stderr, flush=True)
        return 1
    except Exception as err:  # noqa: BLE001 - the last resort keeps the promise of one line
        if args.debug:
            raise
        text = " ".join(str(err).split())
        print(f"error: unexpected {type(err).__name__}: {text[:300]}. This is a bug in metafit: rerun with --debug for "
              "the traceback and report it.", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (resume with --resume)", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())
