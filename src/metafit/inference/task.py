"""An adapted task: a model adapted to one user's labelled examples, ready to predict, saved
and reloaded without its support set (safetensors tensors and JSON metadata; nothing executes)."""

from __future__ import annotations

import json
import os
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from safetensors import SafetensorError
from safetensors.torch import save as st_save

from .. import __version__
from ..algorithms import Adapted
from ..data.cache import atomic_write_bytes
from ..data.store import PolarityUse, check_polarity
from ..errors import CheckpointError, TaskError, short_repr
from ..training.checkpoint import OpenMetaModel, read_safetensors_file, validate_meta
from .model import Model, Prediction, load_model

__all__ = ["AdaptedTask", "is_task_file", "load_task"]

TASK_FORMAT = "metafit-task"
TASK_FORMAT_VERSION = 1


class TaskMeta(OpenMetaModel):
    """The metadata of a saved task (:meth:`AdaptedTask.save`), validated before anything is
    built from it (the tensors are checked against the model in :func:`load_task`)."""

    format: Literal["metafit-task"]
    format_version: Literal[1]
    metafit_version: str | None = Field(None, max_length=100)
    algorithm: str = Field(min_length=1, max_length=100)
    adapted_type: str = Field(min_length=1, max_length=100)
    values: dict[str, bool | int | float | str | None] = Field(default_factory=dict, max_length=100)
    dict_fields: list[str] = Field(default_factory=list, max_length=100)
    class_names: list[str | int] = Field(min_length=2, max_length=100_000)
    checkpoint: str | None = Field(None, max_length=4096)
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    polarity: Literal["auto", "as_trained", "flip"] = "auto"  # absent in task files of older versions

class AdaptedTask:
    """A model adapted to one task: predicts its classes; :meth:`save` keeps it for later.

    Made by :meth:`Model.adapt` or :func:`load_task` rather than by hand: ``model``, the
    :class:`Model`; ``adapted``, the algorithm's :class:`~metafit.algorithms.Adapted` state;
    ``class_names``, the user's labels in class order; ``polarity``, the one queries are read with by
    default; ``support_polarity``, what the support set was read with (None for a loaded task).
    """

    def __init__(self, model: Model, adapted: Adapted, class_names: tuple, polarity: str = "auto",
                 support_polarity: PolarityUse | None = None) -> None:
        self.model = model
        self.adapted = adapted
        self.class_names = tuple(class_names)
        #: the polarity queries are read with unless predict is told otherwise (the one adapt used)
        self.polarity = check_polarity(polarity, "Task")
        #: what the support set was read with (None: a loaded task, or vectors)
        self.support_polarity = support_polarity

    @property
    def n_classes(self) -> int:
        """The number of classes of the task."""
        return len(self.class_names)

    def logits(self, images: Any, polarity: str | None = None) -> torch.Tensor:
        """The raw scores ``[N, n_classes]`` (float32, uncalibrated) of ``images`` (paths, PIL images,
        arrays or tensors), read with ``polarity`` (None: the task's own)."""
        return self._logits(images, polarity)[0]

    def _logits(self, images: Any, polarity: str | None) -> tuple[torch.Tensor, PolarityUse]:
        x, used = self.model.images_polarity(images, self.polarity if polarity is None else polarity)
        with torch.no_grad():
            logits = self.model.algorithm.predict(self.adapted, x).float()
        if logits.shape[-1] != self.n_classes:  # a loaded task whose class names do not fit its tensors
            raise TaskError(
                f"Predict: the adapted task must score each of its {self.n_classes} classes; got {logits.shape[-1]} "
                "scores per image. The task file is damaged or was edited; adapt again."
            )
        return logits, used

    def predict(self, images: Any, batch_size: int = 256, progress: Callable[[int], Any] | None = None,
                abstain_below: float | None = None, polarity: str | None = None) -> Prediction:
        """Class names and probabilities of ``images``, converted and run ``batch_size`` at a time;
        with ``abstain_below`` in (0, 1], images whose top probability is lower get label None.
        ``progress``, if given, is called with the number of images of each batch done.
        ``polarity`` (``auto``, ``as_trained``, ``flip``) defaults to the one the task was adapted
        with; ``prediction.polarity`` says what was used. Returns a :class:`Prediction`."""
        check_polarity(self.polarity if polarity is None else polarity, "Predict",
                       "Pass polarity='auto', 'as_trained' or 'flip' (or None: the task's own).")
        if abstain_below is not None and not 0.0 < abstain_below <= 1.0:
            raise TaskError(
                f"Predict: abstain_below must be a probability in (0, 1]; got {abstain_below!r}. "
                "Pass e.g. 0.5, or None to always answer."
            )
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
            chunks = [images]
        else:
            chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        probs, used = [], None
        for chunk in chunks:
            logits, u = self._logits(chunk, polarity)
            used = u if used is None else used.merge(u)
            probs.append(torch.softmax(logits / self.model.temperature, dim=-1).cpu())
            if progress is not None:
                progress(len(chunk) if isinstance(chunk, (list, tuple)) else 1)
        p = torch.cat(probs)
        top, idx = p.max(-1)
        labels = [None if abstain_below is not None and float(q) < abstain_below else self.class_names[i]
                  for q, i in zip(top.tolist(), idx.tolist())]
        return Prediction(labels, p, self.class_names, abstain_below, used)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the adapted task to ``path`` (tensors in safetensors, names and the checkpoint it
        belongs to as JSON metadata); atomic; returns the path. Loading needs the same checkpoint (its
        digest is checked)."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        dicts: list[str] = []
        for f in fields(self.adapted):
            v = getattr(self.adapted, f.name)
            if isinstance(v, torch.Tensor):
                tensors[f"adapted.{f.name}"] = v.detach().cpu().contiguous().clone()
            elif isinstance(v, dict):
                dicts.append(f.name)
                for k, t in v.items():
                    tensors[f"adapted.{f.name}.{k}"] = t.detach().cpu().contiguous().clone()
            else:
                values[f.name] = v
        meta = {
            "format": TASK_FORMAT, "format_version": TASK_FORMAT_VERSION, "metafit_version": __version__,
            "algorithm": self.model.config.algorithm.name, "adapted_type": type(self.adapted).__name__,
            "values": values, "dict_fields": dicts, "class_names": list(self.class_names),
            "checkpoint": str(self.model.checkpoint) if self.model.checkpoint else None,
            "checkpoint_sha256": self.model.checkpoint_digest(), "polarity": self.polarity,
        }
        blob = st_save(tensors, metadata={"metafit_task": json.dumps(meta)})
        atomic_write_bytes(path, lambda f: f.write(blob))
        return path

    def __repr__(self) -> str:
        return (f"AdaptedTask({self.model.config.algorithm.name}, classes={list(self.class_names)}, "
                f"polarity={self.polarity!r})")


