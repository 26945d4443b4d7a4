"""Your own backbones in the backbone registry, so that checkpoints rebuild them.

A checkpoint stores a model's tensors and the config that rebuilds it; for the backbone that is a
registry name and its settings. :func:`register_backbone` adds a factory (a function or an
``nn.Module`` class taking ``in_channels``, ``image_size`` and keyword settings) to
:data:`metafit.nn.BACKBONES`: a config section ``backbone: {name: NAME, ...settings}`` then builds
it (``metafit train``, ``metafit.load``), and every module the returned factory builds in Python
records its name and settings, so a model built around it trains, checkpoints and reloads through
the same path::

    @register_backbone("tiny-cnn")
    def tiny_cnn(in_channels: int, image_size: int, width: int = 16) -> nn.Module:
        net = nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.out_features = width
        return net

    model = build_algorithm(ProtoNetConfig(), tiny_cnn(1, 28, width=32))   # records {name: tiny-cnn, width: 32}

The settings become a config class (fields from the factory's signature: annotation, default);
``in_channels`` and ``image_size`` come from the data. Register the backbone in the module that
defines it: loading a checkpoint needs that module imported first.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Literal

from pydantic import Field, create_model
from torch import nn

from ..errors import ConfigError, short_repr
from .base import BackboneConfig

__all__ = ["backbone_spec", "check_rebuildable", "register_backbone", "unregister_backbone"]

#: the data's input shape, passed to a factory that names these parameters
DATA_PARAMETERS = ("in_channels", "image_size")
_TAG = "metafit_backbone"


def _settings_config(name: str, factory: Callable, signature: inspect.Signature) -> type[BackboneConfig]:
    fields: dict[str, Any] = {"name": (Literal[name], Field(name, description="the backbone's registry key"))}
    for p in signature.parameters.values():
        if p.name in DATA_PARAMETERS:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ConfigError(
                f"Backbone: the settings of factory {name!r} must be named parameters; got {p}. Write them as "
                "keyword parameters with defaults, e.g. width: int = 16.")
        if p.name in BackboneConfig.model_fields:
            raise ConfigError(
                f"Backbone: factory {name!r} must not take a parameter named {p.name!r} (a field every backbone "
                f"config has: {', '.join(BackboneConfig.model_fields)}); got one. Rename it.")
        annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    title = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) + "Config"
    return create_model(title, __base__=BackboneConfig, __module__=getattr(factory, "__module__", __name__),
                        **fields)


def register_backbone(name: str, factory: Callable | None = None):
    """Add ``factory`` to :data:`metafit.nn.BACKBONES` under ``name`` (usable as a decorator);
    returns the factory, wrapped so that the modules it builds record their settings (an
    ``nn.Module`` class stays the same class). Its module must have ``out_features``."""
    if factory is None:
        return lambda f: register_backbone(name, f)
    from . import BACKBONES

    if not isinstance(name, str) or not name or name in BACKBONES and not _registered_here(name):
        raise ConfigError(
            f"Backbone: name must be a new backbone name; got {short_repr(name)}"
            f"{' (built in)' if name in BACKBONES else ''}. Choose another name.")
    is_class = isinstance(factory, type)
    signature = inspect.signature(factory.__init__ if is_class else factory)
    if is_class:
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    config_cls = _settings_config(name, factory, signature)
    data_params = [p for p in DATA_PARAMETERS if p in signature.parameters]

    def build(config: BackboneConfig, in_channels: int, image_size: int) -> nn.Module:
        data = {"in_channels": in_channels, "image_size": image_size}
        settings = config.model_dump(exclude={"name", *BackboneConfig.model_fields})
        module = raw(**{p: data[p] for p in data_params}, **settings)
        _tag(module, config)
        return module

    build.registered_name = name  # type: ignore[attr-defined]
    if is_class:
        raw = factory
        original = factory.__init__
        if not getattr(original, "_metafit_records", False):
            @functools.wraps(original)
            def __init__(self, *args, **kwargs):  # noqa: N807
                original(self, *args, **kwargs)
                if type(self) is factory:
                    _tag(self, _record(name, config_cls, signature, self, args, kwargs))

            __init__._metafit_records = True  # type: ignore[attr-defined]
            factory.__init__ = __init__
        result = factory
    else:
        raw = factory

        @functools.wraps(factory)
        def result(*args, **kwargs):
            module = factory(*args, **kwargs)
            _tag(module, _record(name, config_cls, signature, None, args, kwargs))
            return module

    BACKBONES[name] = (config_cls, build)
    return result


def _record(name: str, config_cls: type[BackboneConfig], signature: inspect.Signature, self: Any,
            args: tuple, kwargs: dict) -> BackboneConfig:
    from ..validation import parse_config

    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    settings = {k: v for k, v in bound.arguments.items() if k not in DATA_PARAMETERS}
    return parse_config(config_cls, {"name": name, **settings}, "backbone", owner="Backbone")


def _tag(module: Any, config: BackboneConfig) -> None:
    if isinstance(module, nn.Module):
        object.__setattr__(module, _TAG, config)


def _registered_here(name: str) -> bool:
    from . import BACKBONES

    return getattr(BACKBONES[name][1], "registered_name", None) == name


def unregister_backbone(name: str) -> None:
    """Remove the backbone ``name`` if it was added with :func:`register_backbone` (built-in ones
    stay; an unknown name is ignored)."""
    from . import BACKBONES

    if name in BACKBONES and _registered_here(name):
        del BACKBONES[name]


def backbone_spec(module: nn.Module) -> BackboneConfig | None:
    """The backbone config that rebuilds ``module``: what a registered factory recorded, or a
    built-in backbone's own config; None for a module the registry cannot rebuild."""
    from . import BACKBONES

    recorded = getattr(module, _TAG, None)
    if recorded is not None and recorded.name in BACKBONES:
        return recorded
    config = getattr(module, "config", None)
    name = getattr(config, "name", None)
    if isinstance(config, BackboneConfig) and name in BACKBONES and isinstance(BACKBONES[name][1], type) \
            and isinstance(module, BACKBONES[name][1]):
        return config
    return None


def check_rebuildable(module: nn.Module, config: BackboneConfig | None = None) -> None:
    """Refuse to checkpoint a backbone that ``config`` (the checkpoint's backbone section) would
    not rebuild: a module no registry entry built, or one of another registry name."""
    spec = backbone_spec(module)
    if spec is None:
        raise ConfigError(
            f"Checkpoint: the backbone must be rebuildable from the backbone registry; got an unregistered "
            f"{type(module).__name__}. Register its factory with metafit.nn.register_backbone(name, factory) and "
            "build the module with the factory it returns.")
    if config is not None and spec.name != config.name:
        raise ConfigError(
            f"Checkpoint: backbone.name must be the registry name of the model's backbone, {spec.name!r}; got "
            f"{config.name!r}. Save with the config the model was built from.")
