"""The one checkpoint metadata schema (JSON in the safetensors header), for every learner kind.

Every metafit checkpoint carries one envelope, :class:`CheckpointMeta`: format and versions,
``kind`` (which learner kind wrote it: ``few-shot``, ``rl``, or a kind registered with
:func:`register_kind`), the kind's registry key (``algorithm`` or ``learner``), ``config``,
``step``, ``metrics`` and, in a resumable ``last.safetensors``, ``train_state``: the training
loop's own state (best score and step, training time, averaging window, monitor, events), the
optimizer (``param_groups`` and per-parameter scalars; its tensors are ``optim.*`` entries) and
the learner kind's own part (``run``). Each kind declares what it requires beyond the envelope in
one schema (:data:`CHECKPOINT_KINDS`): few-shot checkpoints name an ``algorithm`` and may hold an
image format, a calibration and the data split; meta-RL ones name a ``learner``.

Files of no declared kind are read as envelopes only (e.g. the RL² weights that
``benchmarks/rl2.py --save-weights`` keeps). Checkpoints written before the one loop (few-shot
ones without ``kind``, and both kinds' earlier ``train_state`` layouts) are read through
:func:`upgrade_meta`, which rewrites them into this layout before validation.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, create_model

from ..errors import CheckpointError
from ..validation import ConfigModel, _format
from .evaluate import EvalResult

__all__ = ["CHECKPOINT_KINDS", "CheckpointMeta", "EnvelopeMeta", "FewShotMeta", "ImageFormatMeta", "MetaModel",
           "OpenMetaModel", "RLMeta", "TrainStateMeta", "kind_of", "register_kind", "upgrade_meta",
           "validate_kind", "validate_meta"]

FORMAT = "metafit-checkpoint"
FORMAT_VERSION = 1
#: the largest image side a data source accepts (``image_size <= 1024``); a stored image format
#: is also checked against the one its config describes
MAX_IMAGE_SIZE = 1024
#: the smallest softmax temperature accepted: logits / T must stay finite in float32 (any larger
#: finite T is valid; calibrating a near-uniform model fits very large ones)
MIN_TEMPERATURE = 1e-30


class MetaModel(ConfigModel):
    """Base of the checkpoint metadata schemas: like a config section, but strict (a string is
    not a number, a float not an integer). Sections whose keys are passed on as keyword
    arguments forbid unknown keys; the others (``Open``) keep them for newer writers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


class OpenMetaModel(MetaModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True, validate_default=True)


def validate_meta(schema: type[MetaModel], data: Any, where: str, fix: str, owner: str = "Checkpoint") -> Any:
    """``data`` (the metadata ``where`` describes, e.g. "the metadata of 'x.safetensors'")
    validated against ``schema``; otherwise a one-line :class:`CheckpointError` naming the first
    invalid field: ``<owner>: <field> in <where> must be ...; got ... . <fix>``."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise CheckpointError(_format(err.errors()[0], schema, "", owner, fix, within=where)) from None


# -- the envelope and the loop's state ----------------------------------------------------------
_Pid = typing.Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]
_Scalar = typing.Union[bool, int, float, str, None]


class ParamGroupMeta(OpenMetaModel):
    params: list[int] = Field(max_length=1_000_000)


class OptimizerStateMeta(OpenMetaModel):
    """An optimizer's ``state_dict()`` less its tensors (``optim.<pid>.<name>`` entries)."""

    name: Literal["adam", "sgd"] | None = None
    param_groups: list[ParamGroupMeta] = Field(default_factory=list, max_length=1000)
    scalars: dict[_Pid, dict[str, _Scalar]] = Field(default_factory=dict)


class MonitorStateMeta(OpenMetaModel):
    losses: list[float] = Field(default_factory=list, max_length=100_000)
    norms: list[float] = Field(default_factory=list, max_length=100_000)
    rollbacks: int = Field(0, ge=0)


class WindowMeta(MetaModel):
    """The training rows' running sums since the last logged row (restored on resume, so the
    next row averages the same steps as in an uninterrupted run)."""

    sums: dict[str, float] = Field(default_factory=dict, max_length=1000)
    n: int = Field(0, ge=0)
    steps: int = Field(0, ge=0)
    seconds: float = Field(0.0, ge=0.0)


