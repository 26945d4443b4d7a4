"""Search spaces of ``metafit tune``: which config fields to search and over what.

A *space* maps dotted config fields to distributions (YAML or a mapping)::

    train.meta_lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    algorithm.inner_steps: {type: int, low: 1, high: 5}
    train.optimizer: {type: categorical, choices: [adam, sgd]}   # or simply: [adam, sgd]

:func:`load_space` validates it (one line per problem), :func:`check_space` builds the config of
every corner of the space before a trial runs, :func:`best_config` writes the user's config with
the best values set.
"""

from __future__ import annotations

import copy
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ..errors import ConfigError, short_repr
from ..validation import ConfigModel, load_yaml
from ..training.config import RunConfig, apply_overrides, builtin_configs, config_source, load_config

__all__ = ["PARAM_TYPES", "CategoricalParam", "FloatParam", "IntParam", "Param", "best_config", "builtin_spaces",
           "check_space", "load_space", "sample_overrides", "space_dump", "yaml_text"]


_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_SCALAR = (str, int, float, bool, type(None))


def yaml_text(value: Any) -> str:
    """``value`` as the YAML text of a ``key=value`` override (round-trips through yaml.safe_load)."""
    text = yaml.safe_dump(value, default_flow_style=True)
    return text.removesuffix("\n...\n").strip()


def _rule(ok: bool, rule: str, got: Any, fix: str) -> None:
    if not ok:
        raise PydanticCustomError("tune_rule", "{rule}; got {got}. {fix}", {"rule": rule, "got": got, "fix": fix})


class _RangeParam(ConfigModel):
    """A number from [low, high]: both ends are the corners :func:`check_space` builds."""

    def _check_range(self, step_set: bool, log_low: str, log_fix: str, log_ok: bool) -> None:
        _rule(self.low < self.high, "must have low below high", f"low={self.low!r}, high={self.high!r}",
              "Swap low and high, or use --set for a fixed value.")
        _rule(not (self.log and step_set), "must not set both log and step", f"log=true, step={self.step!r}",
              "Drop one of them.")
        _rule(not self.log or log_ok, f"must have low {log_low} with log: true", f"low={self.low!r}", log_fix)

    def candidates(self) -> list:
        """The values every trial's config must accept: both ends of the range."""
        return [self.low, self.high]

    def text(self, value: Any) -> str:
        """``value`` as the YAML text of a ``--set`` override."""
        return yaml_text(value)


class FloatParam(_RangeParam):
    """A float from [low, high], log-uniform with ``log``, on a grid with ``step``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _rules(self):
        self._check_range(self.step is not None, "> 0", "Raise low above zero or drop log.", self.low > 0)
        return self

    def suggest(self, trial, name: str) -> Any:
        """The value Optuna's ``trial`` suggests for the field ``name``."""
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)


class IntParam(_RangeParam):
    """An integer from [low, high] (both included), log-uniform with ``log``, every ``step``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _rules(self):
        self._check_range(self.step != 1, ">= 1", "Raise low to 1 or drop log.", self.low >= 1)
        return self

    def suggest(self, trial, name: str) -> Any:
        """The value Optuna's ``trial`` suggests for the field ``name``."""
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)


