"""Checkpoints: one ``.safetensors`` file. Tensors (model, and for resuming: optimizer and RNG
states) are safetensors entries; everything else (format, versions, algorithm, config, step,
metrics, class names) is JSON in the safetensors header metadata. Nothing in a checkpoint can
execute code when loaded. Writes go to a temp file that replaces the target atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import __version__
from ..algorithms import Algorithm
from ..data import migrate_legacy_data
from ..data.cache import atomic_write_bytes
from ..errors import CheckpointError, ConfigError
from .config import RunConfig, build_model, make_config, resolve_config

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "read_checkpoint", "save_checkpoint", "update_checkpoint_meta",
           "with_algorithm_overrides",
           "join_optimizer_state", "split_optimizer_state", "write_checkpoint"]

FORMAT = "metafit-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: Algorithm, config: RunConfig, *, step: int,
                    metrics: dict[str, Any] | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                    extra_meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    config = resolve_config(config)  # a pretrained adapter's architecture, so that loading needs no files
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().cpu().contiguous().clone()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metafit_version": __version__,
        "algorithm": config.algorithm.name,
        "config": config.to_dict(),
        "step": int(step),
        "metrics": metrics or {},
        # how user images are converted for this model (metafit.load / adapt / predict / serve)
        "image_format": fmt.to_dict() if (fmt := config.data.image_format()) is not None else None,
        **(extra_meta or {}),
    }
    return write_checkpoint(path, tensors, meta)


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` with ``meta`` as JSON header metadata, atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    blob = st_save(tensors, metadata={"metafit": json.dumps(meta)})
    atomic_write_bytes(path, lambda f: f.write(blob))
    return path


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """An optimizer ``state_dict()``'s per-parameter state as checkpoint tensors
    (``optim.<pid>.<name>``) and JSON scalars (``{pid: {name: value}}``); param_groups are JSON."""
    tensors, scalars = {}, {}
    for pid, st in state.get("state", {}).items():
        scalars[str(pid)] = {}
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[str(pid)][name] = value
    return tensors, scalars


def join_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict[str, dict], param_groups: list,
                         device: str | torch.device | None = None) -> dict:
    """The inverse of :func:`split_optimizer_state`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.to(device) if device is not None else v
    for pid, values in scalars.items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": param_groups}


def update_checkpoint_meta(path: str | os.PathLike, updates: dict[str, Any],
                           out: str | os.PathLike | None = None) -> Path:
    """Write ``path``'s checkpoint with metadata ``updates`` merged in, to ``out`` (default: in
    place, atomically); the tensors are unchanged."""
    meta, tensors = read_checkpoint(path)
    meta.update(updates)
    target = Path(out) if out is not None else Path(path)
    blob = st_save(tensors, metadata={"metafit": json.dumps(meta)})
    atomic_write_bytes(target, lambda f: f.write(blob))
    return target


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint's tensors (the ``model.*`` entries, prefix removed)."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a checkpoint; a :class:`CheckpointError` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint: path must be an existing checkpoint file; got {str(path)!r}. "
            "Pass a .safetensors file written by metafit (e.g. runs/<name>/best.safetensors)."
        )
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(
            f"Checkpoint: {str(path)!r} must be a safetensors file written by metafit; got an "
            f"unreadable or corrupted file ({err}). Re-create it, or pass another checkpoint."
        ) from err
    # safetensors.torch.load does not return metadata: read the JSON header by hand (no code runs)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = (header.get("__metadata__") or {}).get("metafit")
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"Checkpoint: {str(path)!r} must carry metafit metadata; got a foreign safetensors file. "
            "Pass a checkpoint written by metafit; to use foreign weights as a backbone, load them "
            "into a model yourself."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint: format_version must be {FORMAT_VERSION}; got {meta.get('format_version')!r}. "
            "Use the metafit version that wrote it, or re-train."
        )
    return meta, tensors


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Algorithm:
    """Rebuild the trained model of a checkpoint, ready for ``adapt``/``predict`` (eval mode).

    The returned module carries ``run_config`` (the validated :class:`RunConfig`) and
    ``checkpoint_meta`` (step, metrics, ...).
    """
    meta, tensors = read_checkpoint(path)
    if meta.get("kind") == "rl":
        raise CheckpointError(
            f"Checkpoint: {str(path)!r} must be a few-shot checkpoint here; got a meta-RL checkpoint "
            f"({meta.get('learner')}). Use metafit rl eval, or metafit.training.rl_run.load_rl."
        )
    try:
        stored = dict(meta["config"])
        stored["data"] = migrate_legacy_data(stored.get("data"))  # checkpoints of metafit 0.1
        config = make_config(stored)
    except (ConfigError, KeyError) as err:
        raise CheckpointError(
            f"Checkpoint: the config stored in {str(path)!r} must be valid for this metafit version; "
            f"got: {err}. Use the metafit version that wrote it ({meta.get('metafit_version')})."
        ) from err
    model = build_model(config, pretrained=False)  # the checkpoint holds the weights: no weights file read
    state = model_state(tensors)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(
            f"Checkpoint: tensors of {str(path)!r} must match the shapes its config describes; got "
            f"{str(err).splitlines()[-1].strip()}. The file is damaged or was edited."
        ) from err
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint: tensors of {str(path)!r} must match the model; got missing {list(missing)[:5]} "
            f"and unexpected {list(unexpected)[:5]}. The file is damaged or from another version."
        )
    model.to(device).eval()
    model.run_config = config
    model.checkpoint_meta = {k: v for k, v in meta.items() if k != "config"}
    return model


def with_algorithm_overrides(model: Algorithm, overrides: dict[str, Any] | None) -> Algorithm:
    """The trained ``model`` with some ``algorithm`` fields changed for evaluation only (e.g. a
    transfer model's ``head``, a learner's ``eval_inner_steps``). Fields that would change the
    learned parameters (their names or shapes) are refused."""
    if not overrides:
        return model
    config: RunConfig = model.run_config
    alg = {**config.algorithm.model_dump(mode="json"), **overrides}
    if alg["name"] != config.algorithm.name:
        raise ConfigError(
            f"Eval: algorithm.name must stay {config.algorithm.name!r} when evaluating a checkpoint; got "
            f"{alg['name']!r}. Override adaptation fields only (e.g. algorithm.head)."
        )
    new = make_config({**config.to_dict(), "algorithm": alg})
    rebuilt = build_model(new, pretrained=False)
    try:
        rebuilt.load_state_dict(model.state_dict())
    except RuntimeError as err:
        raise ConfigError(
            f"Eval: algorithm overrides must keep the trained parameters; got {sorted(overrides)} which "
            f"change them ({str(err).splitlines()[-1].strip()}). Override adaptation fields only."
        ) from err
    device = next(iter(model.state_dict().values())).device
    rebuilt.to(device).train(model.training)
    rebuilt.run_config = new
    rebuilt.checkpoint_meta = getattr(model, "checkpoint_meta", {})
    return rebuilt