class TrainStateMeta(OpenMetaModel):
    """What a resumable checkpoint holds beyond its tensors: the loop's state, the optimizer's,
    and the learner kind's own (``run``, checked by the kind's schema)."""

    optimizer: OptimizerStateMeta = OptimizerStateMeta()
    best_score: float | None = None
    best_step: int = Field(0, ge=0)
    seconds: float = Field(0.0, ge=0.0)
    window: WindowMeta | None = None
    monitor: MonitorStateMeta | None = None
    events: dict[str, int] = Field(default_factory=dict)
    run: dict[str, Any] = Field(default_factory=dict)


class EnvelopeMeta(OpenMetaModel):
    """What every metafit checkpoint's metadata holds, whatever wrote it."""

    format: Literal["metafit-checkpoint"]
    format_version: Literal[1]
    metafit_version: str | None = Field(None, max_length=100)
    kind: str | None = Field(None, max_length=100)
    config: dict[str, Any] | None = None
    step: int | None = Field(None, ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    train_state: TrainStateMeta | None = None


#: the one envelope (the name the kinds' schemas and loaders use)
CheckpointMeta = EnvelopeMeta


# -- the kinds ----------------------------------------------------------------------------------
class ImageFormatMeta(MetaModel):
    size: int = Field(ge=8, le=MAX_IMAGE_SIZE)
    channels: Literal[1, 3]
    invert: bool
    fit: Literal["squash", "crop"] = "squash"


class CalibrationMeta(OpenMetaModel):
    temperature: float = Field(ge=MIN_TEMPERATURE, allow_inf_nan=False)


def _dataclass_schema(cls: type, name: str) -> type[MetaModel]:
    """A strict schema with the fields of dataclass ``cls`` (kept in step with it), NaN allowed
    (an interval of one episode has none)."""
    hints = typing.get_type_hints(cls)
    spec = {}
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING
                   else ... if f.default_factory is dataclasses.MISSING else None)
        hint = hints[f.name] if default is not None else hints[f.name] | None
        spec[f.name] = (hint, default)
    return create_model(name, __base__=MetaModel, **spec)


EvalResultMeta = _dataclass_schema(EvalResult, "EvalResultMeta")
_SplitName = Literal["train", "val", "test"]


