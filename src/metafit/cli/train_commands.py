"""Commands that train and measure: train, eval, tune, report, quickstart, rl."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, MetafitError
from .common import _algorithm_overrides, _print, _printing_log


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


def _print_train_report(report: dict) -> None:
    val, test = report.get("val"), report.get("test")
    mse = bool(val) and val.get("metric") == "mse"

    def result(r: dict) -> str:
        return f"{r['mean']:.4f} +/- {r['ci95']:.4f}" if mse else f"{100 * r['mean']:.2f}% +/- {100 * r['ci95']:.2f}%"

    name = "MSE" if mse else "accuracy"
    if val:
        _print(f"best validation {name} {result(val)} at step {report['best_step']} -> {report['best_checkpoint']}")
    if test:
        setting = (f"{test['k_shots']}-shot, {test['episodes']} fixed tasks" if mse else
                   f"{test['n_ways']}-way {test['k_shots']}-shot, {test['episodes']} fixed episodes")
        _print(f"test {name} ({setting}): {result(test)} (95% CI)")
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
                       f"{report['temperature']:.3g}" if report.get("ece_calibrated") is not None else
                       f" ({report['calibration']})" if report.get("calibration") else
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


def _cmd_tune(args) -> int:
    from ..tools import tune
    from ..tools.tune import trials_table

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.root={json.dumps(args.data_dir)}")  # a JSON string is a quoted YAML scalar
    _print(f"metafit {__version__}: tuning {args.config} over {args.space} until the study holds {args.trials} "
           "finished trials")
    try:
        with _printing_log("metafit.tools.tune"):
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
    from ..tools import report_runs

    result = report_runs(args.runs, args.out, metric=args.metric, x=args.x)
    _print(result["table"])
    for note in result["notes"]:
        _print(note)
    _print("curve panels (runs share one only where their numbers mean the same):")
    for panel in result["panels"]:
        _print(f"  {panel['title']}: {', '.join(panel['runs'])}")
    _print(f"report: {result['report']}\ncurves: {result['curves']}")
    return 0


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
        with _printing_log("metafit.training.rl_run"):  # what the loop says: a budget stop, an --overwrite
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
