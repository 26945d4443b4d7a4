"""Meta-RL training as a run of the one loop (:class:`metafit.training.loop.Loop`).

A step is one ``learner.train_iteration`` (the learner updates itself: its optimizer is its own
and nothing waits for the monitor); a validation scores the learner on fixed validation tasks
(returns at every adaptation point) and, with ``train.weight_average``, an exponential moving
average of its weights beside it: ``best.safetensors`` keeps whichever scored higher. Resuming
restores the learner, its optimizer, the task stream and the weight average.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, ConfigError
from ..rl.learners import RLLearner
from ..stats import mean_ci
from .checkpoint import (check_optimizer_state, check_rng_state, check_tensors, join_optimizer_state, model_state,
                         split_optimizer_state)
from .loop import StepReport, Validation, Window, check_same_config
from .weight_average import WeightAverage

__all__ = ["RL_RESUME_FIXED", "RLRun", "WeightAverage", "evaluate_learner", "plot_rl_curve"]

#: the config sections a resumed meta-RL run must share with its checkpoint: they shape the
#: learner's networks, its optimizer state and the environments it was trained on
RL_RESUME_FIXED = ("family", "learner")


def _score(learner: RLLearner, returns: torch.Tensor) -> torch.Tensor:
    """Per-task score: the whole trial's reward for learners whose points are episodes of one
    trial (RL²), the return after the last adaptation point otherwise."""
    return returns.sum(1) if getattr(learner, "score_reduction", "last") == "sum" else returns[:, -1]


def evaluate_learner(learner: RLLearner, tasks: list, seed: int) -> dict[str, Any]:
    """Mean and 95% CI of the returns at every adaptation point, and of the per-task score."""
    was = learner.training
    learner.eval()
    try:
        returns = learner.evaluate(tasks, torch.Generator().manual_seed(seed)).detach()
    finally:
        learner.train(was)
    per_point = {}
    for name, col in zip(learner.eval_points(), returns.T):
        m, ci = mean_ci(col)
        per_point[name] = {"mean": m, "ci95": ci}
    score, score_ci = mean_ci(_score(learner, returns))
    return {"score": score, "ci95": score_ci, "tasks": len(tasks), "points": per_point}


class RLRun:
    """Meta-train ``learner`` as ``config`` (an ``RLRunConfig``) says; ``read_config`` validates a
    stored config mapping into one (for the resume checks)."""

    kind, owner, step_key, csv = "rl", "RL", "iteration", False
    guard_advice = "Lower the learner's learning rate"

    def __init__(self, config: Any, learner: RLLearner, read_config: Callable[[Any], Any]) -> None:
        tc = config.train
        self.config, self.learner, self.read_config = config, learner, read_config
        self.progress_desc = f"rl {config.learner.name}"
        self.average = WeightAverage(learner, tc.weight_average, owner="RL") if tc.weight_average else None
        self.val_tasks = learner.family.sample_tasks(tc.eval_tasks, torch.Generator().manual_seed(tc.eval_seed))
        self.gen = torch.Generator().manual_seed(config.seed + 1)
        self.best_weights, self.env_steps = "live", 0

    def files(self) -> dict[str, dict]:
        return {"config.json": self.config.to_dict()}

    def step(self, step: int) -> StepReport:
        stats = self.learner.train_iteration(self.gen)
        if self.average is not None:
            self.average.update()
        self.env_steps += int(stats.get("env_steps", 0))
        return StepReport({k: float(v) for k, v in stats.items()})

    def finish(self, action: str) -> None:  # the learner updated itself in step()
        pass

    def train_row(self, means: dict[str, float] | None, window: Window, seconds: float) -> dict[str, Any]:
        return {**(means or {}), "total_env_steps": self.env_steps, "elapsed_s": seconds}

    def postfix(self, row: dict[str, Any], best: float | None) -> dict[str, str] | None:
        ret = row.get("return")
        return {"ret": f"{ret if ret is not None else float('nan'):.3f}",
                "best": f"{best:.3f}" if best is not None else "-"}

    def validate(self, step: int, seconds: float) -> Validation:
        seed = self.config.train.eval_seed + 7
        res = evaluate_learner(self.learner, self.val_tasks, seed)
        row = {"score": res["score"], "ci95": res["ci95"], "points": {k: v["mean"] for k, v in res["points"].items()},
               "elapsed_s": seconds}
        if self.average is not None and self.average.n_averaged > 0:
            with self.average.swapped_in() as averaged:
                res_avg = evaluate_learner(averaged, self.val_tasks, seed)
            row["score_average"] = res_avg["score"]
            if res_avg["score"] > res["score"]:
                return Validation(res_avg["score"], row, {"val": res_avg, "weights": "average"}, kept="average",
                                  weights=self.average.swapped_in)
        return Validation(res["score"], row, {"val": res, "weights": "live"}, kept="live")

    def keep(self, validation: Validation) -> None:
        self.best_weights = validation.kept

    def metrics(self, best_step: int, seconds: float) -> dict[str, Any]:
        return {}

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.learner.state_dict().items()}
        return tensors, {"learner": self.config.learner.name, "config": self.config.to_dict()}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        opt_state = self.learner.optimizer_state_dict()
        opt_tensors, scalars = split_optimizer_state(opt_state)
        tensors = {**opt_tensors, "rng.tasks": self.gen.get_state(),
                   **(self.average.tensors() if self.average is not None else {})}
        optimizer = {"param_groups": opt_state.get("param_groups", []), "scalars": scalars}
        return tensors, optimizer, {"best_weights": self.best_weights, "env_steps": self.env_steps}

    def _check(self, meta: dict, tensors: dict[str, torch.Tensor], path: Path, everything: bool) -> None:
        """Refuse to resume from ``path`` unless its learner and config agree with this run's on
        :data:`RL_RESUME_FIXED` and every tensor fits the learner, its optimizer, the task stream
        and the weight average."""
        name = self.config.learner.name
        if meta.get("learner") != name:
            raise CheckpointError(
                f"RL: resume needs a meta-RL last.safetensors of learner {name!r}; got {meta.get('learner')!r}. "
                "Resume with the original config.")
        try:
            stored = self.read_config(meta["config"]).to_dict()
        except ConfigError as err:
            raise CheckpointError(
                f"RL: the config stored in {str(path)!r} must be valid for this metafit version; got: "
                f"{str(err).rstrip('.')}. Use the metafit version that wrote it ({meta.get('metafit_version')})."
            ) from err
        check_same_config(self.owner, stored, self.config.to_dict(), RL_RESUME_FIXED, (), path)
        check_tensors(model_state(tensors), self.learner.state_dict(), path, what="the learner its config describes")
        opt = meta["train_state"].get("optimizer") or {}
        current = self.learner.optimizer_state_dict() or {}
        optimizer = next((v for v in vars(self.learner).values() if isinstance(v, torch.optim.Optimizer)
                          and v.state_dict()["param_groups"] == current.get("param_groups")), None)
        params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else None
        check_optimizer_state(tensors, opt.get("scalars", {}), opt.get("param_groups", []),
                              current.get("param_groups", []), params, path)
        if everything:
            check_rng_state(tensors, "rng.tasks", self.gen.get_state(), path)
            if self.average is not None:
                self.average.check(tensors, path)

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], path: Path, everything: bool) -> None:
        self._check(meta, tensors, path, everything)
        self.learner.load_state_dict(model_state(tensors))
        opt = meta["train_state"].get("optimizer") or {}
        try:
            self.learner.load_optimizer_state_dict(join_optimizer_state(tensors, opt.get("scalars", {}),
                                                                        opt.get("param_groups", [])))
        except (ValueError, KeyError, RuntimeError) as err:  # a learner-specific optimizer layout
            raise CheckpointError(
                f"RL: the optimizer state in {str(path)!r} must fit learner {self.config.learner.name!r} as "
                f"configured; got {type(err).__name__}: {' '.join(str(err).split())[:150]}. Resume with the run's "
                "config.") from err
        if not everything:
            return
        self.gen.set_state(tensors["rng.tasks"])
        if self.average is not None:
            self.average.load(tensors)
        run = meta["train_state"].get("run") or {}
        self.best_weights, self.env_steps = run.get("best_weights", "live"), run.get("env_steps", 0)

    def close(self) -> None:
        pass


def plot_rl_curve(rows: list[dict], path: Path, title: str) -> None:
    """The training returns and the validation scores (95% CI band) against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _save as save_fig

    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    try:
        if train:
            ax.plot([r["iteration"] for r in train], [r["return"] for r in train], lw=1, alpha=0.6,
                    label="training batches")
        if val:
            xs, ys, ci = [r["iteration"] for r in val], [r["score"] for r in val], [r["ci95"] for r in val]
            ax.plot(xs, ys, marker="o", lw=1.6, label="validation tasks (95% CI)")
            ax.fill_between(xs, [y - c for y, c in zip(ys, ci)], [y + c for y, c in zip(ys, ci)], alpha=0.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("return")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_fig(fig, path)
    finally:
        plt.close(fig)

