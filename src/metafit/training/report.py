"""Reports of finished (or interrupted) runs: a Markdown table and PNG learning curves.

A run folder is what the trainer writes: ``config.json``, ``metrics.jsonl`` (one JSON object per
line; rows with ``"split": "train"``, ``"val"``, ``"stop"``; other rows, e.g. monitoring events,
are ignored) and, once training finished, ``report.json``. A crash may leave a truncated last
line and a resumed run appends rows that repeat steps after its checkpoint: damaged lines are
skipped (and counted) and a repeated step replaces the rows logged after it before the resume.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data.cache import atomic_write_bytes
from ..errors import ConfigError, DataError
from .plots import _save

__all__ = ["RunLog", "markdown_table", "read_run", "report_runs"]

METRICS = ("accuracy", "mse")


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


def _num(value: Any) -> float:
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
    """Read a run folder written by the trainer (see the module docstring)."""
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
        elapsed = _num(row.get("elapsed_s"))
        if math.isfinite(elapsed):
            run.last_elapsed_s = elapsed
    run.last_step = max([r["step"] for r in run.train + run.val] + [stop_step], default=0)
    return run


def _run_names(paths: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = ["/".join(p.resolve().parts[-2:]) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def _best_val(run: RunLog) -> tuple[dict | None, int | None]:
    """The best validation result (``mean``, ``ci95``, ``metric``) and its step: report.json's
    when training finished, else the best logged validation row (earliest on ties, as the
    trainer keeps the first best)."""
    report = run.report or {}
    if report.get("val"):
        return report["val"], report.get("best_step")
    metric = run.metric
    best, best_step = None, None
    for row in run.val:
        value = _num(row.get(metric))
        if not math.isfinite(value):
            continue
        score = -value if metric == "mse" else value
        if best is None or score > best[0]:
            best, best_step = (score, {"mean": value, "ci95": _num(row.get("ci95")), "metric": metric}), row["step"]
    return (best[1] if best else None), best_step


def _fmt_result(res: dict | None) -> str:
    if not res or not math.isfinite(_num(res.get("mean"))):
        return "-"
    mean, ci = _num(res.get("mean")), _num(res.get("ci95"))
    if res.get("metric") == "mse":
        return f"MSE {mean:.4f}" + (f" ± {ci:.4f}" if math.isfinite(ci) else "")
    return f"{100 * mean:.2f}%" + (f" ± {100 * ci:.2f}%" if math.isfinite(ci) else "")


def _task(config: dict | None) -> str:
    if not config:
        return "-"
    data, ev, tr = config.get("data") or {}, config.get("eval") or {}, config.get("task") or {}
    if data.get("name") == "sinusoid":
        return f"sinusoid {ev.get('k_shots', '?')}-shot"
    text = f"{data.get('name', '?')} {ev.get('n_ways', '?')}-way {ev.get('k_shots', '?')}-shot"
    episodic = True
    try:
        from ..algorithms import get_algorithm

        episodic = get_algorithm((config.get("algorithm") or {}).get("name")).training_data != "batches"
    except (ConfigError, TypeError):
        pass
    if episodic and (tr.get("n_ways"), tr.get("k_shots")) != (ev.get("n_ways"), ev.get("k_shots")):
        text += f" (trained {tr.get('n_ways', '?')}-way {tr.get('k_shots', '?')}-shot)"
    return text


def _summary(run: RunLog) -> dict[str, Any]:
    config, report = run.config or {}, run.report or {}
    best, best_step = _best_val(run)
    seconds = report.get("train_seconds", run.last_elapsed_s)
    test = report.get("test") or None
    return {
        "run": run.name,
        "path": str(run.path),
        "finished": run.finished,
        "algorithm": _algorithm_label(config.get("algorithm") or {}),
        "backbone": (config.get("backbone") or {}).get("name"),
        "task": _task(run.config),
        "metric": run.metric,
        "steps": report.get("steps", run.last_step),
        "train_minutes": seconds / 60.0 if isinstance(seconds, (int, float)) else None,
        "best_val": best,
        "best_step": best_step,
        "test": test,
        "skipped_lines": run.skipped_lines,
    }


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table whose columns are padded, so it also reads well on a terminal."""
    cells = [[_cell(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _algorithm_label(alg: dict) -> str | None:
    """The algorithm's name, with the variant that changes what it is (first-order MAML, a
    transfer head)."""
    name = alg.get("name")
    if name and alg.get("first_order"):
        return f"{name}, first order"
    if name == "transfer" and alg.get("head"):
        return f"{name}, {alg['head']} head"
    return name


RUN_COLUMNS = ["run", "algorithm", "task", "steps", "train min", "best val", "best step", "test"]


def runs_table(summaries: Sequence[dict]) -> str:
    rows = []
    for s in summaries:
        alg = s["algorithm"] or "-"
        if s["backbone"]:
            alg += f" ({s['backbone']})"
        test = s["test"]
        rows.append([
            s["run"] + ("" if s["finished"] else " (unfinished)"),
            alg,
            s["task"],
            s["steps"],
            "-" if s["train_minutes"] is None else f"{s['train_minutes']:.{2 if s['train_minutes'] < 1 else 1}f}",
            _fmt_result(s["best_val"]),
            "-" if s["best_step"] is None else s["best_step"],
            _fmt_result(test) + (f" ({test['episodes']} {'tasks' if test.get('metric') == 'mse' else 'episodes'})"
                                 if test and test.get("episodes") else ""),
        ])
    return markdown_table(RUN_COLUMNS, rows)


def _ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def _series(rows: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float], list[float]]:
    xs, ys, cis = [], [], []
    for r in rows:
        y = _num(r.get(key))
        if math.isfinite(y):
            xs.append(r["step"])
            ys.append(scale * y)
            cis.append(scale * _num(r.get("ci95")))
    return xs, ys, cis


def _maybe_log(ax, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")


def plot_curves(runs: Sequence[RunLog], path: str | os.PathLike, metric: str = "accuracy") -> Path:
    """One figure: per task metric (accuracy, MSE), a row of panels: training loss (smoothed),
    training metric, validation metric with its 95% CI band; with ``metric="loss"`` the panels are
    training loss and validation loss. One line per run."""
    from matplotlib.figure import Figure

    groups: dict[str, list[tuple[int, RunLog]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(run.metric, []).append((i, run))
    panels = ["train_loss", "val_loss"] if metric == "loss" else ["train_loss", "train_metric", "val_metric"]
    fig = Figure(figsize=(5.0 * len(panels), 3.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), len(panels), squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for row_axes, (m, members) in zip(axes, groups.items()):
        label_m, scale = ("accuracy (%)", 100.0) if m == "accuracy" else ("MSE", 1.0)
        for ax, panel in zip(row_axes, panels):
            plotted: list[float] = []
            for i, run in members:
                c = colors[i]
                if panel == "train_loss" or panel == "train_metric":
                    key = "loss" if panel == "train_loss" else m
                    xs, ys, _ = _series(run.train, key, 1.0 if panel == "train_loss" else scale)
                    smooth = _ema(ys, 0.6) if len(ys) >= 10 else ys
                    if smooth is not ys:
                        ax.plot(xs, ys, color=c, alpha=0.25, lw=0.8)
                    ax.plot(xs, smooth, color=c, lw=1.5, label=run.name)
                    plotted += ys
                else:
                    key = "loss" if panel == "val_loss" else m
                    xs, ys, cis = _series(run.val, key, 1.0 if panel == "val_loss" else scale)
                    ax.plot(xs, ys, color=c, lw=1.5, marker="o", ms=3, label=run.name)
                    if panel == "val_metric":
                        band = [(x, y, ci) for x, y, ci in zip(xs, ys, cis) if math.isfinite(ci)]
                        if band:
                            bx, by, bc = zip(*band)
                            ax.fill_between(bx, [y - e for y, e in zip(by, bc)], [y + e for y, e in zip(by, bc)],
                                            color=c, alpha=0.15, lw=0)
                    plotted += ys
            what = {"train_loss": "training loss (smoothed)",
                    "val_loss": "validation loss",
                    "train_metric": f"training {label_m}",
                    "val_metric": f"validation {label_m} (95% CI)"}[panel]
            kind = "classification" if m == "accuracy" else "regression"
            ax.set_title(what if len(groups) == 1 else f"{what}, {kind} runs", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if m == "mse" or panel in ("train_loss", "val_loss"):
                _maybe_log(ax, plotted)
            if not plotted:
                ax.text(0.5, 0.5, "no rows logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        row_axes[-1].legend(fontsize=8, loc="best")
    return _save(fig, Path(path))


def report_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                metric: str = "accuracy") -> dict[str, Any]:
    """Summarise run folders: ``<out_dir>/report.md`` (a table: run, algorithm, task, steps,
    training minutes, best validation result with its 95% CI and step, test result) and
    ``<out_dir>/curves.png``. ``out_dir`` defaults to ``<parent of the first run>/report``.
    ``metric``: ``accuracy`` plots each run's task metric (accuracy, or MSE for regression),
    ``loss`` plots the training and validation losses. Returns the summary rows, the table and
    the paths written."""
    if metric not in ("accuracy", "loss"):
        raise ConfigError(f"Report: metric must be 'accuracy' or 'loss'; got {metric!r}. Choose one of them.")
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ConfigError("Report: at least one run folder must be given; got none. Pass the out_dir of a run.")
    runs = [read_run(d) for d in run_dirs]
    for run, name in zip(runs, _run_names([r.path for r in runs])):
        run.name = name
    out = Path(out_dir) if out_dir is not None else runs[0].path.resolve().parent / "report"
    summaries = [_summary(r) for r in runs]
    table = runs_table(summaries)
    curves = plot_curves(runs, out / "curves.png", metric)
    notes = []
    for s in summaries:
        if not s["finished"]:
            notes.append(f"- {s['run']}: no report.json (training was interrupted, stopped or is still running); "
                         "the numbers come from metrics.jsonl.")
        if s["skipped_lines"]:
            notes.append(f"- {s['run']}: {s['skipped_lines']} damaged line(s) of metrics.jsonl skipped "
                         "(a crash cut a line short).")
    text = "# metafit report\n\n" + table + "\n"
    text += "\nbest val: the best validation result (95% CI) and its step; test: the best checkpoint on the " \
            "fixed test episodes.\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    text += f"\n![learning curves]({curves.name})\n"
    md = out / "report.md"
    atomic_write_bytes(md, lambda f: f.write(text.encode()))
    return {"runs": summaries, "table": table, "notes": notes, "report": str(md), "curves": str(curves)}
