"""Reports of finished (or interrupted) runs: a Markdown table and PNG learning curves.

``metafit report RUN...`` and :func:`report_runs` read the run folders the trainer writes (see
:mod:`metafit.training.curves` for what they hold and how damaged or resumed logs are read) and
write ``report.md`` (run, algorithm, task, steps, training minutes, best validation result with
its 95% CI, test result) beside ``curves.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..data.cache import atomic_write_bytes
from ..errors import ConfigError
from ..training.curves import X_AXES, RunLog, as_number, curve_panels, plot_curves, read_run, trains_on_batches

__all__ = ["markdown_table", "report_runs", "runs_table"]


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
        value = as_number(row.get(metric))
        if not math.isfinite(value):
            continue
        score = -value if metric == "mse" else value
        if best is None or score > best[0]:
            best, best_step = (score, {"mean": value, "ci95": as_number(row.get("ci95")), "metric": metric}), row["step"]
    return (best[1] if best else None), best_step


def _fmt_result(res: dict | None) -> str:
    if not res or not math.isfinite(as_number(res.get("mean"))):
        return "-"
    mean, ci = as_number(res.get("mean")), as_number(res.get("ci95"))
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
    alg = config.get("algorithm") or {}
    if trains_on_batches(alg):
        if alg.get("n_base_classes"):
            text += f" (trained supervised over {alg['n_base_classes']} classes)"
    elif (tr.get("n_ways"), tr.get("k_shots")) != (ev.get("n_ways"), ev.get("k_shots")):
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
    """A Markdown table whose columns are padded, so it also reads well on a terminal: ``headers``,
    the column titles; ``rows``, the cells (any values, shown with ``str``; ``|`` is escaped and line
    breaks become spaces). Returns the table's text, without a final newline.

    >>> print(markdown_table(["run", "accuracy"], [["protonet", "98.10%"], ["maml", 0.95]]))
    | run      | accuracy |
    |----------|----------|
    | protonet | 98.10%   |
    | maml     | 0.95     |
    """
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
    """The Markdown table of ``report.md`` (columns :data:`RUN_COLUMNS`: run, algorithm, task, steps,
    training minutes, best validation result with its 95% CI and step, test result) for
    ``summaries``, the summary rows :func:`report_runs` returns (one dict per run)."""
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



def report_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                metric: str = "accuracy", x: str = "time") -> dict[str, Any]:
    """Summarise the run folders ``run_dirs``: ``<out_dir>/report.md`` (a table: run, algorithm, task, steps,
    training minutes, best validation result with its 95% CI and step, test result) and
    ``<out_dir>/curves.png``. ``out_dir`` defaults to ``<parent of the first run>/report``.
    ``metric``: ``accuracy`` plots each run's task metric (accuracy, or MSE for regression),
    ``loss`` plots the training and validation losses. ``x``: ``time`` (training time) or
    ``images`` (images seen) on the x-axis (see :func:`plot_curves`). Returns the summary rows,
    the table, the panels of the curves (titles and runs) and the paths written."""
    if metric not in ("accuracy", "loss"):
        raise ConfigError(f"Report: metric must be 'accuracy' or 'loss'; got {metric!r}. Choose one of them.")
    if x not in X_AXES:
        raise ConfigError(f"Report: x must be one of {', '.join(X_AXES)}; got {x!r}. Choose one of them.")
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
    curves = plot_curves(runs, out / "curves.png", metric, x)
    panels = [{"title": p.title, "runs": [runs[i].name for i in p.members]} for p in curve_panels(runs, metric, x)]
    notes = []
    for s, run in zip(summaries, runs):
        if not s["finished"]:
            notes.append(f"- {s['run']}: no report.json (training was interrupted, stopped or is still running); "
                         "the numbers come from metrics.jsonl.")
        if s["skipped_lines"]:
            notes.append(f"- {s['run']}: {s['skipped_lines']} damaged line(s) of metrics.jsonl skipped "
                         "(a crash cut a line short).")
        if x == "time" and (run.train or run.val) and not any(
                math.isfinite(as_number(r.get("elapsed_s"))) for r in run.train + run.val):
            notes.append(f"- {s['run']}: metrics.jsonl has no elapsed_s (an older metafit wrote it): it is not "
                         "on the time axis; plot against images seen (--x images).")
    text = "# metafit report\n\n" + table + "\n"
    text += "\nbest val: the best validation result (95% CI) and its step; test: the best checkpoint on the " \
            "fixed test episodes.\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    axis = "training time (validation included)" if x == "time" else "training images seen"
    text += (f"\nLearning curves against {axis}; runs share a panel only where their numbers measure the same "
             "thing (training: the same kind of training task; validation: the same fixed episodes):\n\n"
             + "".join(f"- {p['title']}: {', '.join(p['runs'])}\n" for p in panels))
    text += f"\n![learning curves]({curves.name})\n"
    md = out / "report.md"
    atomic_write_bytes(md, lambda f: f.write(text.encode()))
    return {"runs": summaries, "table": table, "notes": notes, "panels": panels, "report": str(md),
            "curves": str(curves)}
