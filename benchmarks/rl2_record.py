"""Recording runs of benchmarks/rl2.py in benchmarks/results/rl2.json without losing an earlier one
(a run becomes its setting's main entry and the one it replaces a variant inside it, or it is filed
as a named variant), and the comparison table with the baselines."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from rl2_setup import SETTINGS, baseline_key

HERE = Path(__file__).resolve().parent
BASELINES = HERE / "results" / "rl_baselines.json"


def _thin(points: list, stride: int) -> list:
    """Every stride-th point, and the last one."""
    return points[::stride] + ([points[-1]] if points and (len(points) - 1) % stride else [])


# a variant's learning and training-statistics curves are kept at about this many points (main
# entries keep up to ~1000): the file holds dozens of variants, their figures and validation curves whole
VARIANT_CURVE_POINTS = 250


def _is_entry(value) -> bool:
    """A run's entry (a main entry's nested variants are entries too)."""
    return isinstance(value, dict) and "eval" in value and "config" in value


def _own_fields(entry: dict) -> dict:
    """The run itself, without the variants nested in it."""
    return {k: v for k, v in entry.items() if not _is_entry(v)}


def thin_variant(entry: dict, max_points: int = VARIANT_CURVE_POINTS) -> dict:
    """A copy of a run's own fields with its per-update curves thinned to at most about
    ``max_points``: every ``learning_curve_stride``-th update (the stride grows by the factor
    applied) and the last; figures and the validation curve are kept whole."""
    out = copy.deepcopy(_own_fields(entry))
    curve = out.get("learning_curve") or []
    factor = -(-len(curve) // max_points)
    if factor > 1:
        for key in ("learning_curve", "training_stats_curve"):
            if key in out:
                out[key] = _thin(out[key], factor)
        out["learning_curve_stride"] = out.get("learning_curve_stride", 1) * factor
    return out


def record(results: dict, setting: str, entry: dict, variant: str | None = None,
           previous_as: str | None = None) -> str:
    """Put a run's ``entry`` into ``results`` (the ``settings`` of rl2.json) without losing any
    earlier run, and return the key it was filed under.

    With ``variant``, the run is filed (curves thinned) under that name inside the setting's main
    entry, which stays as it is. Without, it becomes the setting's main entry: the variants nested
    in the old one move to it, and the old main run itself becomes a variant named ``previous_as``
    (default ``previous_run``, or ``previous_run_2``, ... where taken). Names already in use are
    refused (``ValueError``)."""
    old = results.get(setting)
    if variant is not None:
        if old is None:
            raise ValueError(f"--variant {variant}: {setting} has no main entry in this file to file a variant "
                             "under; record the run as the main entry (leave out --variant)")
        if variant in old:
            raise ValueError(f"--variant must name a new key of {setting}; {variant!r} is taken. Choose another name")
        old[variant] = thin_variant(entry)
        return variant
    new = copy.deepcopy(_own_fields(entry))
    if old is not None:
        nested = {k: v for k, v in old.items() if _is_entry(v)}
        if _is_entry(old):
            name = previous_as
            if name is None:
                name, i = "previous_run", 2
                while name in nested:
                    name, i = f"previous_run_{i}", i + 1
            if name in nested or name in new:
                raise ValueError(f"--previous-as must name a new key of {setting}; {name!r} is taken. "
                                 "Choose another name")
            nested[name] = thin_variant(old)
        new.update(nested)
    results[setting] = new
    return setting


def _baselines() -> dict:
    try:
        return json.loads(BASELINES.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _best_baseline(row: dict) -> tuple[str, dict] | None:
    cells = [(k, v) for k, v in row.items()
             if not k.startswith("_") and isinstance(v, dict) and "mean" in v and not k.startswith("Oracle")]
    return max(cells, key=lambda kv: kv[1]["mean"]) if cells else None


def print_table(results: dict) -> None:
    base = _baselines()
    head = (f"{'setting':<17}{'RL2 (ours)':>15}{'greedy':>15}{'paper RL2':>11}{'best baseline (ours)':>36}{'Random':>9}"
            f"{'Oracle':>9}{'train min':>11}{'iters':>7}{'env steps':>12}")
    print("\n" + head)
    print("-" * len(head))
    for name in SETTINGS:
        if name not in results:
            continue
        r = results[name]
        section, key = baseline_key(name)
        row = base.get(section, {}).get(key, {})
        bb = _best_baseline(row)
        bb_s = f"{bb[0][:18]} {bb[1]['mean']:.1f}±{bb[1]['ci95']:.1f}" if bb else "n/a"
        rnd = row.get("Random", {}).get("mean")
        orc = next((v["mean"] for k, v in row.items() if k.startswith("Oracle")), None)
        gr = r.get("eval_greedy")
        gr_s = f"{gr['mean']:>9.2f}±{gr['ci95']:<5.2f}" if gr else f"{'n/a':>15}"
        print(f"{name:<17}{r['eval']['mean']:>9.2f}±{r['eval']['ci95']:<5.2f}{gr_s}{r['paper_rl2']:>11.1f}{bb_s:>36}"
              f"{(f'{rnd:.1f}' if rnd is not None else 'n/a'):>9}{(f'{orc:.1f}' if orc is not None else 'n/a'):>9}"
              f"{r['train_minutes']:>11.1f}{r['iterations']:>7}{r['env_steps']:>12,}")
