"""Checkpoints: one ``.safetensors`` file. Tensors (model, and for resuming: optimizer and RNG
states) are safetensors entries; everything else (format, versions, algorithm, config, step,
metrics, class names) is JSON in the safetensors header metadata. Nothing in a checkpoint can
execute code when loaded. Writes go to a temp file that replaces the target atomically.

Every kind of learner (few-shot, meta-RL) writes the same envelope (:func:`envelope`; the schema
is :mod:`metafit.training.checkpoint_meta`): the training loop writes its checkpoints through
:func:`write_checkpoint`, and the learner kind adds its model tensors and its own fields.

Everything read from a checkpoint is validated before anything is built from it: the JSON
metadata with bounded size and nesting (:func:`metafit.validation.load_json`), then against the
envelope schema and its kind's (the machinery configs use: types, ranges, required fields), the
stored config as a :class:`RunConfig`, and every tensor against the freshly built model's names,
shapes and dtypes (:func:`check_tensors`). Any problem is a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import __version__
from ..algorithms import Algorithm
from ..data import migrate_legacy_data
from ..data.cache import atomic_write_bytes
from ..errors import CheckpointError, ConfigError, short_repr
from ..nn import check_rebuildable
from ..validation import load_json
from .checkpoint_meta import (FORMAT, FORMAT_VERSION, CheckpointMeta, EnvelopeMeta, FewShotMeta, ImageFormatMeta,
                              MetaModel, OpenMetaModel, kind_of, upgrade_meta, validate_kind, validate_meta)
from .config import RunConfig, build_model, make_config, resolve_config

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointMeta", "EnvelopeMeta", "OpenMetaModel", "check_optimizer_state",
           "check_rng_state", "check_tensors", "config_difference", "envelope", "load", "read_checkpoint",
           "remove_stale_temp_files", "save_checkpoint", "stored_config", "update_checkpoint_meta", "validate_meta",
           "with_algorithm_overrides", "join_optimizer_state", "split_optimizer_state", "write_checkpoint"]

logger = logging.getLogger(__name__)


# -- writing ------------------------------------------------------------------------------------
def envelope(kind: str | None, step: int, metrics: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The metadata every checkpoint starts with: format, versions, the learner ``kind``, step and
    metrics; ``fields`` are the kind's own (its registry key, config, ...)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "metafit_version": __version__}
    if kind is not None:
        meta["kind"] = kind
    return {**meta, **fields, "step": int(step), "metrics": metrics or {}}


def few_shot_meta(model: Algorithm, config: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    """``config`` resolved (a pretrained adapter's architecture, so that loading needs no files)
    and what a few-shot checkpoint of ``model`` records about it beyond the envelope."""
    check_rebuildable(model.backbone, config.backbone)
    config = resolve_config(config)
    fmt = config.data.image_format()
    # image_format: how user images are converted for this model (metafit.load / adapt / predict / serve)
    return config, {"algorithm": config.algorithm.name, "config": config.to_dict(),
                    "image_format": fmt.to_dict() if fmt is not None else None}


def save_checkpoint(path: str | os.PathLike, model: Algorithm, config: RunConfig, *, step: int,
                    metrics: dict[str, Any] | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                    extra_meta: dict[str, Any] | None = None) -> Path:
    """Write a few-shot checkpoint of ``model`` (built from ``config``) to ``path``, atomically, and
    return the path. The metadata records the training ``step``, the ``metrics`` given (e.g. the
    validation result) and the resolved config; ``extra_tensors`` are stored beside the model's
    ``model.*`` tensors (e.g. optimizer state) and ``extra_meta`` is merged into the metadata."""
    _, fields = few_shot_meta(model, config)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(extra_tensors or {})
    meta = {**envelope("few-shot", step, metrics, **fields), **(extra_meta or {})}
    return write_checkpoint(path, tensors, meta)


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` with ``meta`` as JSON header metadata, atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    blob = st_save(tensors, metadata={"metafit": json.dumps(meta)})
    atomic_write_bytes(path, lambda f: f.write(blob))
    return path


#: the temp files :func:`metafit.data.cache.atomic_write_bytes` leaves when a process is killed
#: while writing one of a run folder's files (``<name>.<8 random characters>.tmp``)
_TEMP_FILE = re.compile(r"(?:.+\.safetensors|config\.json|report\.json|metrics\.jsonl|metrics\.csv"
                        r"|learning_curve\.png)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that writes into run folder ``folder`` left behind when their process
    was killed (no write of this process is in flight when a run starts); returns them. Other
    files, and folders, are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if _TEMP_FILE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            try:
                entry.unlink()
            except FileNotFoundError:
                continue
            removed.append(entry)
    if removed:
        logger.info("removed %d temp file(s) left by an interrupted write in %s", len(removed), folder)
    return removed


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
    _validate(meta, Path(path))
    target = Path(out) if out is not None else Path(path)
    blob = st_save(tensors, metadata={"metafit": json.dumps(meta)})
    atomic_write_bytes(target, lambda f: f.write(blob))
    return target


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint's tensors (the ``model.*`` entries, prefix removed)."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


# -- reading ------------------------------------------------------------------------------------
def read_safetensors_file(path: Path, owner: str, meta_key: str, expected: str,
                          fix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of the safetensors file ``path`` and the JSON metadata stored under ``meta_key``
    of its header's ``__metadata__`` (None where there is none). An unreadable file is a one-line
    :class:`CheckpointError`: ``<owner>: <path> must be <expected>; got ... <fix>``. Nothing in the
    file is executed: safetensors checks the header's size, JSON, dtypes, shapes and offsets."""
    try:
        blob = path.read_bytes()
        tensors = st_load(blob)
    except (SafetensorError, ValueError, OSError, RuntimeError, OverflowError) as err:
        reason = " ".join(str(err).split())
        raise CheckpointError(
            f"{owner}: {str(path)!r} must be {expected}; got an unreadable or corrupted file ({reason[:200]}). {fix}"
        ) from err
    # safetensors.torch.load does not return metadata: parse the (already checked) JSON header
    n = int.from_bytes(blob[:8], "little")
    header = load_json(blob[8:8 + n], f"{owner}: the header of {str(path)!r}", CheckpointError)
    raw = (header.get("__metadata__") or {}).get(meta_key) if isinstance(header, dict) else None
    meta = load_json(raw, f"{owner}: the metadata of {str(path)!r}", CheckpointError) if isinstance(raw, str) else None
    return tensors, meta


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of the checkpoint at ``path``, the metadata (in the current layout, see
    :func:`~metafit.training.checkpoint_meta.upgrade_meta`) validated against the envelope and
    the schema of its kind (files of no kind: the envelope only); a :class:`CheckpointError` for
    anything else. The tensors are checked
    when a model is built from them (:func:`check_tensors`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint: path must be an existing checkpoint file; got {str(path)!r}. "
            "Pass a .safetensors file written by metafit (e.g. runs/<name>/best.safetensors)."
        )
    tensors, meta = read_safetensors_file(path, "Checkpoint", "metafit", "a safetensors file written by metafit",
                                          "Re-create it, or pass another checkpoint.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"Checkpoint: {str(path)!r} must carry metafit metadata; got a foreign safetensors file. "
            "Pass a checkpoint written by metafit; to use foreign weights as a backbone, load them "
            "into a model yourself."
        )
    if meta.get("format_version") != FORMAT_VERSION or isinstance(meta.get("format_version"), bool):
        raise CheckpointError(
            f"Checkpoint: format_version must be {FORMAT_VERSION}; got {short_repr(meta.get('format_version'))}. "
            "Use the metafit version that wrote it, or re-train."
        )
    meta = upgrade_meta(meta)  # the layout of earlier versions, rewritten
    _validate(meta, path)
    return meta, tensors


_DAMAGED = "The file is damaged or was edited; re-create it, or use the metafit version that wrote it."


def _validate(meta: dict, path: Path, schema: type[MetaModel] | None = None) -> None:
    """Validate ``meta`` against the envelope and the schema its kind declares (or ``schema``)."""
    where = f"the metadata of {str(path)!r}"
    validate_meta(CheckpointMeta, meta, where, _DAMAGED)
    if schema is not None:
        validate_meta(schema, meta, where, _DAMAGED)
    else:
        validate_kind(meta, where, _DAMAGED)


def stored_config(meta: dict[str, Any], path: str | os.PathLike) -> RunConfig:
    """The validated :class:`RunConfig` of a few-shot checkpoint's metadata (a data section of
    metafit 0.1 migrated); a :class:`CheckpointError` naming the invalid field otherwise."""
    _validate(meta, Path(path), FewShotMeta)  # (read_checkpoint accepts any metafit checkpoint)
    try:
        stored = dict(meta["config"])
        stored["data"] = migrate_legacy_data(stored.get("data"))  # checkpoints of metafit 0.1
        return make_config(stored)
    except (ConfigError, KeyError) as err:
        fix = f"Use the metafit version that wrote it ({meta.get('metafit_version')})"
        if "name must be one of" in str(err):  # e.g. a backbone registered by the user's own code
            fix = (f"If it names something your own code registers (register_backbone, a registry line), import "
                   f"that module first (metafit's commands import those named in METAFIT_PLUGINS); else u"
                   f"{fix[1:]}")
        raise CheckpointError(
            f"Checkpoint: the config stored in {str(path)!r} must be valid for this metafit version; "
            f"got: {str(err).rstrip('.')}. {fix}."
        ) from err


def _dims(t: torch.Tensor | torch.Size) -> list[int]:
    return list(t.shape if torch.is_tensor(t) else t)


def check_tensors(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str | os.PathLike,
                  prefix: str = "model.", what: str = "the model its config describes", shapes: bool = True,
                  names: bool = True) -> None:
    """Refuse ``state`` (tensors of checkpoint ``path``, ``prefix`` removed) unless it has exactly
    the names of ``expected`` (a freshly built model's ``state_dict()``), their shapes, and their
    dtypes: a stored tensor of another dtype would be cast silently by ``load_state_dict``."""
    where = str(path)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if names and (missing or unexpected):
        raise CheckpointError(
            f"Checkpoint: tensors of {where!r} must match {what}; got missing "
            f"{[prefix + k for k in missing[:5]]} and unexpected {[prefix + k for k in unexpected[:5]]}. "
            "The file is damaged or from another version."
        )
    for k, want in expected.items():
        have = state.get(k)
        if have is None:
            continue
        if shapes and have.shape != want.shape:
            raise CheckpointError(
                f"Checkpoint: tensors of {where!r} must match the shapes of {what}; got {prefix}{k} of shape "
                f"{_dims(have)} where it has {_dims(want)}. The file is damaged or was edited."
            )
        if have.dtype != want.dtype:
            raise CheckpointError(
                f"Checkpoint: tensor {prefix + k!r} of {where!r} must be {want.dtype} (the dtype the architecture "
                f"declares); got {have.dtype}. The file is damaged or was edited; re-create it."
            )


def check_optimizer_state(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, dict], param_groups: list,
                          optimizer_groups: list, params: Sequence[torch.Tensor] | None,
                          path: str | os.PathLike) -> None:
    """Refuse a stored optimizer state that does not fit an optimizer with groups
    ``optimizer_groups`` (its ``state_dict()['param_groups']``) over ``params``: the same groups
    of the same sizes, per-parameter tensors (``optim.<pid>.<name>``) of their parameter's shape
    and dtype (``step`` counters: a float32 scalar). Without ``params``, these tensors must be
    floating-point (the optimizer would cast others silently)."""
    where = str(path)
    sizes, want = [len(g["params"]) for g in param_groups], [len(g["params"]) for g in optimizer_groups]
    if sizes != want:
        raise CheckpointError(
            f"Checkpoint: the optimizer state of {where!r} must have parameter groups of sizes {want} (this "
            f"model's); got {sizes}. Resume with the config of the run that wrote it."
        )
    ids = [pid for g in param_groups for pid in g["params"]]
    n_params = len(ids) if params is None else len(params)
    if sorted(ids) != list(range(n_params)):
        raise CheckpointError(
            f"Checkpoint: the optimizer's param_groups in {where!r} must number the parameters 0..{n_params - 1} "
            f"once each; got {short_repr(ids)}. The file is damaged or was edited."
        )
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        pid, _, name = key[len("optim."):].partition(".")
        if not (pid.isdigit() and int(pid) < n_params and name):
            raise CheckpointError(
                f"Checkpoint: optimizer tensor names in {where!r} must be optim.<parameter index>.<name> with an index "
                f"below {n_params}; got {key!r}. The file is damaged or was edited."
            )
        if params is None:
            if not value.is_floating_point():
                raise CheckpointError(
                    f"Checkpoint: tensor {key!r} of {where!r} must be floating-point (optimizer state); got "
                    f"{value.dtype}. The file is damaged or was edited."
                )
            continue
        param = params[int(pid)]
        shape, dtype = ((), torch.float32) if name == "step" else (param.shape, param.dtype)
        if value.shape != shape or value.dtype != dtype:
            raise CheckpointError(
                f"Checkpoint: tensor {key!r} of {where!r} must be {dtype} of shape {_dims(torch.Size(shape))} "
                f"(its parameter's); got {value.dtype} of shape {_dims(value)}. The file is damaged or was edited."
            )
    for pid in scalars:
        if int(pid) >= n_params:
            raise CheckpointError(
                f"Checkpoint: optimizer_scalars in {where!r} must name parameter indices below {n_params}; got "
                f"{pid}. The file is damaged or was edited."
            )


