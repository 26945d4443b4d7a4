"""Figures of results (matplotlib, Agg backend: no display needed). Files are written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..algorithms import Algorithm
from ..data import SinusoidFamily
from ..data.cache import atomic_write_bytes
from ..errors import ConfigError

if TYPE_CHECKING:
    from .evaluate import EpisodePredictions, EvalPredictions

__all__ = ["PLOTS_EXTRA", "have_matplotlib", "require_matplotlib", "confusion_counts", "plot_confusion", "plot_eval_episodes", "plot_sinusoid_adaptation", "write_eval_plots"]

#: a confusion matrix shows at most this many classes (the most confused; the rest are pooled)
CONFUSION_CLASSES = 20
#: episodes drawn by :func:`plot_eval_episodes` (``metafit eval --plots``)
PLOT_EPISODES = 3
#: images per row of the episode grid
EPISODE_COLUMNS = 10
OTHER = "(other classes)"


#: how to get matplotlib, which draws every figure (an extra: training, evaluation and serving need it not)
PLOTS_EXTRA = 'pip install -c constraints.txt -e ".[plots]" (or pip install matplotlib)'


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (figures are optional: the ``plots`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib(owner: str, what: str) -> None:
    """A one-line :class:`ConfigError` naming the extra when matplotlib is missing."""
    if not have_matplotlib():
        raise ConfigError(f"{owner}: {what} needs matplotlib; got it not installed. Run {PLOTS_EXTRA}.")


def _save(fig, path: Path) -> Path:
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write_bytes(path, lambda f: fig.savefig(f, format=fmt, dpi=110, bbox_inches="tight"))
    return path


def plot_sinusoid_adaptation(model: Algorithm, family: SinusoidFamily, path: str | os.PathLike,
                             k_shots: int = 5, steps: Sequence[int] = (0, 1, 10), n_tasks: int = 3,
                             seed: int = 0) -> Path:
    """Adapted curves of a regression model on ``n_tasks`` unseen sinusoids: the true curve, the
    ``k_shots`` support points, and the model after each number of inner ``steps``."""
    require_matplotlib("Plot", "the adapted-curves figure")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = family.sampler(k_shots, 1, seed).fixed_episodes(n_tasks, seed)
    lo, hi = family.x_range
    xs = torch.linspace(lo, hi, 200).unsqueeze(1)
    was_training = model.training
    model.eval()
    fig, axes = plt.subplots(1, n_tasks, figsize=(4.2 * n_tasks, 3.3), sharey=True, squeeze=False)
    try:
        for ax, ep in zip(axes[0], episodes):
            sy = family.curve(ep.amplitude, ep.phase, ep.support_x)
            ax.plot(xs, family.curve(ep.amplitude, ep.phase, xs), color="black", lw=2, label="true curve")
            for s in steps:
                with torch.no_grad():
                    pred = model.predict(model.adapt(ep.support_x, sy, 1, steps=s), xs)
                ax.plot(xs, pred, lw=1.4, ls="--" if s == 0 else "-",
                        label="meta-learned init" if s == 0 else f"after {s} step{'s' * (s != 1)}")
            ax.scatter(ep.support_x, sy, marker="^", s=60, color="tab:red", zorder=5,
                       label=f"{k_shots} support points")
            ax.set_title(f"A={float(ep.amplitude):.2f}, phase={float(ep.phase):.2f}")
            ax.set_xlabel("x")
        axes[0][0].set_ylabel("y")
        axes[0][-1].legend(loc="lower right", fontsize=8)
        fig.suptitle(f"{type(model).__name__}: {k_shots}-shot sinusoid regression on unseen tasks", y=1.03)
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
        model.train(was_training)


def confusion_counts(predictions: EvalPredictions,
                     max_classes: int = CONFUSION_CLASSES) -> tuple[list[str], torch.Tensor]:
    """The confusion matrix of kept predictions by dataset class: ``counts[i, j]`` queries of true
    class ``labels[i]`` predicted as ``labels[j]``. With more than ``max_classes`` classes, the
    ``max_classes`` most confused (most wrong predictions as true or as predicted class; ties by
    name) are kept and the others pooled into a last row and column ``"(other classes)"``, so the
    counts always sum to the number of queries. Classes are in name order."""
    n = len(predictions.classes)
    counts = torch.zeros(n, n, dtype=torch.long)
    counts.index_put_((predictions.true, predictions.predicted), torch.ones_like(predictions.true), accumulate=True)
    if n <= max_classes:
        order = sorted(range(n), key=lambda i: predictions.classes[i])
        return [predictions.classes[i] for i in order], counts[order][:, order]
    wrong = counts - torch.diag(torch.diag(counts))
    confused = wrong.sum(0) + wrong.sum(1)
    ranked = sorted(range(n), key=lambda i: (-int(confused[i]), predictions.classes[i]))
    keep = sorted(ranked[:max_classes], key=lambda i: predictions.classes[i])
    slot = torch.full((n,), len(keep), dtype=torch.long)  # the pooled row/column
    slot[keep] = torch.arange(len(keep))
    pooled = torch.zeros(len(keep) + 1, len(keep) + 1, dtype=torch.long)
    pooled.index_put_((slot[predictions.true], slot[predictions.predicted]), torch.ones_like(predictions.true),
                      accumulate=True)
    return [predictions.classes[i] for i in keep] + [OTHER], pooled


def plot_confusion(predictions: EvalPredictions, path: str | os.PathLike,
                   max_classes: int = CONFUSION_CLASSES) -> Path:
    """The confusion matrix of :func:`confusion_counts` as a picture: every cell shows its count of
    queries, its colour the share of its row (the true class's queries)."""
    from matplotlib.figure import Figure

    labels, counts = confusion_counts(predictions, max_classes)
    n = len(labels)
    rows = counts.sum(1, keepdim=True).clamp(min=1)
    share = (counts.double() / rows).numpy()
    size = min(3.0 + 0.45 * n, 14.0)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class's queries")
    font = 8 if n <= 12 else 6
    for i in range(n):
        for j in range(n):
            c = int(counts[i, j])
            if c:
                ax.text(j, i, str(c), ha="center", va="center", fontsize=font,
                        color="white" if share[i, j] > 0.6 else "black")
    short = [lb if len(lb) <= 24 else "..." + lb[-21:] for lb in labels]
    ax.set_xticks(range(n), short, rotation=90, fontsize=font)
    ax.set_yticks(range(n), short, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total, correct = int(counts.sum()), int(counts.diagonal().sum())
    shown = len(predictions.classes)
    what = (f"all {shown} classes" if labels[-1:] != [OTHER] else
            f"the {n - 1} most confused of {shown} classes, the others pooled")
    ax.set_title(f"{total} queries of {predictions.n_episodes} episodes, {correct} correct "
                 f"({100 * correct / max(total, 1):.1f}%); {what}", fontsize=9)
    return _save(fig, Path(path))


def _spread(labels: torch.Tensor, limit: int) -> list[int]:
    """At most ``limit`` positions of ``labels`` taking every label in turn (labels come grouped
    by class: the first positions alone would show one class)."""
    groups: dict[int, list[int]] = {}
    for i, lb in enumerate(labels.tolist()):
        groups.setdefault(lb, []).append(i)
    out, depth = [], 0
    while len(out) < min(limit, len(labels)):
        for members in groups.values():
            if depth < len(members) and len(out) < limit:
                out.append(members[depth])
        depth += 1
    return out


def _show(ax, image: torch.Tensor) -> None:
    img = image.detach().float().clamp(0, 1)
    if img.ndim == 3 and img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    elif img.ndim == 3:
        ax.imshow(img[:3].permute(1, 2, 0).numpy())
    else:
        ax.imshow(img.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])


def _name(text: str, width: int = 14) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def plot_eval_episodes(episodes: Sequence[EpisodePredictions], path: str | os.PathLike,
                       columns: int = EPISODE_COLUMNS) -> Path:
    """A grid of evaluated episodes: per episode a row of support images titled with their class,
    then a row of query images titled with the predicted class, framed green where the prediction
    is right and red where it is wrong (``columns`` images per row at most, every class in turn).
    Each query axes is labelled ``"query <episode> <index>"`` (its position in the episode)."""
    from matplotlib.figure import Figure

    if not episodes:
        raise ValueError("Plots: episodes must hold at least one episode; got none. Evaluate with "
                         "keep_predictions >= 1.")
    width = min(columns, max(max(len(e.support_y), len(e.query_y)) for e in episodes))
    n_rows = 2 * len(episodes)
    fig = Figure(figsize=(1.25 * width + 0.8, 1.55 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, width, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for e, ep in enumerate(episodes):
        names = ep.class_names
        sup_ax, q_ax = axes[2 * e], axes[2 * e + 1]
        for col, i in enumerate(_spread(ep.support_y, width)):
            ax = sup_ax[col]
            ax.set_axis_on()
            _show(ax, ep.support_x[i])
            ax.set_title(_name(names[int(ep.support_y[i])]), fontsize=7)
            ax.set_label(f"support {e} {i}")
        sup_ax[0].set_ylabel(f"episode {e + 1}\nsupport", fontsize=8)
        correct = ep.correct
        for col, i in enumerate(_spread(ep.query_y, width)):
            ax = q_ax[col]
            ax.set_axis_on()
            _show(ax, ep.query_x[i])
            ok = bool(correct[i])
            color = "tab:green" if ok else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            pred = _name(names[int(ep.predicted[i])])
            ax.set_title(pred if ok else f"{pred}\n(true {_name(names[int(ep.query_y[i])])})", fontsize=7,
                         color=color)
            ax.set_label(f"query {e} {i}")
        n_ok = int(correct.sum())
        q_ax[0].set_ylabel(f"queries\n{n_ok}/{len(correct)} right", fontsize=8)
    fig.suptitle("example episodes: support images with their class; queries with the predicted class "
                 "(green: right, red: wrong)", fontsize=9)
    return _save(fig, Path(path))


def write_eval_plots(predictions: EvalPredictions, out_dir: str | os.PathLike,
                     max_classes: int = CONFUSION_CLASSES) -> dict[str, str]:
    """``<out_dir>/confusion.png`` (:func:`plot_confusion`) and, where episodes were kept,
    ``<out_dir>/episodes.png`` (:func:`plot_eval_episodes`); returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"confusion": str(plot_confusion(predictions, out / "confusion.png", max_classes))}
    if predictions.episodes:
        written["episodes"] = str(plot_eval_episodes(predictions.episodes, out / "episodes.png"))
    return written
