"""Validated, frozen configuration models and the conversion of validation failures into
one-line :class:`~metafit.errors.ConfigError` messages that name the field and the fix.

Config fields declare default, constraint and help in one place (a pydantic ``Field``); the
YAML schema, the ``--set`` overrides, checkpoint metadata and the invalid-value tests all read
them from there.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from typing import Any, Iterable, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError, short_repr

__all__ = ["ConfigModel", "parse_config", "field_names", "set_by_path", "load_yaml", "load_json", "named_section",
           "did_you_mean", "MAX_NESTING", "MAX_DOCUMENT_BYTES", "MAX_INT"]

#: deepest nesting of lists/mappings accepted in a config, override, metadata or request field
MAX_NESTING = 32
#: largest YAML/JSON text accepted as a config, an override or checkpoint metadata
MAX_DOCUMENT_BYTES = 16 * 2**20


def _check_depth(value: Any, where: str, error: type[Exception]) -> None:
    """Refuse containers nested deeper than :data:`MAX_NESTING` (iteratively: no recursion)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, tuple, dict)):
            if depth >= MAX_NESTING:
                raise error(
                    f"{where} must nest lists/mappings at most {MAX_NESTING} levels deep; got deeper nesting. "
                    "Flatten the value."
                )
            items = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in items)


def _as_text(data: str | bytes, where: str, error: type[Exception]) -> str:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise error(
            f"{where} must be at most {MAX_DOCUMENT_BYTES // 2**20} MiB; got {len(data) / 2**20:.1f} MiB. "
            "Use a smaller file."
        )
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise error(
                f"{where} must be UTF-8 text; got an undecodable byte at offset {err.start}. "
                "Save the file as UTF-8."
            ) from None
    return data


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (no 'billion laughs'), duplicate keys and deep
    nesting while composing, before any value is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not accepted; write the value out",
                                       problem_mark=mark)
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise yaml.MarkedYAMLError(problem=f"nesting deeper than {MAX_NESTING} levels is not accepted",
                                       problem_mark=self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # noqa: ANN001
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: construct_mapping names it below
                continue
            if duplicate:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {short_repr(key)}; keep one",
                                           problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(data: str | bytes, where: str, owner: str = "Config") -> Any:
    """Parse YAML ``data`` (a config file's text or an override value) safely: no code, no
    aliases, no duplicate keys, bounded size and nesting; any problem is a one-line
    :class:`ConfigError` naming ``where`` (e.g. the file name) and the line, started by ``owner``.
    Returns the parsed value (usually a dict).

    >>> load_yaml("inner:\\n  steps: 5\\n  lr: [0.4, 0.1]", "config.yaml")
    {'inner': {'steps': 5, 'lr': [0.4, 0.1]}}
    >>> load_yaml("a: 1\\na: 2", "config.yaml")
    Traceback (most recent call last):
    ...
    metafit.errors.ConfigError: Config: config.yaml must be valid YAML; line 2, column 1: duplicate key 'a'...
    """
    text = _as_text(data, f"{owner}: {where}", ConfigError)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
        raise ConfigError(f"{owner}: {where} must be valid YAML; {at}{problem}. Fix the YAML there.") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(
            f"{owner}: {where} must be valid YAML; got {type(err).__name__}. Fix the YAML."
        ) from None


def load_json(data: str | bytes, where: str, error: type[Exception] = ConfigError) -> Any:
    """Parse JSON ``data`` with the same bounds as :func:`load_yaml` (size, nesting); any
    problem raises ``error`` (an exception class) with a one-line message naming ``where``.
    Returns the parsed value.

    >>> load_json('{"labels": ["cat", "dog"]}', "the request")
    {'labels': ['cat', 'dog']}
    """
    text = _as_text(data, where, error)
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where} must nest at most {MAX_NESTING} levels deep; got deeper nesting. "
                    "Flatten the value.") from None
    except ValueError as err:
        raise error(f"{where} must be valid JSON; got {err}. Fix or regenerate it.") from None
    _check_depth(value, where, error)
    return value


#: largest integer any config field accepts unless it declares its own bound (fits a C int)
MAX_INT = 2**31 - 1