def check_rng_state(tensors: Mapping[str, torch.Tensor], name: str, like: torch.Tensor,
                    path: str | os.PathLike, sizes: Sequence[int] = ()) -> torch.Tensor:
    """Checkpoint tensor ``name``: a random generator's state like ``like`` (uint8, the same
    length, or one of ``sizes``)."""
    value = tensors.get(name)
    lengths = [like.numel(), *sizes]
    if value is None or value.dtype != torch.uint8 or value.dim() != 1 or value.numel() not in lengths:
        got = "nothing" if value is None else f"{value.dtype} of shape {_dims(value)}"
        raise CheckpointError(
            f"Checkpoint: tensor {name!r} of {str(path)!r} must be a random generator state (torch.uint8 of "
            f"length {' or '.join(map(str, lengths))}); got {got}. Resume from a last.safetensors written by metafit."
        )
    return value


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_difference(stored: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str],
                      skip: Sequence[str] = ()) -> tuple[str, Any, Any] | None:
    """The first dotted key under ``keys`` (sections or single fields, in that order) whose value
    differs between two config dicts, with both values: ``(key, stored, current)``; ``skip``
    names keys not compared. None when they agree."""
    a, b = _flat(stored), _flat(current)
    for section in keys:
        inside = [k for k in dict.fromkeys([*b, *a]) if k == section or k.startswith(section + ".")]
        for k in inside:
            if k in skip:
                continue
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return k, a.get(k, "<absent>"), b.get(k, "<absent>")
    return None


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Algorithm:
    """Rebuild the trained model of the few-shot checkpoint at ``path`` on ``device``, ready for
    ``adapt``/``predict`` (eval mode); a meta-RL or other checkpoint is a :class:`CheckpointError`.

    The returned module carries ``run_config`` (the validated :class:`RunConfig`) and
    ``checkpoint_meta`` (step, metrics, ...).
    """
    meta, tensors = read_checkpoint(path)
    if kind_of(meta) == "rl":
        raise CheckpointError(
            f"Checkpoint: {str(path)!r} must be a few-shot checkpoint here; got a meta-RL checkpoint "
            f"({meta.get('learner')}). Use metafit rl eval, or metafit.training.rl_run.load_rl."
        )
    if kind_of(meta) not in ("few-shot", None):
        raise CheckpointError(
            f"Checkpoint: {str(path)!r} must be a few-shot checkpoint here; got one of kind {meta['kind']!r}. "
            "Load it with the loader of that kind."
        )
    config = stored_config(meta, path)
    recorded, derived = meta.get("image_format"), config.data.image_format()
    if recorded is not None and (derived is None
                                 or ImageFormatMeta.model_validate(recorded).model_dump() != derived.to_dict()):
        raise CheckpointError(
            f"Checkpoint: image_format in {str(path)!r} must be the one its config describes "
            f"({derived.to_dict() if derived else None}); got {short_repr(recorded)}. The file was edited; "
            "re-create it."
        )
    model = build_model(config, pretrained=False)  # the checkpoint holds the weights: no weights file read
    state = model_state(tensors)
    check_tensors(state, model.state_dict(), path)
    model.load_state_dict(state)
    model.to(device).eval()
    model.run_config = config
    model.checkpoint_meta = {k: v for k, v in meta.items() if k != "config"}
    return model


def with_algorithm_overrides(model: Algorithm, overrides: dict[str, Any] | None) -> Algorithm:
    """The trained ``model`` with some ``algorithm`` fields changed for evaluation only (e.g. a
    transfer model's ``head``, a learner's ``eval_inner_steps``): ``overrides`` maps ``algorithm``
    field names to new values (None or empty: ``model`` is returned as it is). Returns a rebuilt
    model with the same weights, device and mode. Fields that would change the learned parameters
    (their names or shapes), or the algorithm's name, are refused with a ConfigError. Where the
    overrides change the algorithm's config, the rebuilt model's ``checkpoint_meta`` leaves out the
    checkpoint's ``calibration``: its temperature was fitted on the logits the overrides change."""
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
    meta = getattr(model, "checkpoint_meta", {})
    if new.algorithm != config.algorithm and "calibration" in meta:
        # the temperature was fitted on the checkpoint's own logits, not on those the overrides change
        meta = {k: v for k, v in meta.items() if k != "calibration"}
    rebuilt.checkpoint_meta = meta
    return rebuilt
