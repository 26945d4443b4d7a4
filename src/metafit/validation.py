"""Validated, frozen configuration models and the conversion of validation failures into
one-line :class:`~metafit.errors.ConfigError` messages that name the field and the fix.

Config fields declare default, constraint and help in one place (a pydantic ``Field``); the
YAML schema, the ``--set`` overrides, checkpoint metadata and the invalid-value tests all read
them from there.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

__all__ = ["ConfigModel", "parse_config", "field_names", "set_by_path"]


class ConfigModel(BaseModel):
    """Base of every config section: frozen, unknown keys rejected, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def field_names(model_cls: type[BaseModel]) -> list[str]:
    return list(model_cls.model_fields)


def _model_at(model_cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    cls: Any = model_cls
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = field.annotation
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return cls
    return None


def _format(err: Mapping[str, Any], model_cls: type[BaseModel], where: str) -> str:
    loc = tuple(err.get("loc", ()))
    path = ".".join(str(p) for p in ((where,) if where else ()) + loc)
    kind = err.get("type", "")
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _model_at(model_cls, loc[:-1])
        valid = ", ".join(field_names(parent)) if parent is not None else "see the documentation"
        return (
            f"Config: unknown key {path!r}; valid keys here: {valid}. "
            "Remove the key or fix its spelling."
        )
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        return (
            f"Config: {path} must be one of {expected}; got {value!r}. "
            "Choose one of the listed values."
        )
    if kind == "missing":
        return f"Config: {path} is required but missing. Add it to the config file or pass --set {path}=VALUE."
    msg = str(err.get("msg", "is invalid"))
    msg = msg[0].lower() + msg[1:] if msg else msg
    msg = msg.replace("input should be", "must be").replace("value error, ", "")
    return (
        f"Config: {path} {msg}; got {value!r}. "
        f"Fix the value in the config file or pass --set {path}=VALUE."
    )


def parse_config(model_cls: type[BaseModel], data: Any, where: str = "") -> Any:
    """Validate ``data`` into ``model_cls``; raise a one-line :class:`ConfigError` if invalid."""
    if isinstance(data, model_cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Config: {where or 'the config'} must be a mapping of keys to values; got {data!r}. "
            "Write it as 'key: value' lines in YAML."
        )
    try:
        return model_cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format(err.errors()[0], model_cls, where)) from None


def set_by_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted='a.b'``, creating mappings on the way."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"Config: override key must be dotted names like train.meta_lr; got {dotted!r}. Fix the --set argument.")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"Config: {'.'.join(parts[:-1])} must be a section to set {dotted!r}; got {child!r}. "
                "Fix the --set key."
            )
        node = child
    node[parts[-1]] = value
