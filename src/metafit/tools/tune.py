"""Hyperparameter search over config fields with Optuna (the ``tune`` extra).

A *space* maps dotted config fields to distributions (YAML or a mapping)::

    train.meta_lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    algorithm.inner_steps: {type: int, low: 1, high: 5}
    train.optimizer: {type: categorical, choices: [adam, sgd]}   # or simply: [adam, sgd]

Every trial trains ``load_config(config, overrides + sampled values)`` into
``<out>/trial-<number>`` and reports each validation to Optuna, whose median pruner stops
unpromising trials; the objective is the best validation score (accuracy, or minus the MSE for
regression: the study always maximises). The study lives in an RDB storage (SQLite in the output
folder by default, any SQLAlchemy URL to share one study between machines) and is resumed when
the same command runs again: ``n_trials`` counts the finished (complete and pruned) trials of the
whole study, so a resumed or shared study stops once that many exist.

A trial whose training diverges (:class:`~metafit.errors.TrainingError`: a non-finite loss or
gradient) is recorded as *pruned*, not failed: divergence is an outcome of its hyperparameters,
it counts toward ``n_trials`` (a space where everything diverges still ends), and Optuna's TPE
sampler ranks pruned trials below the complete ones, so it learns to avoid that region (failed
trials are invisible to it). The message is kept in the trial's ``diverged`` attribute. Any other
error stops the study (the trial is marked failed) with metafit's one-line message.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..data.cache import atomic_write_bytes
from ..errors import ConfigError, TrainingError
from ..training.config import RunConfig, load_config, make_config
from ..training.metrics_log import write_json
from ..training.plots import _save
from ..training.run import train
from .report import markdown_table
from .space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    best_config,
    builtin_spaces,
    check_space,
    load_space,
    sample_overrides,
    space_dump,
    yaml_text,
)

__all__ = ["CategoricalParam", "FloatParam", "IntParam", "best_config", "builtin_spaces", "load_space", "trials_table",
           "tune"]

log = logging.getLogger(__name__)

def _import_optuna():
    try:
        import optuna
    except ImportError as err:
        raise ConfigError(
            f"Tune: the tune extra must be installed; got {err}. Run pip install -c constraints.txt -e \".[tune]\"."
        ) from err
    return optuna


def _mask(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _storage(optuna, storage: Any, out: Path):
    if storage is not None and not isinstance(storage, (str, os.PathLike)):
        return storage, type(storage).__name__  # an optuna storage object
    url = str(storage) if storage is not None else f"sqlite:///{(out / 'study.db').resolve()}"
    if "://" not in url:
        raise ConfigError(
            f"Tune: --storage must be a database URL; got {url!r}. Write e.g. sqlite:///runs/study.db or "
            "postgresql://user@host/db (the default is sqlite:///<out>/study.db)."
        )
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs), _mask(url)
    except Exception as err:  # SQLAlchemy's errors (bad URL, missing driver, unreachable server)
        raise ConfigError(
            f"Tune: --storage must be a database Optuna can open; got {_mask(url)!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}). Check the URL, the database driver and that the server is reachable."
        ) from err



def _config_stem(config: Any) -> str:
    if isinstance(config, (str, os.PathLike)):
        return Path(config).stem
    return "config"


def _metric_value(metric: str, score: float) -> float | None:
    """The metric (accuracy or MSE) of an objective score; None where it is not finite (JSON)."""
    if score is None or not math.isfinite(score):
        return None
    return -score if metric == "mse" else score


def _trial_row(t, params: Mapping[str, Param], metric: str) -> dict[str, Any]:
    state = t.state.name.lower()
    attrs = t.user_attrs
    row: dict[str, Any] = {
        "number": t.number, "state": state, "value": t.value if state == "complete" else None,
        "metric_value": None, "ci95": None, "params": {k: t.params.get(k) for k in params},
        "best_step": attrs.get("best_step"), "last_step": attrs.get("steps"),
        "minutes": t.duration.total_seconds() / 60.0 if t.duration is not None else None,
        "out_dir": attrs.get("out_dir"), "note": "",
    }
    if state == "complete":
        row["metric_value"] = attrs.get("val_mean", _metric_value(metric, t.value))
        row["ci95"] = attrs.get("ci95")
    elif t.intermediate_values:
        step, score = max(t.intermediate_values.items())
        best_step = max(t.intermediate_values.items(), key=lambda kv: (kv[1], -kv[0]))[0]
        row.update(metric_value=_metric_value(metric, score), last_step=step, best_step=best_step)
    if state == "pruned":
        row["note"] = attrs.get("diverged") or (f"pruned at step {row['last_step']}" if row["last_step"] else "pruned")
        if attrs.get("diverged"):
            row["state"] = "pruned (diverged)"
    elif state == "fail":
        row["note"] = attrs.get("error", "failed")
    return row


def _fmt_metric(metric: str, value: float | None, ci: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if metric == "accuracy":
        text = f"{100 * value:.2f}"
        return text + (f" ± {100 * ci:.2f}" if ci is not None and math.isfinite(ci) else "")
    text = f"{value:.4g}"
    return text + (f" ± {ci:.3g}" if ci is not None and math.isfinite(ci) else "")


def _fmt_param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def trials_table(summary: Mapping[str, Any], limit: int | None = None, best_first: bool = False) -> str:
    """The trials of a :func:`tune` summary as a Markdown table (the best ``limit`` first with
    ``best_first``)."""
    metric, rows = summary["metric"], list(summary["trials"])
    if best_first:
        rows = sorted(rows, key=lambda r: (r["state"] != "complete", -(r["value"] if r["value"] is not None else 0),
                                           r["number"]))
    if limit is not None:
        rows = rows[:limit]
    best = (summary.get("best") or {}).get("number")
    names = list(summary["space"])
    head = ["trial", "state", "val accuracy (%)" if metric == "accuracy" else "val MSE", *names, "best step",
            "minutes"]
    body = []
    for r in rows:
        value = _fmt_metric(metric, r["metric_value"], r["ci95"])
        if r["state"] != "complete" and value != "-":
            value = f"({value} at step {r['last_step']})"
        body.append([f"{r['number']}{' *' if r['number'] == best else ''}", r["state"], value,
                     *[_fmt_param(r["params"].get(k)) for k in names],
                     "-" if r["best_step"] is None else r["best_step"],
                     "-" if r["minutes"] is None else f"{r['minutes']:.1f}"])
    return markdown_table(head, body)


def _plot_history(rows: list[dict], metric: str, title: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    scale, label = (100.0, "validation accuracy (%)") if metric == "accuracy" else (1.0, "validation MSE")
    better = max if metric == "accuracy" else min
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    done = [r for r in rows if r["state"] == "complete" and r["metric_value"] is not None]
    pruned = [r for r in rows if r["state"].startswith("pruned") and r["metric_value"] is not None
              and math.isfinite(r["metric_value"])]
    if done:
        ax.scatter([r["number"] for r in done], [scale * r["metric_value"] for r in done], color="tab:blue",
                   zorder=3, label="complete")
        xs, ys, best = [], [], None
        for r in done:
            best = r["metric_value"] if best is None else better(best, r["metric_value"])
            xs.append(r["number"])
            ys.append(scale * best)
        xs.append(max(r["number"] for r in rows))
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", color="tab:red", lw=1.5, label="best so far")
    if pruned:
        ax.scatter([r["number"] for r in pruned], [scale * r["metric_value"] for r in pruned], marker="x",
                   color="grey", zorder=3, label="pruned (last validation)")
    n_noval = sum(r["state"].startswith("pruned") and r["metric_value"] is None for r in rows)
    if n_noval:
        ax.text(0.01, 0.01, f"{n_noval} pruned without a validation result (not shown)", transform=ax.transAxes,
                fontsize=8, color="grey")
    if not done and not pruned:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    values = [scale * r["metric_value"] for r in done + pruned]
    if metric == "mse" and values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _write_outputs(study, params: Mapping[str, Param], metric: str, out: Path, config: Any,
                   overrides: Sequence[str], stem: str, storage_name: str) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    rows = [_trial_row(t, params, metric) for t in trials]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    best_t = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    files = {"trials_md": str(out / "trials.md"), "trials_csv": str(out / "trials.csv"),
             "history": str(out / "history.png"), "summary": str(out / "tune.json")}
    best = None
    if best_t is not None:
        best_run = str(out.parent / f"{stem}-best")
        data = best_config(config, params, best_t.params)
        try:
            make_config(data)
            refused = ""
        except ConfigError as err:  # valid only together with the trials' --set values
            refused = f"# Note: without the trials' --set values this config is refused: {err}\n"
        row = next(r for r in rows if r["number"] == best_t.number)
        # where the data is (a --set data.root, as --data-dir gives) is no budget: the command keeps it
        data_root = [o for o in overrides if o.partition("=")[0].strip() == "data.root"]
        command = " ".join([f"metafit train {shlex.quote(str(out / 'best.yaml'))}",
                            f"--out-dir {shlex.quote(best_run)}", *(f"--set {shlex.quote(o)}" for o in data_root)])
        best = {"number": best_t.number, "value": best_t.value, "metric_value": row["metric_value"],
                "ci95": row["ci95"], "best_step": row["best_step"], "params": dict(best_t.params),
                "trial_dir": row["out_dir"], "config": str(out / "best.yaml"), "out_dir": best_run,
                "trial_overrides": list(overrides), "train_command": command}
        source = str(config) if isinstance(config, (str, os.PathLike)) else "the config mapping passed to tune"
        header = (f"# Best trial {best_t.number} of study {study.study_name!r} ({storage_name}): validation "
                  f"{'accuracy' if metric == 'accuracy' else 'MSE'} {_fmt_metric(metric, row['metric_value'], row['ci95'])}"
                  f"{'%' if metric == 'accuracy' else ''} at step {row['best_step']}.\n"
                  f"# This is {source} with only the searched fields changed:\n"
                  + "".join(f"#   {k} = {_fmt_param(v)}\n" for k, v in best_t.params.items())
                  + ("# The trials also ran with --set " + " --set ".join(" ".join(o.splitlines()) for o in overrides)
                     + ": those values are not applied here (this is the config's own budget).\n" if overrides else "")
                  + refused
                  + f"# Train it: {' '.join(command.splitlines())}\n")
        text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        atomic_write_bytes(out / "best.yaml", lambda f: f.write(text.encode()))
        files["best"] = str(out / "best.yaml")
    summary = {
        "study_name": study.study_name, "storage": storage_name, "metric": metric, "direction": "maximize",
        "objective": "best validation accuracy" if metric == "accuracy" else "minus the best validation MSE",
        "n_trials": counts, "best": best, "space": {k: p.model_dump(mode="json") for k, p in params.items()},
        "trials": rows, "files": files,
    }
    n_done = counts.get("complete", 0)
    table = trials_table(summary)
    md = (f"# Study {study.study_name}\n\n{n_done} complete, {counts.get('pruned', 0)} pruned, "
          f"{counts.get('fail', 0)} failed, {counts.get('running', 0)} running. Objective: {summary['objective']} "
          f"(maximised). " + (f"Best: trial {best['number']} (*), config {out / 'best.yaml'}.\n\n" if best else "\n\n")
          + table + "\n\n![history](history.png)\n")
    atomic_write_bytes(out / "trials.md", lambda f: f.write(md.encode()))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "state", "value", f"val_{metric}", "ci95", *params, "best_step", "last_step", "minutes",
                "out_dir", "note"])
    for r in rows:
        w.writerow([r["number"], r["state"], r["value"], r["metric_value"], r["ci95"],
                    *[r["params"].get(k) for k in params], r["best_step"], r["last_step"],
                    None if r["minutes"] is None else round(r["minutes"], 3), r["out_dir"], r["note"]])
    atomic_write_bytes(out / "trials.csv", lambda f: f.write(buf.getvalue().encode()))
    from ..training.plots import PLOTS_EXTRA, have_matplotlib

    if have_matplotlib():
        _plot_history(rows, metric, f"{study.study_name}: {n_done} complete, {counts.get('pruned', 0)} pruned",
                      out / "history.png")
    else:
        log.info("history.png not drawn: matplotlib is not installed (%s)", PLOTS_EXTRA)
    write_json(out / "tune.json", summary)
    return summary


def tune(config: str | os.PathLike | Mapping | RunConfig, space: str | os.PathLike | Mapping,
         n_trials: int, storage: Any = None, study_name: str | None = None,
         out_dir: str | os.PathLike | None = None, overrides: Sequence[str] = (), seed: int = 0, *,
         pruner: Any = None) -> dict[str, Any]:
    """Search ``space`` (see :func:`load_space`) around ``config`` (a YAML path, a built-in name or a
    mapping, plus ``key=value`` ``overrides``) until the study holds ``n_trials`` finished trials.

    ``storage``: an SQLAlchemy URL (default ``sqlite:///<out_dir>/study.db``) or an Optuna storage;
    ``study_name`` defaults to the config's name; ``out_dir`` to ``runs/tune-<config name>``;
    ``seed`` seeds the TPE sampler (a resumed study continues with ``seed + trials so far``);
    ``pruner`` replaces the default ``MedianPruner()``. Writes ``best.yaml`` (the user's config with
    only the searched fields set to the best trial's values: ``overrides`` are not applied),
    ``trials.md``, ``trials.csv``, ``history.png`` and ``tune.json`` into ``out_dir`` (refreshed after
    every trial) and returns the summary of ``tune.json``."""
    optuna = _import_optuna()
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"Tune: --trials must be a positive integer; got {n_trials!r}. Pass e.g. --trials 20.")
    if isinstance(config, RunConfig):
        config = config.to_dict()
    overrides = list(overrides)
    params = load_space(space)
    base = check_space(config, params, overrides)
    metric = "mse" if base.data.task_kind == "regression" else "accuracy"
    stem = _config_stem(config)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"tune-{stem}"
    out.mkdir(parents=True, exist_ok=True)
    store, storage_name = _storage(optuna, storage, out)
    name = study_name or stem
    space_text = space_dump(params)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = _open_study(optuna, store, storage_name, name, seed, pruner, space_text, metric, config)
        finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=finished_states))
        n_all = len(study.get_trials(deepcopy=False))
        if n_all:  # a resumed study: do not replay the sampler's first draws
            study.sampler = optuna.samplers.TPESampler(seed=seed + n_all)
        remaining = n_trials - done

        def write() -> dict[str, Any]:
            return _write_outputs(study, params, metric, out, config, overrides, stem, storage_name)

        if remaining <= 0:
            log.info(f"study {name!r} already has {done} finished trials (asked for {n_trials}); nothing to run")
            return write()
        log.info(f"study {name!r} in {storage_name}: {done} finished trials, running up to {remaining} more "
                 f"-> {out}")
        objective = _objective(optuna, config, overrides, params, metric, out)

        def after_trial(study, trial) -> None:
            row = _trial_row(trial, params, metric)
            what = (f"val {'accuracy' if metric == 'accuracy' else 'MSE'} "
                    f"{_fmt_metric(metric, row['metric_value'], row['ci95'])}{'%' if metric == 'accuracy' else ''} "
                    f"at step {row['best_step']}"
                    if row["state"] == "complete" else row["note"])
            log.info(f"trial {trial.number} {row['state']}: {what}; "
                     + ", ".join(f"{k}={_fmt_param(v)}" for k, v in trial.params.items()))
            write()

        try:
            study.optimize(objective, n_trials=remaining,
                           callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=finished_states), after_trial])
        except BaseException:
            with contextlib.suppress(Exception):  # keep the tables of the trials that finished
                write()
            raise
        return write()
    finally:
        optuna.logging.set_verbosity(verbosity)


def _open_study(optuna, store: Any, storage_name: str, name: str, seed: int, pruner: Any, space_text: str,
                metric: str, config: Any):
    """The study ``name`` (created, or the one the storage holds if it was started with this space)."""
    study = optuna.create_study(
        storage=store, study_name=name, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=pruner if pruner is not None else optuna.pruners.MedianPruner())
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(
            f"Tune: study {name!r} must maximise (metafit's objective); got a study that minimises in "
            f"{storage_name}. Choose another --study-name."
        )
    old_space = study.user_attrs.get("space")
    if old_space is not None and old_space != space_text:
        raise ConfigError(
            f"Tune: the space must be the one study {name!r} was started with; got a different space for "
            f"the study in {storage_name}. Use the original space, or a new --study-name (or --out)."
        )
    if old_space is None:
        study.set_user_attr("space", space_text)
        study.set_user_attr("metric", metric)
        study.set_user_attr("config", str(config) if isinstance(config, (str, os.PathLike)) else "mapping")
    return study


def _objective(optuna, config: Any, overrides: list[str], params: Mapping[str, Param], metric: str, out: Path):
    def objective(trial) -> float:
        values = {k: p.suggest(trial, k) for k, p in params.items()}
        trial_dir = out / f"trial-{trial.number}"
        trial.set_user_attr("out_dir", str(trial_dir))
        # calibration only sets a softmax temperature (accuracy is unchanged): not needed to compare trials
        cfg = load_config(config, [*overrides, *sample_overrides(params, values), "eval.calibrate=false",
                                   f"out_dir={yaml_text(str(trial_dir))}"])
        reported: set[int] = set()

        def on_validate(step: int, result) -> None:
            if step in reported:  # a repeated validation at one step (e.g. at a time-budget stop)
                return
            reported.add(step)
            trial.report(float(result.score), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

        try:
            report = train(cfg, test=False, on_validate=on_validate)
        except TrainingError as err:
            trial.set_user_attr("diverged", str(err))
            raise optuna.TrialPruned(str(err)) from err
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
            raise
        val = report.get("val") or {}
        mean = val.get("mean")
        if mean is None or not math.isfinite(mean):
            msg = f"the best validation {metric} is not finite ({mean}); treated as diverged"
            trial.set_user_attr("diverged", msg)
            raise optuna.TrialPruned(msg)
        trial.set_user_attr("val_mean", mean)
        ci95 = val.get("ci95")
        trial.set_user_attr("ci95", ci95 if isinstance(ci95, (int, float)) and math.isfinite(ci95) else None)
        trial.set_user_attr("best_step", report["best_step"])
        trial.set_user_attr("steps", report["steps"])
        trial.set_user_attr("train_seconds", report["train_seconds"])
        return -mean if metric == "mse" else mean

    return objective