class ConfigModel(BaseModel):
    """Base of every config section: frozen, unknown keys rejected, defaults validated, floats
    finite, integers (also inside lists) at most :data:`MAX_INT` unless a field says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_ints(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and any(hasattr(m, "le") or hasattr(m, "lt") for m in field.metadata):
            return value  # the field declares its own upper bound
        items = value if isinstance(value, (list, tuple)) else (value,)
        for v in items:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
                raise ValueError(f"must be at most {MAX_INT} in magnitude")
        return value


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """``" Did you mean 'x'?"`` naming the choices closest to ``value`` (a misspelt key or name,
    compared case-insensitively with :func:`difflib.get_close_matches`), or ``""`` when none is close.
    ``choices``: the valid keys or names (non-strings are ignored). Meant to be appended to an error message.

    >>> did_you_mean("mmal", ["maml", "anil", "protonet"])
    " Did you mean 'maml'?"
    >>> did_you_mean("xyz", ["maml"])
    ''
    """
    if not isinstance(value, str) or not value:
        return ""
    by_lower: dict[str, str] = {}
    for choice in choices:
        if isinstance(choice, str):
            by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(value[:200].lower(), list(by_lower), n=2, cutoff=0.6)
    close = [by_lower[c] for c in close if by_lower[c] != value]
    if not close:
        return ""
    return f" Did you mean {' or '.join(repr(c) for c in close)}?"


def _literal_choices(expected: str) -> list[str]:
    """The quoted string choices of pydantic's ``expected`` text (``"'adam' or 'sgd'"``)."""
    return re.findall(r"'((?:[^'\\]|\\.)*)'", expected)


