"""Learning curves of a run: read a run folder's logs and draw them.

A run folder is what the trainer writes: ``config.json``, ``metrics.jsonl`` (one JSON object per
line; rows with ``"split": "train"``, ``"val"``, ``"stop"``; other rows, e.g. monitoring events,
are ignored) and, once training finished, ``report.json``. A crash may leave a truncated last
line and a resumed run appends rows that repeat steps after its checkpoint: damaged lines are
skipped (and counted) and a repeated step replaces the rows logged after it before the resume.

Learning curves are drawn against training time (``elapsed_s`` of the rows) or images seen, never
against steps: a step is one episode for ProtoNet, a meta-batch of tasks for MAML and a mini-batch
of images for transfer. Curves share a panel only where they measure the same thing: training
loss and accuracy per kind of training task (n-way k-shot episodes, supervised over N classes,
k-shot regression), validation results per validation setting (the same fixed episodes).
The trainer draws ``learning_curve.png`` with :func:`plot_curves`; ``metafit report``
(:mod:`metafit.tools.report`) tabulates several runs.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, DataError
from .plots import _save

__all__ = ["METRICS", "X_AXES", "Panel", "RunLog", "as_number", "curve_panels", "plot_curves", "read_run",
           "trains_on_batches"]

METRICS = ("accuracy", "mse")
#: what the x-axis of the learning curves may be
X_AXES = ("time", "images")


@dataclass
class RunLog:
    """What a run folder holds, read tolerantly."""

    path: Path
    config: dict | None
    report: dict | None
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    last_step: int = 0
    last_elapsed_s: float | None = None
    skipped_lines: int = 0
    name: str = ""

    @property
    def finished(self) -> bool:
        return self.report is not None

    @property
    def metric(self) -> str:
        """``accuracy`` (classification) or ``mse`` (regression)."""
        for row in self.val + self.train:
            for m in METRICS:
                if m in row:
                    return m
        val = (self.report or {}).get("val") or {}
        if val.get("metric") in METRICS:
            return val["metric"]
        data = (self.config or {}).get("data") or {}
        return "mse" if data.get("name") == "sinusoid" else "accuracy"


def as_number(value: Any) -> float:
    """A logged number (non-finite values are logged as null) as a float, NaN when absent."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DataError(
            f"Report: {str(path)!r} must be valid JSON; got a parse error ({err}). The run folder is "
            "damaged: restore the file or leave this run out of the report."
        ) from err
    return data if isinstance(data, dict) else None


def _append(rows: list[dict], row: dict) -> None:
    """Append ``row``; rows at or after its step are dropped first (they were logged before a
    crash and are superseded by the resumed run's rows)."""
    step = row["step"]
    while rows and rows[-1]["step"] >= step:
        rows.pop()
    rows.append(row)


