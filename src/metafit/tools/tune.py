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
import copy
import csv
import io
import json
import logging
import math
import os
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ..data.cache import atomic_write_bytes
from ..errors import ConfigError, TrainingError, short_repr
from ..validation import ConfigModel, load_yaml
from ..training.config import RunConfig, apply_overrides, builtin_configs, config_source, load_config, make_config
from ..training.metrics_log import write_json
from ..training.plots import _save
from .report import markdown_table
from ..training.run import train

__all__ = ["CategoricalParam", "FloatParam", "IntParam", "best_config", "builtin_spaces", "load_space", "trials_table",
           "tune"]

log = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_SCALAR = (str, int, float, bool, type(None))


def _yaml_text(value: Any) -> str:
    """``value`` as the YAML text of a ``key=value`` override (round-trips through yaml.safe_load)."""
    text = yaml.safe_dump(value, default_flow_style=True)
    return text.removesuffix("\n...\n").strip()


def _rule(ok: bool, rule: str, got: Any, fix: str) -> None:
    if not ok:
        raise PydanticCustomError("tune_rule", "{rule}; got {got}. {fix}", {"rule": rule, "got": got, "fix": fix})


class FloatParam(ConfigModel):
    """A float from [low, high], log-uniform with ``log``, on a grid with ``step``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _rules(self):
        _rule(self.low < self.high, "must have low below high", f"low={self.low!r}, high={self.high!r}",
              "Swap low and high, or use --set for a fixed value.")
        _rule(not (self.log and self.step is not None), "must not set both log and step",
              f"log=true, step={self.step!r}", "Drop one of them.")
        _rule(not self.log or self.low > 0, "must have low > 0 with log: true", f"low={self.low!r}",
              "Raise low above zero or drop log.")
        return self

    def candidates(self) -> list:
        return [self.low, self.high]

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def text(self, value: Any) -> str:
        return _yaml_text(value)


class IntParam(ConfigModel):
    """An integer from [low, high] (both included), log-uniform with ``log``, every ``step``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _rules(self):
        _rule(self.low < self.high, "must have low below high", f"low={self.low!r}, high={self.high!r}",
              "Swap low and high, or use --set for a fixed value.")
        _rule(not (self.log and self.step != 1), "must not set both log and step", f"log=true, step={self.step!r}",
              "Drop one of them.")
        _rule(not self.log or self.low >= 1, "must have low >= 1 with log: true", f"low={self.low!r}",
              "Raise low to 1 or drop log.")
        return self

    def candidates(self) -> list:
        return [self.low, self.high]

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def text(self, value: Any) -> str:
        return _yaml_text(value)