class CategoricalParam(ConfigModel):
    """One of ``choices``. Lists or mappings among the choices (e.g. ``backbone.hidden``) are
    given to Optuna as their YAML text."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _rules(self):
        labels = self.labels()
        _rule(len(set(labels)) == len(labels), "must list each choice once", self.choices, "Remove the duplicates.")
        return self

    @property
    def encoded(self) -> bool:
        return not all(isinstance(c, _SCALAR) for c in self.choices)

    def labels(self) -> list:
        return [yaml_text(c) for c in self.choices] if self.encoded else list(self.choices)

    def candidates(self) -> list:
        return self.labels()

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, self.labels())

    def text(self, value: Any) -> str:
        return str(value) if self.encoded else yaml_text(value)


PARAM_TYPES: dict[str, type[ConfigModel]] = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}
Param = FloatParam | IntParam | CategoricalParam


def builtin_spaces() -> dict[str, Path]:
    """Search spaces shipped with metafit (``metafit/configs/spaces/*.yaml``), by name."""
    root = resources.files("metafit") / "configs" / "spaces"
    if not root.is_dir():
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _format_error(err: Mapping[str, Any], key: str, kind: str, where: str) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind_err, value = err.get("type", ""), err.get("input")
    fields = ", ".join(PARAM_TYPES[kind].model_fields)
    if kind_err == "tune_rule":
        return f"Tune: {key} in {where} {err['msg']}"
    if kind_err == "extra_forbidden":
        return (f"Tune: {key}.{loc} in {where} must not be set: a {kind} distribution takes {fields}; got {value!r}. "
                "Remove it or fix its spelling.")
    if kind_err == "missing":
        return (f"Tune: {key}.{loc} in {where} must be given for a {kind} distribution; got nothing. "
                f"Add it (a {kind} distribution takes {fields}).")
    msg = str(err.get("msg", "is invalid"))
    msg = (msg[0].lower() + msg[1:]).replace("input should be", "must be") if msg else msg
    return f"Tune: {key}.{loc} in {where} {msg}; got {value!r}. Fix the value."


def load_space(space: str | os.PathLike | Mapping[str, Any]) -> dict[str, Param]:
    """Read and validate a search space: a YAML file, a built-in space name (see
    :func:`builtin_spaces`) or a mapping. Raises a one-line :class:`ConfigError` naming the
    entry, the rule and the fix."""
    if isinstance(space, Mapping):
        data: Any = dict(space)
        where = "the space"
    else:
        path = Path(space)
        spaces = builtin_spaces()
        if not path.is_file() and str(space) in spaces:
            path = spaces[str(space)]
        if not path.is_file():
            raise ConfigError(
                f"Tune: --space must be a YAML file or a built-in space name; got {str(space)!r}. "
                f"Built-in spaces: {', '.join(sorted(spaces)) or 'none'}."
            )
        where = path.name
        data = load_yaml(path.read_bytes(), repr(str(path)), owner="Tune")
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"Tune: the space ({where}) must be a non-empty mapping of config fields to distributions; got {short_repr(data)}. "
            "Write lines like 'train.meta_lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}'."
        )
    params: dict[str, Param] = {}
    for key, spec in data.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(
                f"Tune: a space key in {where} must be a dotted config field like train.meta_lr; got {key!r}. "
                "Fix the key (`metafit configs --fields` lists every field)."
            )
        if key == "out_dir":
            raise ConfigError(
                f"Tune: the space in {where} must not search out_dir; got {spec!r}. Every trial writes to "
                "<out>/trial-<number>: choose the folder with --out."
            )
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"Tune: {key} in {where} must be a distribution like {{type: float, low: 0.1, high: 1.0}} or a list "
                f"of choices; got {spec!r}. Write it as one of those (use --set for a fixed value)."
            )
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(
                f"Tune: {key}.type in {where} must be one of 'float', 'int', 'categorical'; got {kind!r}. "
                "Add or fix the type."
            )
        try:
            params[key] = PARAM_TYPES[kind].model_validate(dict(spec))
        except ValidationError as err:
            errors = err.errors()  # a misspelt setting first: it usually explains the missing one too
            first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
            raise ConfigError(_format_error(first, key, kind, where)) from None
    return params


def space_dump(params: Mapping[str, Param]) -> str:
    return json.dumps({k: p.model_dump(mode="json") for k, p in params.items()}, sort_keys=True)


def sample_overrides(params: Mapping[str, Param], values: Mapping[str, Any]) -> list[str]:
    return [f"{k}={params[k].text(values[k])}" for k in params]


def check_space(config: Any, params: Mapping[str, Param], overrides: Sequence[str] = ()) -> RunConfig:
    """Refuse, before any trial runs, a space entry that is not a config field or whose range
    the config does not accept: every entry is tried at each end of its range (every choice of a
    categorical), the others at their first value. Returns the config without sampled values."""
    overrides = list(overrides)
    base = load_config(config, overrides)
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    if "out_dir" in set_keys:
        raise ConfigError(
            "Tune: out_dir must not be set with --set; got "
            f"{next(i for i in overrides if i.partition('=')[0].strip() == 'out_dir')!r}. Every trial writes to "
            "<out>/trial-<number>: choose the folder with --out."
        )
    both = sorted(set_keys & set(params))
    if both:
        raise ConfigError(
            f"Tune: a field must be either searched or set with --set; got {', '.join(both)} in both. "
            "Drop the --set or remove the field from the space."
        )
    first = {k: p.candidates()[0] for k, p in params.items()}
    for key, p in params.items():
        for value in p.candidates():
            try:
                load_config(config, overrides + sample_overrides(params, {**first, key: value}))
            except ConfigError as err:
                raise ConfigError(
                    f"Tune: the space entry {key} must be a config field that accepts every value of its range; "
                    f"got {key}={p.text(value)}, which the config refuses: {err} "
                    "(`metafit configs --fields` lists every field.)"
                ) from err
    return base




def best_config(config: Any, params: Mapping[str, Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """The user's config mapping (the YAML file, built-in config or mapping passed to :func:`tune`)
    with only the searched fields set to ``values``: the trials' ``--set`` values (a short budget,
    a data folder) and everything the user left to defaults stay as they were."""
    data = copy.deepcopy(config_source(config, builtin_configs(), "config"))
    return apply_overrides(data, sample_overrides(params, values), "train.meta_lr=0.001")