def field_names(model_cls: type[BaseModel]) -> list[str]:
    """The names of the fields of ``model_cls`` (a pydantic model class), in declaration order."""
    return list(model_cls.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation names (``X``, ``X | None``), or None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_at(model_cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    cls: Any = model_cls
    for part in loc:
        model = _model_in(cls)
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        cls = field.annotation
    return _model_in(cls)


def _format(err: Mapping[str, Any], model_cls: type[BaseModel], where: str, owner: str = "Config",
            fix: str | None = None, within: str | None = None) -> str:
    """The one-line message of a pydantic error ``err`` of ``model_cls``: ``<owner>: <field> must
    be ...; got ... . <fix>``. A config names fields by their dotted path under section ``where``
    (the default fix says how to ``--set`` it); a stored document (checkpoint or task metadata)
    passes ``within`` (e.g. "the metadata of 'x.safetensors'") and names them ``<path> in <within>``."""
    loc = tuple(err.get("loc", ()))
    kind, value, ctx = err.get("type", ""), err.get("input"), err.get("ctx") or {}
    msg = str(err.get("msg", "is invalid"))
    msg = (msg[0].lower() + msg[1:] if msg else msg).replace("input should be", "must be").replace("value error, ", "")
    parent = _model_at(model_cls, loc[:-1]) if kind == "extra_forbidden" else None
    valid = ", ".join(field_names(parent)) if parent is not None else "see the documentation"
    if within is not None:
        dotted = ".".join(str(p) for p in loc)
        field = f"{dotted} in {within}" if dotted else within
        fix = fix or "Fix the file."
        if kind == "missing":
            return f"{owner}: {field} must be present; got nothing. {fix}"
        if kind == "extra_forbidden":
            return f"{owner}: {field} must not exist (valid keys: {valid}); got {short_repr(value)}. {fix}"
        if kind == "literal_error":
            return f"{owner}: {field} must be one of {ctx.get('expected', '')}; got {short_repr(value)}. {fix}"
        if not msg.startswith("must"):
            msg = f"must be valid ({msg})"
        return f"{owner}: {field} {msg}; got {short_repr(value)}. {fix}"
    keys = ((where,) if where else ()) + tuple(p for p in loc if not isinstance(p, int))
    path = "".join(f"[{p}]" if isinstance(p, int) else f"{'.' if i else ''}{p}"
                   for i, p in enumerate(((where,) if where else ()) + loc))
    set_key = ".".join(str(p) for p in keys)  # what --set takes: list items are set as a whole list
    if kind == "extra_forbidden":
        hint = did_you_mean(loc[-1], field_names(parent)) if parent is not None and loc else ""
        return (
            f"{owner}: unknown key {path!r}; valid keys here: {valid}.{hint} "
            f"{fix or 'Remove the key or fix its spelling.'}"
        )
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        hint = did_you_mean(value, _literal_choices(expected))
        return (
            f"{owner}: {path} must be one of {expected}; got {short_repr(value)}.{hint} "
            f"{fix or 'Choose one of the listed values.'}"
        )
    if kind == "missing":
        return f"{owner}: {path} is required but missing. Add it to the config file or pass --set {set_key}=VALUE."
    if not loc:  # a rule across several fields: the message names them and the fix
        return f"{owner}: {where + ': ' if where else ''}{msg}."
    return (
        f"{owner}: {path} {msg}; got {short_repr(value)}. "
        f"{fix or f'Fix the value in the config file or pass --set {set_key}=VALUE.'}"
    )


def parse_config(model_cls: type[BaseModel], data: Any, where: str = "", owner: str = "Config",
                 fix: str | None = None) -> Any:
    """Validate ``data`` (a mapping; ``None`` means empty) into ``model_cls`` and return the model
    (``data`` itself when it already is one); raise a one-line :class:`ConfigError` if invalid.
    ``where``: the dotted section the fields live under, used to name them (``inner.steps``);
    ``owner`` starts the message, ``fix`` replaces the default advice.

    >>> from pydantic import Field
    >>> class Inner(ConfigModel):
    ...     steps: int = Field(5, ge=1, description="gradient steps")
    ...     lr: float = 0.4
    >>> parse_config(Inner, {"steps": 3}, where="inner")
    Inner(steps=3, lr=0.4)
    >>> parse_config(Inner, {"steps": 0}, where="inner")
    Traceback (most recent call last):
    ...
    metafit.errors.ConfigError: Config: inner.steps must be ...; got 0. ...
    """
    if isinstance(data, model_cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Config: {where or 'the config'} must be a mapping of keys to values; got {short_repr(data)}. "
            "Write it as 'key: value' lines in YAML."
        )
    try:
        return model_cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format(err.errors()[0], model_cls, where, owner, fix)) from None


def named_section(data: Any, section: str, names: Mapping[str, Any], default: str) -> tuple[str, dict]:
    """A registry-selected config section (``algorithm``, ``backbone``, ``data``) as
    ``(name, mapping)``: ``None`` means the default, a bare name ``maml`` means ``{name: maml}``;
    anything else that is not a mapping, or a name not in ``names``, is a one-line error.
    ``data``: the section as written; ``section``: its key, for messages; ``names``: the registry
    (only its keys are used); ``default``: the name used when none is given. The mapping returned is
    a copy of ``data`` (it may lack ``name`` when the default applied).

    >>> named_section("maml", "algorithm", {"maml": None, "protonet": None}, default="protonet")
    ('maml', {'name': 'maml'})
    >>> named_section(None, "algorithm", {"maml": None, "protonet": None}, default="protonet")
    ('protonet', {})
    """
    if data is None:
        data = {}
    elif isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Config: {section} must be a mapping with a name (e.g. '{section}: {{name: {default}}}') or a bare "
            f"name; got {short_repr(data)}. Write it as a section of key: value lines."
        )
    data = dict(data)
    name = data.get("name", default)
    if not isinstance(name, str) or name not in names:
        raise ConfigError(
            f"Config: {section}.name must be one of {sorted(names)}; got {short_repr(name)}.{did_you_mean(name, names)} "
            f"Choose one of the listed {section} names."
        )
    return name, data


def set_by_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted='a.b'``, creating mappings on the way; ``tree``
    is changed in place and nothing is returned. A path through a non-mapping is a :class:`ConfigError`.

    >>> tree = {"train": {"steps": 10}}
    >>> set_by_path(tree, "train.meta_lr", 0.001)
    >>> tree
    {'train': {'steps': 10, 'meta_lr': 0.001}}
    """
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
                f"Config: {'.'.join(parts[:-1])} must be a section to set {dotted!r}; got {short_repr(child)}. "
                "Fix the --set key."
            )
        node = child
    node[parts[-1]] = value