class CategoricalParam(ConfigModel):
    """One of ``choices``. Lists or mappings among the choices (e.g. ``backbone.hidden``) are
    given to Optuna as their YAML text."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _rules(self):
        labels = self.labels()
        _rule(len(set(labels)) == len(labels), "must list each choice once", self.choices, "Remove the duplicates.")
        return self

    @property
    def encoded(self) -> bool:
        return not all(isinstance(c, _SCALAR) for c in self.choices)

    def labels(self) -> list:
        return [_yaml_text(c) for c in self.choices] if self.encoded else list(self.choices)

    def candidates(self) -> list:
        return self.labels()

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, self.labels())

    def text(self, value: Any) -> str:
        return str(value) if self.encoded else _yaml_text(value)


PARAM_TYPES: dict[str, type[ConfigModel]] = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}
Param = FloatParam | IntParam | CategoricalParam


def builtin_spaces() -> dict[str, Path]:
    """Search spaces shipped with metafit (``metafit/configs/spaces/*.yaml``), by name."""
    root = resources.files("metafit") / "configs" / "spaces"
    if not root.is_dir():
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _format_error(err: Mapping[str, Any], key: str, kind: str, where: str) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind_err, value = err.get("type", ""), err.get("input")
    fields = ", ".join(PARAM_TYPES[kind].model_fields)
    if kind_err == "tune_rule":
        return f"Tune: {key} in {where} {err['msg']}"
    if kind_err == "extra_forbidden":
        return (f"Tune: {key}.{loc} in {where} must not be set: a {kind} distribution takes {fields}; got {value!r}. "
                "Remove it or fix its spelling.")
    if kind_err == "missing":
        return (f"Tune: {key}.{loc} in {where} must be given for a {kind} distribution; got nothing. "
                f"Add it (a {kind} distribution takes {fields}).")
    msg = str(err.get("msg", "is invalid"))
    msg = (msg[0].lower() + msg[1:]).replace("input should be", "must be") if msg else msg
    return f"Tune: {key}.{loc} in {where} {msg}; got {value!r}. Fix the value."


def load_space(space: str | os.PathLike | Mapping[str, Any]) -> dict[str, Param]:
    """Read and validate a search space: a YAML file, a built-in space name (see
    :func:`builtin_spaces`) or a mapping. Raises a one-line :class:`ConfigError` naming the
    entry, the rule and the fix."""
    if isinstance(space, Mapping):
        data: Any = dict(space)
        where = "the space"
    else:
        path = Path(space)
        spaces = builtin_spaces()
        if not path.is_file() and str(space) in spaces:
            path = spaces[str(space)]
        if not path.is_file():
            raise ConfigError(
                f"Tune: --space must be a YAML file or a built-in space name; got {str(space)!r}. "
                f"Built-in spaces: {', '.join(sorted(spaces)) or 'none'}."
            )
        where = path.name
        data = load_yaml(path.read_bytes(), repr(str(path)), owner="Tune")
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"Tune: the space ({where}) must be a non-empty mapping of config fields to distributions; got {short_repr(data)}. "
            "Write lines like 'train.meta_lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}'."
        )
    params: dict[str, Param] = {}
    for key, spec in data.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(
                f"Tune: a space key in {where} must be a dotted config field like train.meta_lr; got {key!r}. "
                "Fix the key (`metafit configs --fields` lists every field)."
            )
        if key == "out_dir":
            raise ConfigError(
                f"Tune: the space in {where} must not search out_dir; got {spec!r}. Every trial writes to "
                "<out>/trial-<number>: choose the folder with --out."
            )
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"Tune: {key} in {where} must be a distribution like {{type: float, low: 0.1, high: 1.0}} or a list "
                f"of choices; got {spec!r}. Write it as one of those (use --set for a fixed value)."
            )
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(
                f"Tune: {key}.type in {where} must be one of 'float', 'int', 'categorical'; got {kind!r}. "
                "Add or fix the type."
            )
        try:
            params[key] = PARAM_TYPES[kind].model_validate(dict(spec))
        except ValidationError as err:
            errors = err.errors()  # a misspelt setting first: it usually explains the missing one too
            first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
            raise ConfigError(_format_error(first, key, kind, where)) from None
    return params


def _space_dump(params: Mapping[str, Param]) -> str:
    return json.dumps({k: p.model_dump(mode="json") for k, p in params.items()}, sort_keys=True)


def _sample_overrides(params: Mapping[str, Param], values: Mapping[str, Any]) -> list[str]:
    return [f"{k}={params[k].text(values[k])}" for k in params]


def check_space(config: Any, params: Mapping[str, Param], overrides: Sequence[str] = ()) -> RunConfig:
    """Refuse, before any trial runs, a space entry that is not a config field or whose range
    the config does not accept: every entry is tried at each end of its range (every choice of a
    categorical), the others at their first value. Returns the config without sampled values."""
    overrides = list(overrides)
    base = load_config(config, overrides)
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    if "out_dir" in set_keys:
        raise ConfigError(
            "Tune: out_dir must not be set with --set; got "
            f"{next(i for i in overrides if i.partition('=')[0].strip() == 'out_dir')!r}. Every trial writes to "
            "<out>/trial-<number>: choose the folder with --out."
        )
    both = sorted(set_keys & set(params))
    if both:
        raise ConfigError(
            f"Tune: a field must be either searched or set with --set; got {', '.join(both)} in both. "
            "Drop the --set or remove the field from the space."
        )
    first = {k: p.candidates()[0] for k, p in params.items()}
    for key, p in params.items():
        for value in p.candidates():
            try:
                load_config(config, overrides + _sample_overrides(params, {**first, key: value}))
            except ConfigError as err:
                raise ConfigError(
                    f"Tune: the space entry {key} must be a config field that accepts every value of its range; "
                    f"got {key}={p.text(value)}, which the config refuses: {err} "
                    "(`metafit configs --fields` lists every field.)"
                ) from err
    return base


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


def best_config(config: Any, params: Mapping[str, Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """The user's config mapping (the YAML file, built-in config or mapping passed to :func:`tune`)
    with only the searched fields set to ``values``: the trials' ``--set`` values (a short budget,
    a data folder) and everything the user left to defaults stay as they were."""
    data = copy.deepcopy(config_source(config, builtin_configs(), "config"))
    return apply_overrides(data, _sample_overrides(params, values), "train.meta_lr=0.001")


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
    space_text = _space_dump(params)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
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


def _objective(optuna, config: Any, overrides: list[str], params: Mapping[str, Param], metric: str, out: Path):
    def objective(trial) -> float:
        values = {k: p.suggest(trial, k) for k, p in params.items()}
        trial_dir = out / f"trial-{trial.number}"
        trial.set_user_attr("out_dir", str(trial_dir))
        # calibration only sets a softmax temperature (accuracy is unchanged): not needed to compare trials
        cfg = load_config(config, [*overrides, *_sample_overrides(params, values), "eval.calibrate=false",
                                   f"out_dir={_yaml_text(str(trial_dir))}"])
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