def _adapted_types() -> dict[str, type]:
    """The :class:`Adapted` dataclasses by name (not the marker base itself)."""
    out, todo = {}, list(Adapted.__subclasses__())
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo += cls.__subclasses__()
    return out


def _task_raw(path: Path) -> str | None:
    """The raw JSON text of a task file's metadata (None: not a task file); safetensors checks the
    header, nothing is parsed here."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("metafit_task")
    return raw if isinstance(raw, str) else None


def is_task_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a task saved by :meth:`AdaptedTask.save` (not a model checkpoint)."""
    try:
        return Path(path).is_file() and _task_raw(Path(path)) is not None
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def load_task(path: str | os.PathLike, checkpoint: str | os.PathLike | Model | None = None,
              device: str | torch.device = "cpu") -> AdaptedTask:
    """An :class:`AdaptedTask` saved by :meth:`AdaptedTask.save`. The model comes from
    ``checkpoint`` (a path or a loaded :class:`Model`), else from the path recorded in the file;
    either way it must be the checkpoint the task was adapted with (sha256 checked). A model loaded
    here goes to ``device``. Unreadable, edited or mismatched files are a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Task: {str(path)!r} must be a saved task file; got no file there. Check the path.")
    tensors, meta = read_safetensors_file(path, "Task", "metafit_task", "a task file written by task.save()",
                                          "Adapt again and save.")
    if not isinstance(meta, dict) or meta.get("format") != TASK_FORMAT:
        raise CheckpointError(
            f"Task: {str(path)!r} must be a task file written by task.save(); got a safetensors file without "
            "metafit task metadata. Pass a saved task (a model checkpoint goes to metafit.load)."
        )
    task_meta: TaskMeta = validate_meta(TaskMeta, meta, f"the metadata of {str(path)!r}",
                                        "The file is damaged or was edited; adapt again and save.", owner="Task")
    if isinstance(checkpoint, Model):
        model = checkpoint
    else:
        source = checkpoint or meta.get("checkpoint")
        if not source or not (Path(source).is_file() or Path(source).is_dir()):
            raise CheckpointError(
                f"Task: the model checkpoint of {str(path)!r} must be available; got {str(source)!r}, which does "
                "not exist. Pass checkpoint=PATH (the file the task was adapted with)."
            )
        model = load_model(source, device)
    want = meta.get("checkpoint_sha256")
    if want and model.checkpoint_digest() not in (None, want):
        raise CheckpointError(
            f"Task: {str(path)!r} must be used with the checkpoint it was adapted with; got {str(model.checkpoint)!r} "
            "whose contents differ. Pass that checkpoint, or adapt again with this one."
        )
    if meta.get("algorithm") != model.config.algorithm.name:
        raise CheckpointError(
            f"Task: {str(path)!r} must be used with a {meta.get('algorithm')} model; got a "
            f"{model.config.algorithm.name} model. Pass the checkpoint the task was adapted with."
        )
    cls = _adapted_types().get(meta["adapted_type"])
    if cls is None:
        raise CheckpointError(
            f"Task: {str(path)!r} must hold a known adapted state; got type {short_repr(meta['adapted_type'])}. "
            "Use the metafit version that wrote it."
        )
    kwargs = _adapted_fields(cls, task_meta, tensors, model, path)
    try:
        adapted = cls(**kwargs)
    except TypeError as err:
        raise CheckpointError(
            f"Task: {str(path)!r} must hold every field of {cls.__name__}; got {sorted(kwargs)} ({err}). "
            "The file is damaged or from another version; adapt again."
        ) from err
    return AdaptedTask(model, adapted, tuple(task_meta.class_names), task_meta.polarity)


def _adapted_fields(cls: type, meta: TaskMeta, tensors: dict[str, torch.Tensor], model: Model,
                    path: Path) -> dict[str, Any]:
    """The keyword arguments of ``cls`` (an :class:`Adapted` dataclass) from a task file: every
    value of the field's declared type, every tensor of the model's dtype (a state entry's own,
    for fast weights named like one), every file entry used; a CheckpointError otherwise."""
    where, fix = f"{str(path)!r}", "The file is damaged or was edited; adapt again and save."
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    state = dict(model.algorithm.state_dict())
    for key, value in list(state.items()):  # fast weights are named inside a submodule (blocks.0.weight)
        for i, ch in enumerate(key):
            if ch == ".":
                state.setdefault(key[i + 1:], value)
    float_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    kwargs: dict[str, Any] = {}
    for name, value in meta.values.items():
        if name not in names:
            raise CheckpointError(f"Task: values in {where} must be fields of {cls.__name__} "
                                  f"({', '.join(sorted(names))}); got {short_repr(name)}. {fix}")
        try:
            kwargs[name] = TypeAdapter(hints[name], config=_ANY_TYPE).validate_python(value, strict=True)
        except ValidationError:
            raise CheckpointError(f"Task: values.{name} in {where} must be of type {hints[name]}; got "
                                  f"{short_repr(value)}. {fix}") from None
    dev = model.device
    used = set()
    for f in fields(cls):
        if f.name in meta.dict_fields:
            prefix = f"adapted.{f.name}."
            entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            used.update(prefix + k for k in entries)
            kwargs[f.name] = {k: _adapted_tensor(f"{prefix}{k}", v, state.get(k, None), float_dtype, where, fix).to(dev)
                              for k, v in entries.items()}
        elif f"adapted.{f.name}" in tensors:
            used.add(f"adapted.{f.name}")
            kwargs[f.name] = _adapted_tensor(f"adapted.{f.name}", tensors[f"adapted.{f.name}"], None, float_dtype,
                                             where, fix).to(dev)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"Task: the tensors of {where} must all be fields of {cls.__name__}; got "
                              f"{short_repr(unused)}. {fix}")
    return kwargs


_ANY_TYPE = ConfigDict(arbitrary_types_allowed=True)  # fields may be tensors (only None is stored as a value)


def _adapted_tensor(name: str, value: torch.Tensor, like: torch.Tensor | None, float_dtype: torch.dtype,
                    where: str, fix: str) -> torch.Tensor:
    want = like.dtype if like is not None else float_dtype
    if value.dtype != want:
        raise CheckpointError(f"Task: tensor {name!r} of {where} must be {want} (the model's dtype); got "
                              f"{value.dtype}. {fix}")
    return value
