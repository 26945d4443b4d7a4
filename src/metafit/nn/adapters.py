"""Pretrained backbones from the ecosystems users have them in, behind the backbone registry:

- ``hf``: a Hugging Face ``transformers`` vision model (``AutoModel``: DINOv2, ViT, ResNet,
  ConvNeXt, Swin, CLIP's vision tower, ...) from a local directory (``config.json`` plus
  ``model.safetensors``), or a hub id where the machine is online;
- ``timm``: a ``timm`` model by name (``timm.create_model``);
- ``torchvision``: a ``torchvision.models`` model by name.

Each adapter turns the model into a feature extractor (pooled features of ``out_features``,
detected with one forward pass), normalises its input itself with the model's own statistics
(the processor's ``image_mean``/``image_std``, timm's pretrained config, or ImageNet's), so
metafit's images in [0, 1] go in, and records in its config how to rebuild the architecture
(``architecture``: the transformers config, or the model name and arguments), so a checkpoint
is loaded by ``metafit.load`` without the original directory or any download. Weights come
from the directory (``pretrained: true``), from ``backbone.weights`` (a local file), or from
the checkpoint. No remote code is run (``trust_remote_code`` stays off); safetensors weights are
preferred, and a ``.bin`` file is read by transformers with ``weights_only`` loading.

``timm`` and ``torchvision`` are optional: they import torchvision, whose wheel must match the
installed torch build (``pip install metafit[timm]`` on a standard install).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from .base import BackboneConfig

__all__ = [
    "HFBackbone",
    "HFBackboneConfig",
    "TimmBackbone",
    "TimmBackboneConfig",
    "TorchvisionBackbone",
    "TorchvisionBackboneConfig",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _PretrainedConfig(BackboneConfig):
    """Fields every adapter shares."""

    pretrained: bool = Field(
        True, description="start from the model's pretrained weights (hf: the directory's; timm/torchvision: the "
        "library's, which downloads where online); false: random initialisation")
    freeze: bool = Field(False, description="keep the backbone's weights fixed (features only; heads still train)")
    mean: tuple[float, ...] | None = Field(
        None, description="input normalisation mean (None: the model's own, filled in when built)")
    std: tuple[float, ...] | None = Field(
        None, description="input normalisation std (None: the model's own, filled in when built)")


def _normalizer(module: nn.Module, mean, std) -> None:
    module.register_buffer("pixel_mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1), persistent=False)
    module.register_buffer("pixel_std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1), persistent=False)


def _feature_size(module: nn.Module, channels: int, size: int) -> int:
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(2, channels, size, size))
    module.train(was)
    return int(out.shape[-1])


def _freeze(module: nn.Module, freeze: bool) -> None:
    if freeze:
        for p in module.parameters():
            p.requires_grad_(False)


def _expand_channels(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[-3] == 1 else x


# -- Hugging Face transformers ------------------------------------------------------------------
class HFBackboneConfig(_PretrainedConfig):
    """Config of :class:`HFBackbone` (``backbone: {name: hf}``): which transformers model, how its
    tokens are pooled into features, the attention kernel and the pretrained-weight fields."""

    name: Literal["hf"] = "hf"
    model: str = Field(
        "", max_length=1000,
        description="a local transformers model directory (config.json + model.safetensors), or a hub id where online")
    pool: Literal["auto", "cls", "mean", "pooler", "cls_mean"] = Field(
        "auto", description="features: cls (first token), mean (token mean), cls_mean (both, concatenated; DINOv2's "
        "linear-probe features), pooler (the model's pooled output); auto: pooler for convolutional models, cls "
        "for transformers")
    architecture: dict[str, Any] | None = Field(
        None, description="the model's transformers config (filled in when built; checkpoints rebuild from it)")
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="attention kernel: sdpa (fused, fast; no second derivative on CPU), eager (plain "
        "matrix products, differentiable twice, vmap-able); auto: eager for learners with an inner loop (maml, anil, "
        "metasgd, reptile), else sdpa")


def _hf():
    try:
        import transformers  # noqa: PLC0415
    except ImportError as err:
        raise ConfigError(
            "Config: backbone.name 'hf' needs the transformers package; got an import error "
            f"({err}). Install it with pip install 'metafit[hf]'."
        ) from err
    return transformers


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ConfigError(
            f"Config: backbone.model must be a transformers model directory with a readable {path.name}; got "
            f"{str(path.parent)!r} ({err}). Save the model with save_pretrained(DIR)."
        ) from err


class HFBackbone(nn.Module):
    """A transformers vision model as a feature extractor: ``[N, 3, H, W]`` in [0, 1] ->
    ``[N, out_features]`` (single-channel images are repeated to three channels).

    ``config``: an :class:`HFBackboneConfig` (resolved from the model directory when built);
    ``in_channels`` and ``image_size``: the input images, used to detect ``out_features`` with one
    forward pass; ``pretrained``: read the model's pretrained weights (with ``config.pretrained``);
    ``False`` builds the architecture from ``config.architecture`` with random weights, for a
    checkpoint to fill in.
    """

    loads_weights = True  # built with pretrained=False when a checkpoint supplies the weights
    normalizes_input = True
    def __init__(self, config: HFBackboneConfig, in_channels: int, image_size: int, pretrained: bool = True) -> None:
        super().__init__()
        config = resolve_hf(config)
        tf = _hf()
        arch = dict(config.architecture or {})
        model_type = arch.get("model_type", "")
        vision_only = model_type in ("clip", "siglip", "blip", "owlvit", "altclip")
        # transformers picks the fused kernel by default where a model has one; eager works for every model
        attn = {"attn_implementation": "eager"} if config.attention == "eager" else {}
        if pretrained and config.pretrained:
            cls = self._vision_class(tf, model_type) if vision_only else tf.AutoModel
            try:
                self.model = cls.from_pretrained(config.model, trust_remote_code=False, **attn)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"Config: backbone.model must name a loadable transformers model; got {config.model!r} "
                    f"({str(err).splitlines()[0]}). Pass a local directory saved with save_pretrained."
                ) from err
        else:
            hf_config = tf.AutoConfig.for_model(**arch)
            if vision_only:
                hf_config = hf_config.vision_config
            if vision_only:
                self.model = self._vision_class(tf, model_type)(hf_config)
            else:
                self.model = tf.AutoModel.from_config(hf_config, **attn)
        self.config = config
        self.pool = config.pool
        _normalizer(self, config.mean, config.std)
        self._drop_unused_pooler(image_size)
        _freeze(self.model, config.freeze)
        self.out_features = _feature_size(self, in_channels, image_size)

    def _drop_unused_pooler(self, image_size: int) -> None:
        """A transformer's learned pooler (ViT's dense + tanh) is unused with token features: drop
        it, so every parameter of the backbone takes part in the features (and gets gradients)."""
        pooler = getattr(self.model, "pooler", None)
        if self.pool == "pooler" or not isinstance(pooler, nn.Module) or not any(True for _ in pooler.parameters()):
            return
        kwargs = {"interpolate_pos_encoding": True} if _takes_interpolation(self.model) else {}
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model(pixel_values=torch.zeros(1, 3, image_size, image_size), **kwargs)
        self.model.train(was)
        if out.last_hidden_state.dim() == 3:
            self.model.pooler = None

    @staticmethod
    def _vision_class(tf, model_type: str):
        return {"clip": tf.CLIPVisionModel, "siglip": tf.SiglipVisionModel}.get(model_type, tf.AutoModel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (_expand_channels(x) - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        kwargs = {"interpolate_pos_encoding": True} if _takes_interpolation(self.model) else {}
        out = self.model(pixel_values=x, **kwargs)
        tokens = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        if self.pool == "pooler" or (self.pool == "auto" and tokens.dim() == 4):
            # convolutional models (ResNet, ConvNeXt): their global pooling; a map without one: its mean
            return pooled.flatten(1) if pooled is not None else tokens.mean((2, 3))
        if tokens.dim() == 4:
            return tokens.mean((2, 3))
        if self.pool in ("cls", "auto"):
            return tokens[:, 0]
        if self.pool == "mean":
            return tokens[:, 1:].mean(1)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)


def _takes_interpolation(model: nn.Module) -> bool:
    import inspect  # noqa: PLC0415

    try:
        return "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def resolve_hf(config: HFBackboneConfig) -> HFBackboneConfig:
    """``config`` with ``architecture`` and the normalisation statistics filled in from the model
    directory (JSON files only; nothing is executed). A config already resolved is returned."""
    if config.architecture is not None and config.mean is not None and config.std is not None:
        return config
    if not config.model:
        raise ConfigError(
            "Config: backbone.model must name a transformers model directory (or a hub id); got ''. "
            "Set backbone.model=PATH."
        )
    update: dict[str, Any] = {}
    path = Path(config.model).expanduser()
    if path.is_dir():
        if config.architecture is None:
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"Config: backbone.model must be a transformers model directory holding config.json; got "
                    f"{str(path)!r} without it. Save the model with save_pretrained(DIR)."
                )
            update["architecture"] = _read_json(path / "config.json")
        proc = path / "preprocessor_config.json"
        stats = _read_json(proc) if proc.is_file() else {}
    else:  # a hub id: transformers resolves (and downloads) it
        tf = _hf()
        try:
            if config.architecture is None:
                update["architecture"] = tf.AutoConfig.from_pretrained(config.model).to_dict()
            stats = tf.AutoImageProcessor.from_pretrained(config.model).to_dict()
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"Config: backbone.model must be a local transformers directory or a reachable hub id; got "
                f"{config.model!r} ({str(err).splitlines()[0]}). Download the model where online and pass its "
                "directory."
            ) from err
    if config.mean is None:
        update["mean"] = tuple(stats.get("image_mean") or IMAGENET_MEAN)
    if config.std is None:
        update["std"] = tuple(stats.get("image_std") or IMAGENET_STD)
    return config.model_copy(update=update)


class _LibraryAdapter(nn.Module):
    """What the timm and torchvision adapters share: the model's own input normalisation,
    freezing, feature-size detection and the forward pass of a model whose classifier is gone."""

    loads_weights = True  # built with pretrained=False when a checkpoint supplies the weights
    normalizes_input = True

    def _finish(self, model: nn.Module, config, mean, std, in_channels: int, image_size: int) -> None:
        self.model = model
        self.config = config
        _normalizer(self, config.mean or mean, config.std or std)
        _freeze(self.model, config.freeze)
        self.out_features = _feature_size(self, in_channels, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (_expand_channels(x) - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        return self.model(x).flatten(1)


# -- timm ---------------------------------------------------------------------------------------
class TimmBackboneConfig(_PretrainedConfig):
    """Config of :class:`TimmBackbone` (``backbone: {name: timm}``): the timm model name and arguments
    and the pretrained-weight fields."""

    name: Literal["timm"] = "timm"
    model: str = Field("resnet18", max_length=200, description="a timm model name (timm.list_models())")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of timm.create_model")


def _timm():
    try:
        import timm  # noqa: PLC0415
    except Exception as err:  # ImportError, or torchvision's operator errors against another torch build
        raise ConfigError(
            "Config: backbone.name 'timm' needs the timm package (and a torchvision matching torch); got an import "
            f"error ({str(err).splitlines()[0]}). Install it with pip install 'metafit[timm]'."
        ) from err
    return timm


class TimmBackbone(_LibraryAdapter):
    """A timm model (``timm.create_model(..., num_classes=0)``) as a feature extractor: ``[N, C, H, W]``
    in [0, 1] -> ``[N, out_features]``, normalised with the model's pretrained statistics.

    ``config``: a :class:`TimmBackboneConfig`; ``in_channels`` and ``image_size``: the input images,
    used to detect ``out_features`` with one forward pass; ``pretrained``: load timm's pretrained
    weights (with ``config.pretrained``; they download where online), ``False`` for random weights
    that a checkpoint fills in. Needs the ``timm`` extra (a :class:`ConfigError` otherwise).
    """

    def __init__(self, config: TimmBackboneConfig, in_channels: int, image_size: int, pretrained: bool = True) -> None:
        super().__init__()
        timm = _timm()
        try:
            model = timm.create_model(config.model, pretrained=pretrained and config.pretrained, num_classes=0,
                                      **config.kwargs)
        except (RuntimeError, ValueError, TypeError, OSError) as err:
            raise ConfigError(
                f"Config: backbone.model must be a timm model name; got {config.model!r} ({str(err).splitlines()[0]}). "
                "List them with timm.list_models()."
            ) from err
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self._finish(model, config, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), in_channels,
                     image_size)


# -- torchvision --------------------------------------------------------------------------------
class TorchvisionBackboneConfig(_PretrainedConfig):
    """Config of :class:`TorchvisionBackbone` (``backbone: {name: torchvision}``): the model name and
    the pretrained-weight fields."""

    name: Literal["torchvision"] = "torchvision"
    model: str = Field("resnet18", max_length=200, description="a torchvision.models name (e.g. resnet18, "
                       "convnext_tiny, vit_b_16)")


class TorchvisionBackbone(_LibraryAdapter):
    """A ``torchvision.models`` model with its ImageNet classifier replaced by the identity, as a
    feature extractor: ``[N, C, H, W]`` in [0, 1] -> ``[N, out_features]``, normalised with ImageNet's
    statistics (or the config's ``mean``/``std``).

    ``config``: a :class:`TorchvisionBackboneConfig`; ``in_channels`` and ``image_size``: the input
    images, used to detect ``out_features`` with one forward pass; ``pretrained``: load the
    ``DEFAULT`` weights (with ``config.pretrained``; they download where online), ``False`` for random
    weights that a checkpoint fills in.
    """

    def __init__(self, config: TorchvisionBackboneConfig, in_channels: int, image_size: int,
                 pretrained: bool = True) -> None:
        super().__init__()
        try:
            import torchvision  # noqa: PLC0415
        except Exception as err:
            raise ConfigError(
                "Config: backbone.name 'torchvision' needs a torchvision matching the installed torch; got an import "
                f"error ({str(err).splitlines()[0]}). Install the torchvision release built for your torch."
            ) from err
        weights = "DEFAULT" if pretrained and config.pretrained else None
        try:
            model = torchvision.models.get_model(config.model, weights=weights)
        except (ValueError, RuntimeError, OSError) as err:
            raise ConfigError(
                f"Config: backbone.model must be a torchvision model name; got {config.model!r} "
                f"({str(err).splitlines()[0]}). List them with torchvision.models.list_models()."
            ) from err
        for attr in ("fc", "classifier", "heads", "head"):  # drop the ImageNet classifier
            if isinstance(getattr(model, attr, None), nn.Module):
                setattr(model, attr, nn.Identity())
                break
        self._finish(model, config, IMAGENET_MEAN, IMAGENET_STD, in_channels, image_size)