def read_run(run_dir: str | os.PathLike) -> RunLog:
    """Read the run folder ``run_dir`` written by the trainer (see the module docstring) and return
    its :class:`RunLog`; a path to its ``metrics.jsonl``, ``report.json`` or ``config.json`` stands
    for the folder. A missing folder is a DataError."""
    path = Path(run_dir)
    if path.is_file() and path.name in ("metrics.jsonl", "report.json", "config.json"):
        path = path.parent
    if not path.exists():
        raise DataError(
            f"Report: run folder {str(path)!r} must exist; got a missing path. Pass the out_dir of a "
            "`metafit train` run."
        )
    metrics = path / "metrics.jsonl"
    if not path.is_dir() or not metrics.is_file():
        runs = sorted(p.name for p in path.iterdir() if (p / "metrics.jsonl").is_file()) if path.is_dir() else []
        hint = (f"It holds {len(runs)} run folder(s) ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}): "
                f"pass them instead, e.g. {path}/*." if runs else
                "Pass the out_dir of a `metafit train` run (it holds metrics.jsonl, config.json, report.json).")
        raise DataError(
            f"Report: {str(path)!r} must be a run folder with metrics.jsonl; got a "
            f"{'folder' if path.is_dir() else 'file'} without it. {hint}"
        )
    run = RunLog(path=path, config=_read_json(path / "config.json"), report=_read_json(path / "report.json"))
    with open(metrics, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    stop_step = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            run.skipped_lines += 1  # a line cut short by a crash (possibly followed by a resume)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            continue  # events and rows of other kinds
        split = row.get("split")
        if split == "train":
            _append(run.train, row)
        elif split == "val":
            _append(run.val, row)
        elif split == "stop":
            stop_step = row["step"]
        else:
            continue
        elapsed = as_number(row.get("elapsed_s"))
        if math.isfinite(elapsed):
            run.last_elapsed_s = elapsed
    run.last_step = max([r["step"] for r in run.train + run.val] + [stop_step], default=0)
    return run



def trains_on_batches(alg: dict) -> bool:
    """Whether the algorithm trains on supervised mini-batches (transfer) rather than episodes."""
    try:
        from ..algorithms import get_algorithm

        return get_algorithm(alg.get("name")).training_data == "batches"
    except (ConfigError, TypeError):
        return False



def _ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _maybe_log(ax, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")


#: data fields that do not change which validation episodes are drawn (where the files are, how
#: images are decoded and fed to the model); ``root`` counts for folder data (it is the dataset)
_NOT_EPISODE_FIELDS = {"root", "cache_dir", "workers", "storage", "memory_budget_gb", "download", "normalize", "mean",
                       "std", "image_size", "fit", "channels", "invert", "rotations"}


def _training_measure(run: RunLog) -> tuple[tuple, str]:
    """What a run's training loss and metric measure: a key (equal keys are comparable) and a label."""
    config, metric = run.config, run.metric
    if not config:
        return ("unknown", str(run.path)), f"{run.name} (no config.json: its training tasks are unknown)"
    alg, task = config.get("algorithm") or {}, config.get("task") or {}
    if metric == "mse":
        k = task.get("k_shots", "?")
        return ("regression", k), f"{k}-shot regression tasks"
    if trains_on_batches(alg):
        n = alg.get("n_base_classes") or "?"
        return ("supervised", n), f"supervised over {n} classes (mini-batches)"
    n, k = task.get("n_ways", "?"), task.get("k_shots", "?")
    return ("episodic", n, k), f"{n}-way {k}-shot training episodes"


def _eval_setting(run: RunLog) -> tuple[tuple, str]:
    """The validation setting of a run: a key (equal keys validate on the same fixed episodes) and
    a label."""
    config, metric = run.config, run.metric
    if not config:
        return ("unknown", str(run.path)), f"{run.name} (no config.json: its validation episodes are unknown)"
    data, ev = config.get("data") or {}, config.get("eval") or {}
    source = {k: v for k, v in data.items() if k not in _NOT_EPISODE_FIELDS or (k == "root" and data.get("name") == "folder")}
    rotations = ev.get("rotations") if ev.get("rotations") is not None else data.get("rotations")
    key = (metric, json.dumps(source, sort_keys=True, default=str), ev.get("n_ways"), ev.get("k_shots"),
           ev.get("n_queries"), ev.get("val_episodes"), ev.get("seed"), ev.get("within_group"), bool(rotations))
    name = data.get("name", "?")
    if metric == "mse":
        label = f"{name} {ev.get('k_shots', '?')}-shot, {ev.get('val_episodes', '?')} fixed tasks"
    else:
        label = (f"{name} {ev.get('n_ways', '?')}-way {ev.get('k_shots', '?')}-shot, {ev.get('val_episodes', '?')} "
                 f"fixed episodes" + (", rotated classes" if rotations else ""))
    return key, label


def _images_per_step(run: RunLog) -> float:
    """Training examples one step draws (all ranks together), NaN where the config is missing."""
    config = run.config or {}
    alg, task, tr = config.get("algorithm") or {}, config.get("task") or {}, config.get("train") or {}
    if not config:
        return math.nan
    if trains_on_batches(alg):
        return as_number(alg.get("batch_size"))
    per_task = as_number(task.get("k_shots")) + as_number(task.get("n_queries"))
    if run.metric != "mse":
        per_task *= as_number(task.get("n_ways"))
    return per_task * as_number(tr.get("meta_batch_size", 1))


@dataclass
class Panel:
    """One panel of the learning curves: ``key`` (loss, accuracy or mse) of the ``split`` rows of
    the runs ``members`` (indices), which measure the same thing."""

    title: str
    split: str
    key: str
    members: list[int]
    ylabel: str
    xlabel: str


def _grouped(runs: Sequence[RunLog], of) -> list[tuple[str, list[int]]]:
    """Runs grouped by ``of(run) -> (key, label)`` in order of first appearance; labels made unique."""
    groups: dict[tuple, tuple[str, list[int]]] = {}
    for i, run in enumerate(runs):
        key, label = of(run)
        groups.setdefault(key, (label, []))[1].append(i)
    out, seen = [], {}
    for label, members in groups.values():
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label} (other settings {seen[label]})", members))
    return out


def curve_panels(runs: Sequence[RunLog], metric: str = "accuracy", x: str = "time") -> list[Panel]:
    """The panels of :func:`plot_curves`: per kind of training task, training loss and metric
    (``metric="loss"``: the loss only); per validation setting, the validation metric (or loss).
    A panel holds only runs whose numbers mean the same thing."""
    panels = []
    for label, members in _grouped(runs, _training_measure):
        m = runs[members[0]].metric
        xlabel = _xlabel(x, m)
        panels.append(Panel(f"training loss (smoothed): {label}", "train", "loss", members, "loss", xlabel))
        if metric != "loss":
            what = "accuracy (%)" if m == "accuracy" else "MSE"
            panels.append(Panel(f"training {what}: {label}", "train", m, members, what, xlabel))
    for label, members in _grouped(runs, _eval_setting):
        m = runs[members[0]].metric
        xlabel = _xlabel(x, m)
        if metric == "loss":
            panels.append(Panel(f"validation loss: {label}", "val", "loss", members, "loss", xlabel))
        else:
            what = "accuracy (%)" if m == "accuracy" else "MSE"
            panels.append(Panel(f"validation {what} (95% CI): {label}", "val", m, members, what, xlabel))
    return panels


def _xlabel(x: str, metric: str) -> str:
    if x == "images":
        return "training images seen" if metric == "accuracy" else "training examples (points) seen"
    return "training time"


def _xs(run: RunLog, rows: list[dict], x: str, scale: float) -> list[float]:
    if x == "images":
        per_step = _images_per_step(run)
        return [r["step"] * per_step for r in rows]
    return [as_number(r.get("elapsed_s")) / scale for r in rows]


def plot_curves(runs: Sequence[RunLog], path: str | os.PathLike, metric: str = "accuracy",
                x: str = "time") -> Path:
    """Learning curves, one line per run, in the panels of :func:`curve_panels`: training loss
    (smoothed) and metric per kind of training task, the validation metric with its 95% CI band per
    validation setting (``metric="loss"``: training and validation losses). The x-axis is training
    time (``x="time"``: the rows' ``elapsed_s``, validation included) or images seen
    (``x="images"``: steps x the images a step draws). ``runs`` are the runs' logs (see
    :func:`read_run`); the figure is written to ``path``, which is returned. Needs matplotlib."""
    from .plots import require_matplotlib

    require_matplotlib("Report", "drawing learning curves")
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise ConfigError(f"Report: x must be one of {', '.join(X_AXES)}; got {x!r}. Choose one of them.")
    panels = curve_panels(runs, metric, x)
    longest = max((as_number(r.get("elapsed_s")) for run in runs for r in run.train + run.val
                   if math.isfinite(as_number(r.get("elapsed_s")))), default=0.0)
    scale, unit = (60.0, "min") if longest >= 120 else (1.0, "s")
    cols = min(3 if metric != "loss" else 2, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.0 * cols, 3.8 * n_rows), layout="constrained")
    axes = [ax for row in fig.subplots(n_rows, cols, squeeze=False) for ax in row]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, panel in zip(axes, panels):
        plotted: list[float] = []
        pct = 100.0 if panel.key == "accuracy" else 1.0
        for i in panel.members:
            run, c = runs[i], colors[i]
            rows = run.train if panel.split == "train" else run.val
            points = [(xv, pct * as_number(r.get(panel.key)), pct * as_number(r.get("ci95")))
                      for xv, r in zip(_xs(run, rows, x, scale), rows)
                      if math.isfinite(xv) and math.isfinite(as_number(r.get(panel.key)))]
            xs, ys, cis = ([list(v) for v in zip(*points)] if points else ([], [], []))
            if panel.split == "train":
                smooth = _ema(ys, 0.6) if len(ys) >= 10 else ys
                if smooth is not ys:
                    ax.plot(xs, ys, color=c, alpha=0.25, lw=0.8)
                ax.plot(xs, smooth, color=c, lw=1.5, label=run.name)
            else:
                ax.plot(xs, ys, color=c, lw=1.5, marker="o", ms=3, label=run.name)
                if panel.key != "loss":
                    band = [(a, b, e) for a, b, e in zip(xs, ys, cis) if math.isfinite(e)]
                    if band:
                        bx, by, bc = zip(*band)
                        ax.fill_between(bx, [v - e for v, e in zip(by, bc)], [v + e for v, e in zip(by, bc)],
                                        color=c, alpha=0.15, lw=0)
            plotted += ys
        ax.set_title(textwrap.fill(panel.title, 60, break_on_hyphens=False), fontsize=9)
        ax.set_xlabel(panel.xlabel + (f" ({unit}, validation included)" if x == "time" else ""))
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.key in ("mse", "loss"):
            _maybe_log(ax, plotted)
        if plotted:
            ax.legend(fontsize=8, loc="best")
        else:
            none = "no rows with elapsed_s logged" if x == "time" else "no rows logged"
            ax.text(0.5, 0.5, none, ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _save(fig, Path(path))


