"""Combine trained few-shot checkpoints into one ensemble checkpoint (``metafit ensemble``).

The members keep their weights and become the members of an ``ensemble`` backbone
(:class:`metafit.nn.EnsembleConfig`): a Prototypical Network over it scores each query by the
mean of its members' distances, and the result evaluates, calibrates, adapts, predicts and serves
like any other checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..nn.normalize import NORM_BUFFERS
from .checkpoint import load, save_checkpoint
from .config import RunConfig, build_model, make_config

__all__ = ["ensemble_checkpoints"]


def _same(owner: str, what: str, first: Any, other: Any, path: str | os.PathLike, fix: str) -> None:
    if first != other:
        raise ConfigError(f"{owner}: every member must have the first member's {what}, {first!r}; got {other!r} in "
                          f"{str(path)!r}. {fix}")


def ensemble_checkpoints(checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write to ``out`` (atomically) one checkpoint whose backbone is the ensemble of the backbones
    of ``checkpoints`` (two to 16 few-shot checkpoints of the same algorithm and input format, e.g.
    one config trained with different seeds), and return its path.

    The ensemble takes the first member's config for everything but the backbone (algorithm,
    data, eval settings; ``metafit eval --set`` changes adaptation fields as for any checkpoint);
    each member's backbone section records the checkpoint its weights came from. Learned tensors
    outside the backbone (e.g. a ProtoNet's scale) must be equal in every member: learners with a
    trained head of their own (MAML, ANIL, a transfer classifier, R2D2's scale, ...) are refused, since one head cannot
    serve several backbones. Every member must carry the same class split (the checkpoint's
    ``split``, kept in the ensemble): one trained on another's validation or test classes would make
    the ensemble's scores dishonest. The metrics record every member's path, step and metrics; a
    calibration is not carried over (calibrate the ensemble: ``metafit calibrate``)."""
    owner = "Ensemble"
    if not 2 <= len(checkpoints) <= 16:
        raise ConfigError(f"{owner}: checkpoints must be 2 to 16 paths; got {len(checkpoints)}. "
                          "Pass the members' checkpoints, e.g. runs/a/best.safetensors runs/b/best.safetensors.")
    models = [load(p) for p in checkpoints]
    first: RunConfig = models[0].run_config
    outside = {k: v for k, v in models[0].state_dict().items() if not k.startswith("backbone.")}
    for path, model in zip(checkpoints, models):
        cfg: RunConfig = model.run_config
        if cfg.backbone.name == "ensemble":
            raise ConfigError(f"{owner}: every member must have a single backbone; got an ensemble in {str(path)!r}. "
                              "Pass the checkpoints of its members instead.")
        _same(owner, "algorithm", first.algorithm.name, cfg.algorithm.name, path,
              "Combine checkpoints of one learner.")
        for what, get in (("input size", lambda c: (c.data.in_channels, c.data.input_size)),
                          ("image format", lambda c: c.data.image_format()),
                          ("input statistics", lambda c: c.data.input_statistics()),
                          ("task kind", lambda c: c.data.task_kind)):
            _same(owner, what, get(first), get(cfg), path, "Combine models trained on the same kind of data.")
        state = model.state_dict()
        for name, tensor in outside.items():
            theirs = state.get(name)
            if theirs is None or theirs.shape != tensor.shape or not bool((theirs == tensor).all()):
                raise ConfigError(
                    f"{owner}: learned tensors outside the backbone must be equal in every member; got a different "
                    f"{name!r} in {str(path)!r}. An ensemble shares one head: combine learners whose only learned "
                    "weights are the backbone's (protonet with squared_euclidean distance).")
    split = models[0].checkpoint_meta.get("split")
    for path, model in zip(checkpoints, models):
        if model.checkpoint_meta.get("split") != split:
            raise ConfigError(
                f"{owner}: every member must have been trained on the first member's class split; got another in "
                f"{str(path)!r} (see metafit info). A member that trained on another member's validation or test "
                "classes would make the ensemble's scores dishonest: train the members with one data section.")
    members = [{**m.run_config.backbone.model_dump(mode="json"), "weights": str(Path(p).resolve())}
               for p, m in zip(checkpoints, models)]
    config = make_config({**first.to_dict(), "backbone": {"name": "ensemble", "members": members}})
    ensemble = build_model(config, pretrained=False)
    for member, model in zip(ensemble.backbone.members, models):
        state = {k: v for k, v in model.backbone.state_dict().items() if k not in NORM_BUFFERS}
        member.load_state_dict(state)
    ensemble.load_state_dict(outside, strict=False)
    record = [{"checkpoint": str(p), "step": m.checkpoint_meta.get("step"), "metrics": m.checkpoint_meta.get("metrics")}
              for p, m in zip(checkpoints, models)]
    return save_checkpoint(out, ensemble, config, step=0, metrics={"ensemble": record},
                           extra_meta={"split": split} if split is not None else None)