class SplitMeta(OpenMetaModel):
    """The classes a run trained, validated and tested on (``Trainer.split``): counts per split,
    names of the small splits, rotations, reflections (mirror images as classes) and how the split was
    made."""

    source: str = Field(max_length=100)
    how: str = Field("", max_length=2000)
    classes: dict[_SplitName, typing.Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    images: dict[_SplitName, typing.Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    rotations: dict[_SplitName, bool] = Field(default_factory=dict)
    reflections: dict[_SplitName, bool] = Field(default_factory=dict)
    names: dict[_SplitName, typing.Annotated[list[typing.Annotated[str, Field(max_length=1000)]],
                                            Field(max_length=10_000)]] = Field(default_factory=dict)


class FewShotRunMeta(OpenMetaModel):
    """The few-shot learner kind's part of ``train_state`` (see ``training/supervised.py``)."""

    best_result: EvalResultMeta | None = None  # type: ignore[valid-type]
    timing: dict[str, float] = Field(default_factory=dict)
    best_weights: Literal["live", "average"] = "live"  # train.weight_average: which weights scored best


class FewShotOptimizerMeta(OptimizerStateMeta):
    name: Literal["adam", "sgd"]  # a few-shot run's optimizer is one of train.optimizer's
    param_groups: list[ParamGroupMeta] = Field(min_length=1, max_length=1000)


class FewShotTrainStateMeta(TrainStateMeta):
    optimizer: FewShotOptimizerMeta
    run: FewShotRunMeta = FewShotRunMeta()


class FewShotMeta(OpenMetaModel):
    """What a few-shot checkpoint holds beyond the envelope (:func:`save_checkpoint`)."""

    algorithm: str = Field(min_length=1, max_length=100)
    config: dict[str, Any]
    step: int = Field(ge=0)
    image_format: ImageFormatMeta | None = None  # absent in checkpoints of older versions
    calibration: CalibrationMeta | None = None
    train_state: FewShotTrainStateMeta | None = None
    split: SplitMeta | None = None  # absent in checkpoints of older versions and for sinusoid data


class RLRunMeta(OpenMetaModel):
    """The meta-RL learner kind's part of ``train_state`` (see ``training/rl_learning.py``)."""

    best_weights: Literal["live", "average"] = "live"
    env_steps: int = Field(0, ge=0)


class RLTrainStateMeta(TrainStateMeta):
    run: RLRunMeta = RLRunMeta()


class RLMeta(OpenMetaModel):
    """What a meta-RL checkpoint holds beyond the envelope (``metafit rl train``)."""

    learner: str = Field(min_length=1, max_length=100)
    config: dict[str, Any]
    step: int = Field(ge=0)
    train_state: RLTrainStateMeta | None = None


#: learner kind -> the schema of what its checkpoints hold beyond the envelope
CHECKPOINT_KINDS: dict[str, type[MetaModel]] = {"few-shot": FewShotMeta, "rl": RLMeta}


def register_kind(kind: str, schema: type[MetaModel]) -> None:
    """Declare a learner kind's checkpoint schema (fields beyond :class:`CheckpointMeta`)."""
    CHECKPOINT_KINDS[kind] = schema


def kind_of(meta: dict) -> str | None:
    """The learner kind of validated metadata: its ``kind``, ``few-shot`` for checkpoints written
    before kinds were recorded (they name an ``algorithm``), None for a file of no kind."""
    return meta.get("kind") or ("few-shot" if "algorithm" in meta else None)


def validate_kind(meta: dict, where: str, fix: str) -> None:
    """Validate ``meta`` (already an envelope) against its kind's schema."""
    kind = kind_of(meta)
    if kind is None:
        return
    if kind not in CHECKPOINT_KINDS:
        raise CheckpointError(
            f"Checkpoint: kind in {where} must be one of {sorted(CHECKPOINT_KINDS)}; got {kind!r}. {fix}")
    validate_meta(CHECKPOINT_KINDS[kind], meta, where, fix)


# -- checkpoints of earlier versions ------------------------------------------------------------
_FEW_SHOT_V0 = ("param_groups", "optimizer_scalars", "best_val", "best_result", "train_seconds", "timing")
_RL_V0 = ("best", "best_iteration", "best_weights", "env_steps")


def _upgrade_train_state(ts: dict) -> dict:
    """A ``train_state`` of either earlier layout (few-shot: flat, ``optimizer`` the optimizer's
    name; meta-RL: ``best``/``best_iteration``/``seconds``) in the one layout; others unchanged."""
    if isinstance(ts.get("optimizer"), str) or any(k in ts for k in _FEW_SHOT_V0):
        out = {"optimizer": {"name": ts.get("optimizer"), "param_groups": ts.get("param_groups"),
                             "scalars": ts.get("optimizer_scalars", {})},
               "best_score": ts.get("best_val"), "best_step": ts.get("best_step", 0),
               "seconds": ts.get("train_seconds", 0.0),
               "run": {"best_result": ts.get("best_result"), "timing": ts.get("timing", {})}}
        window = ts.get("window")
        if isinstance(window, dict):
            sums = {k: window[k] for k in ("loss", "acc") if k in window}
            window = {"sums": sums, **{k: v for k, v in window.items() if k not in ("loss", "acc")}}
        out.update({"window": window, "monitor": ts.get("monitor"), "events": ts.get("events", {})})
        return {k: v for k, v in out.items() if v is not None or k in ("best_score",)}
    if any(k in ts for k in _RL_V0):
        out = {k: v for k, v in ts.items() if k not in _RL_V0}
        out.update({"best_score": ts.get("best"), "best_step": ts.get("best_iteration", 0),
                    "run": {k: ts[k] for k in ("best_weights", "env_steps") if k in ts}})
        return out
    return ts


def upgrade_meta(meta: dict) -> dict:
    """``meta`` in the current layout: a few-shot checkpoint without ``kind`` gets it, and an
    earlier ``train_state`` layout is rewritten (see :func:`_upgrade_train_state`)."""
    if not isinstance(meta, dict):
        return meta
    if "kind" not in meta and "algorithm" in meta:
        meta = {**meta, "kind": "few-shot"}
    ts = meta.get("train_state")
    if isinstance(ts, dict):
        meta = {**meta, "train_state": _upgrade_train_state(ts)}
    return meta
