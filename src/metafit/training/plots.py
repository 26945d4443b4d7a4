"""Figures of results (matplotlib, Agg backend: no display needed). Files are written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..algorithms import Algorithm
from ..data import SinusoidFamily
from ..data.cache import atomic_write_bytes

__all__ = ["plot_sinusoid_adaptation"]


def _save(fig, path: Path) -> Path:
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write_bytes(path, lambda f: fig.savefig(f, format=fmt, dpi=110, bbox_inches="tight"))
    return path


def plot_sinusoid_adaptation(model: Algorithm, family: SinusoidFamily, path: str | os.PathLike,
                             k_shots: int = 5, steps: Sequence[int] = (0, 1, 10), n_tasks: int = 3,
                             seed: int = 0) -> Path:
    """Adapted curves of a regression model on ``n_tasks`` unseen sinusoids: the true curve, the
    ``k_shots`` support points, and the model after each number of inner ``steps``."""
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
