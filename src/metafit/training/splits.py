"""What a few-shot run trains on: the device, the samplers of each split, and the description
of the split (classes per split, names, rotations) that runs log and checkpoints keep."""

from __future__ import annotations

from typing import Any

import torch

from ..algorithms import get_algorithm
from ..data import ClassBatchSampler, EpisodeSampler, ImageClasses, SinusoidFamily, SinusoidSampler, symmetry_count
from ..errors import ConfigError, short_repr
from .config import RunConfig

__all__ = ["MAX_LISTED_CLASSES", "check_split_sizes", "describe_split", "make_sampler", "resolve_device",
           "split_lines", "split_warnings", "with_base_classes"]


def resolve_device(name: str, field: str = "train.device",
                   fix: str = "Use --set train.device=cpu (or auto).") -> torch.device:
    """The torch device that ``name`` (the value of a config's ``field``: ``auto``, ``cpu``,
    ``cuda``, ``mps``) stands for; ``auto`` is cuda when available. A device this machine lacks is
    a ConfigError that names ``field`` and ends with ``fix``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Config: {field} must be available on this machine; got 'cuda' without a CUDA GPU. {fix}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"Config: {field} must be available on this machine; got 'mps' without Apple MPS. {fix}")
    return torch.device(name)


def make_sampler(data: ImageClasses | SinusoidFamily, config: RunConfig, split: str,
                 seed: int) -> EpisodeSampler | SinusoidSampler | ClassBatchSampler:
    """The sampler of ``data`` (the classes of ``split``, or a sinusoid family) for ``split``:
    training tasks (the ``task`` section of ``config``, with augmentation) or evaluation tasks
    (``val``/``test``: the ``eval`` section, no augmentation), its random stream seeded by
    ``seed``. Algorithms that pretrain on standard mini-batches (``training_data == "batches"``)
    get a :class:`ClassBatchSampler` for the training split."""
    t = config.task if split == "train" else config.eval
    if isinstance(data, SinusoidFamily):
        return data.sampler(t.k_shots, t.n_queries, seed)
    workers = getattr(config.data, "workers", None)
    if split == "train" and get_algorithm(config.algorithm.name).training_data == "batches":
        return ClassBatchSampler(data, rotations=config.data.rotations, reflections=_reflections(config),
                                 augment=config.augment.augmenter(),
                                 seed=seed, owner="Sampler (train split)", workers=workers)
    rotations = config.data.rotations
    if split != "train" and config.eval.rotations is not None:
        rotations = config.eval.rotations
    return EpisodeSampler(
        data, t.n_ways, t.k_shots, t.n_queries,
        rotations=rotations, within_group=t.within_group, reflections=split == "train" and _reflections(config),
        augment=config.augment.augmenter() if split == "train" else None,
        seed=seed, owner=f"Sampler ({split} split)", workers=workers,
    )


def _reflections(config: RunConfig) -> bool:
    return bool(getattr(config.data, "reflections", False))


def with_base_classes(config: RunConfig, train: ImageClasses) -> RunConfig:
    """Record the number of pretraining classes (training classes x rotations x mirror images) in
    the config, so that checkpoints rebuild the same classifier; refuse a config that says otherwise."""
    n = train.n_classes * symmetry_count(config.data.rotations, _reflections(config))
    have = config.algorithm.n_base_classes
    if have is None:
        return config.model_copy(update={"algorithm": config.algorithm.model_copy(update={"n_base_classes": n})})
    if have != n:
        raise ConfigError(
            f"Config: algorithm.n_base_classes must equal the training classes (x4 with rotations, x2 with "
            f"reflections); got "
            f"{have} for {n} classes in the data. Remove the field (it is filled in) or fix the data."
        )
    return config


#: class names are listed (printed and stored in checkpoints) for splits of at most this many classes
MAX_LISTED_CLASSES = 20


def describe_split(splits: dict[str, Any], config: RunConfig, given: bool = False) -> dict[str, Any] | None:
    """What the run trains, validates and tests on: the classes of every split (their number,
    images, and names where at most :data:`MAX_LISTED_CLASSES`), whether rotated copies count as
    classes, and how the split was made. None for data that is not a set of classes (sinusoids:
    every split draws tasks from the same family with its own seed). ``given``: the splits were
    passed in (``Trainer(splits=...)``), not read as the data config says."""
    if not all(isinstance(splits.get(s), ImageClasses) for s in ("train", "val", "test")):
        return None
    dc = config.data
    rotations = bool(getattr(dc, "rotations", False))
    eval_rotations = rotations if config.eval.rotations is None else bool(config.eval.rotations)
    how = "the splits passed to the Trainer" if given else dc.split_description() if hasattr(
        dc, "split_description") else (
        f"protocol {dc.protocol}" if getattr(dc, "protocol", None) else "the source's own split")
    return {
        "source": dc.name,
        "how": how,
        "classes": {s: splits[s].n_classes for s in ("train", "val", "test")},
        "images": {s: splits[s].n_images for s in ("train", "val", "test")},
        "rotations": {"train": rotations, "val": eval_rotations, "test": eval_rotations},
        "reflections": {"train": _reflections(config), "val": False, "test": False},
        "names": {s: list(splits[s].class_names) for s in ("train", "val", "test")
                  if splits[s].n_classes <= MAX_LISTED_CLASSES},
    }


def _symmetries(split: dict[str, Any], s: str) -> tuple[bool, bool]:
    """Whether split ``s`` counts rotated and mirrored copies as classes (missing: no)."""
    return tuple(bool((split.get(key) or {}).get(s)) for key in ("rotations", "reflections"))


def _copies(split: dict[str, Any], s: str) -> int:
    return symmetry_count(*_symmetries(split, s))


def _copy_kinds(split: dict[str, Any], s: str) -> str:
    rot, ref = _symmetries(split, s)
    return " and ".join(["rotations"] * rot + ["mirror images"] * ref)


def _copies_text(split: dict[str, Any], s: str) -> str:
    kinds = _copy_kinds(split, s)
    return f" (x{_copies(split, s)} with {kinds})" if kinds else ""


def split_lines(split: dict[str, Any]) -> list[str]:
    """``split`` (see :func:`describe_split`; from a checkpoint, any key but ``source`` may be
    missing) as printable lines."""
    c = split.get("classes") or {}
    counts = ", ".join(f"{s} {c[s]} classes" + _copies_text(split, s) for s in ("train", "val", "test") if s in c)
    how = f": {split['how']}" if split.get("how") else ""
    lines = [f"data split: {counts or 'classes not recorded'} ({split.get('source')} data{how})"]
    for s, names in (split.get("names") or {}).items():
        lines.append(f"  {s} classes: " + ", ".join(n if n.isprintable() else short_repr(n, 60) for n in names))
    return lines


def check_split_sizes(split: dict[str, Any], config: RunConfig) -> None:
    """Refuse a split with fewer classes (rotated copies included) than its tasks' n_ways, before
    anything is trained: a short test split would otherwise be found only after training."""
    episodic = get_algorithm(config.algorithm.name).training_data != "batches"
    for s, field, n_ways in (("train", "task.n_ways", config.task.n_ways if episodic else 0),
                             ("val", "eval.n_ways", config.eval.n_ways), ("test", "eval.n_ways", config.eval.n_ways)):
        have = split["classes"][s] * _copies(split, s)
        if have >= n_ways:
            continue
        counts = "/".join(str(split["classes"][k]) for k in ("train", "val", "test"))
        more = {"train": "smaller data.val_fraction/data.test_fraction", "val": "a larger data.val_fraction",
                "test": "a larger data.test_fraction"}[s]
        fix = (f"Lower {field}, or give the split more classes ({more}, or more class folders in {s}/)"
               if split["how"].startswith(("the classes of", "the train/")) else f"Lower {field}")
        raise ConfigError(
            f"Trainer: the {s} split must have at least {field}={n_ways} classes; got {have} "
            f"({_copy_kinds(split, s) + ' included; ' if _copies(split, s) > 1 else ''}train/val/test classes {counts}, "
            f"{split['how']}). {fix}."
        )


def split_warnings(split: dict[str, Any], config: RunConfig) -> list[str]:
    out = []
    if split["source"] == "folder" and split["rotations"]["train"]:
        out.append(
            "warning: data.rotations is on: every class also counts as 3 more classes, its copies rotated by 90, "
            "180 and 270 degrees (in training, and in validation/test unless eval.rotations=false). Right for "
            "handwriting like Omniglot, wrong where a rotated image is something else (6 and 9) or never occurs "
            "(photos): set data.rotations=false.")
    n_ways = config.eval.n_ways
    for s in ("val", "test"):
        have = split["classes"][s]
        if split["rotations"][s] and have < n_ways:
            out.append(
                f"warning: the {s} split has {have} classes, fewer than eval.n_ways={n_ways}: its {n_ways}-way tasks "
                f"reach {n_ways} classes only with rotated copies of the same classes. Lower eval.n_ways or give "
                f"the split more classes" + (f" (a larger data.{s}_fraction, or more class folders in {s}/)."
                                            if split["how"].startswith(("the classes of", "the train/"))
                                            else "."))
    return out


