"""Pretrained backbones: initialise any ``nn.Module`` from a local weights file, then meta-train
or fine-tune it.

Nothing in a weights file can run code: ``.safetensors`` files are parsed by safetensors, and
``.pt``/``.pth``/``.bin`` files by ``torch.load(weights_only=True)``, which refuses any pickle
that holds more than tensors and plain containers. Keys are matched after stripping a prefix
(given, or the one that matches most of the module's tensors: a metafit checkpoint stores the
backbone under ``model.backbone.``, other code often under ``backbone.``, ``encoder.`` or
``module.``). What was loaded, missing and left unused comes back as a :class:`WeightsReport`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from torch import nn

from ..errors import CheckpointError
from ..nn.normalize import NORM_BUFFERS

__all__ = ["WeightsReport", "load_backbone_weights", "read_weights"]

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: mapping keys under which a training script commonly nests the state dict of a torch.save file
NESTED_KEYS = ("state_dict", "model", "model_state_dict")
_SHOW = 8  # names listed in reports and messages before "... and N more"


def _names(keys, limit: int = _SHOW) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_backbone_weights` did. ``loaded``: tensors copied into the module;
    ``missing``: module tensors the file lacks (left as initialised); ``unexpected``: file tensors
    under ``prefix`` that the module has no place for (not used); ``ignored``: file tensors
    outside ``prefix`` (e.g. a checkpoint's head and optimizer state)."""

    path: str
    format: str
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    prefix: str
    prefix_detected: bool
    ignored: int = 0

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        how = "auto-detected" if self.prefix_detected else "given"
        total = self.loaded + len(self.missing)
        lines = [
            f"backbone weights: {self.path} ({self.format})",
            f"  loaded {self.loaded} of the backbone's {total} tensors; key prefix {self.prefix!r} ({how})"
            + (f"; {self.ignored} tensors outside the prefix ignored" if self.ignored else ""),
            f"  missing, left as initialised ({len(self.missing)}): {_names(self.missing)}",
            f"  unexpected, not used ({len(self.unexpected)}): {_names(self.unexpected)}",
        ]
        return "\n".join(lines)


def _is_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    blob = path.read_bytes()
    try:
        tensors = st_load(blob)
    except Exception as err:  # safetensors raises its own error types for every malformed file
        raise CheckpointError(
            f"Weights: {str(path)!r} must be a valid safetensors file; got an unreadable or corrupted file "
            f"({err}). Re-export the weights, or pass another file."
        ) from err
    kind = "safetensors"
    try:
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8:8 + n]).get("__metadata__") or {}
        if "metafit" in meta:
            kind = "safetensors, metafit checkpoint"
    except (ValueError, AttributeError):  # metadata only names the format in the report
        pass
    return tensors, kind


def _torch_reason(err: BaseException) -> str:
    """The informative part of torch.load's (long, ANSI-coloured) error message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
    if found:
        return found.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only met an object it may not rebuild
        raise CheckpointError(
            f"Weights: {str(path)!r} must be a PyTorch file of tensors (a state dict) that "
            f"torch.load(weights_only=True) accepts; got a file it refuses ({_torch_reason(err)}). Loading "
            "it in full could run arbitrary code. If you trust the file, re-save just the tensors: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pt'), or write "
            "them with safetensors.torch.save_file."
        ) from err
    except Exception as err:  # damaged zip archives, truncated files, ...
        raise CheckpointError(
            f"Weights: {str(path)!r} must be a readable PyTorch file; got an unreadable or corrupted file "
            f"({_torch_reason(err)}). Re-export the weights, or pass another file."
        ) from err
    nested = []
    while isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        nested.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"Weights: {str(path)!r} must hold a mapping of tensor names to tensors (a state dict); got "
            f"{type(obj).__name__}. Save module.state_dict(), not the module or a list."
        )
    bad = [(k, v) for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        key, value = bad[0]
        raise CheckpointError(
            f"Weights: {str(path)!r} must map names to tensors (a state dict, possibly under one of "
            f"{list(NESTED_KEYS)}); got {len(bad)} other entries, e.g. {key!r} -> {type(value).__name__}. "
            "Save only the tensors: torch.save(module.state_dict(), 'weights.pt')."
        )
    where = "".join(f"[{k!r}]" for k in nested)
    return dict(obj), "torch state dict, weights_only" + (f", under {where}" if where else "")


def _checkpoint_backbone(path: str | os.PathLike) -> str | None:
    """The backbone a metafit checkpoint was trained with, as ``{name: ..., <widths>}`` text
    (None when its metadata cannot tell)."""
    from .checkpoint import read_checkpoint, stored_config

    try:
        meta, _ = read_checkpoint(path)
        bb = stored_config(meta, Path(path)).backbone.model_dump(mode="json")
    except Exception:  # noqa: BLE001 - only a better message is at stake; the caller raises anyway
        return None
    keep = {k: v for k, v in bb.items() if v is not None and not k.startswith("weights")}
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in keep.items()) + "}"


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, format)`` of a weights file, without running any code from it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"Weights: backbone.weights must be an existing file; got {str(path)!r}. Check the path "
            "(relative paths start from the working directory), or set backbone.weights=null."
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if _is_safetensors(head):
        return _read_safetensors(path)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip format, or a legacy pickle
        return _read_torch(path)
    raise CheckpointError(
        f"Weights: backbone.weights must be a .safetensors or a .pt/.pth/.bin PyTorch file; got {str(path)!r}, "
        "which is neither. Export the weights as a state dict with safetensors.torch.save_file or torch.save."
    )


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def _same_kind(have: torch.dtype, want: torch.dtype) -> bool:
    """Whether a file tensor of dtype ``have`` may be converted into a module tensor of dtype
    ``want``: floating-point into floating-point (float16 or bfloat16 weights are common), an
    integer or floating-point number into an integer counter (``num_batches_tracked`` of a state
    dict halved as a whole); never a boolean, integer or complex tensor into weights."""
    if have == want:
        return True
    if _kind(want) == "integer":
        return _kind(have) in ("integer", "floating-point")
    return _kind(have) == _kind(want) == "floating-point"


def _candidate_prefixes(file_keys, targets: set[str]) -> dict[str, int]:
    """Every prefix (``''`` or ending in ``.``) that turns some file key into a module key, with
    the number of keys it matches."""
    counts: dict[str, int] = {}
    for key in file_keys:
        if key in targets:
            counts[""] = counts.get("", 0) + 1
        for i, ch in enumerate(key):
            if ch == "." and key[i + 1:] in targets:
                p = key[:i + 1]
                counts[p] = counts.get(p, 0) + 1
    return counts


def _dotted_prefixes(file_keys) -> list[str]:
    seen: dict[str, None] = {"": None}
    for key in file_keys:
        parts = key.split(".")
        for j in range(1, len(parts)):
            seen.setdefault(".".join(parts[:j]) + ".", None)
    return list(seen)


def _choose_prefix(tensors: dict, target: dict, prefix: str | None, path: str | os.PathLike,
                   fmt: str) -> tuple[str, bool]:
    """The key prefix under which the file's tensors are named like ``target``'s (detected when
    ``prefix`` is None) and whether it was detected; a :class:`CheckpointError` if none fits."""
    shown_path, names = str(path), set(target)
    counts = _candidate_prefixes(tensors, names)
    if prefix is None:
        detected = True
        chosen = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0])))[0] if counts else None
        tried = _dotted_prefixes(tensors)
    else:  # as given; 'model.backbone' is read as 'model.backbone.'
        detected = False
        tried = [prefix] + ([prefix + "."] if prefix and not prefix.endswith(".") else [])
        chosen = next((p for p in tried if any(k.startswith(p) and k[len(p):] in names for k in tensors)), None)
    if chosen is None:
        holds = _checkpoint_backbone(path) if "metafit checkpoint" in fmt else None
        if holds is not None:  # say what the file is rather than list the prefixes tried
            raise CheckpointError(
                f"Weights: {shown_path!r} must hold weights of this backbone; got a metafit checkpoint of a "
                f"{holds} backbone, whose tensor names match none of this one's. Configure backbone: "
                f"{holds} to start from it, or pass weights of this backbone."
            )
        shown = ", ".join(repr(p) for p in tried[:3]) + (f" and {len(tried) - 3} more" if len(tried) > 3 else "")
        raise CheckpointError(
            f"Weights: {shown_path!r} must contain tensors named like the backbone's (e.g. "
            f"{_names(list(target)[:3], 3)}) after stripping a key prefix; got no match with prefix "
            f"{shown} (file keys: {_names(list(tensors), 4) if tensors else 'the file holds no tensors'}). "
            "Check that the file belongs to this backbone (name and widths), or set backbone.weights_prefix "
            "to the part before the backbone's names."
        )
    return chosen, detected


def load_backbone_weights(module: nn.Module, path: str | os.PathLike, prefix: str | None = None,
                          strict: bool = False) -> WeightsReport:
    """Copy the tensors of a weights file into ``module`` (any ``nn.Module``: its parameters and
    persistent buffers, matched by name after stripping ``prefix``) and report what happened.

    ``prefix=None`` picks the prefix that matches most of the module's tensors; ``''`` means the
    names match as they are. Raises :class:`CheckpointError` when the file is missing or unreadable,
    when no tensor matches, when a matching tensor has another shape (every such key is named),
    and with ``strict=True`` when a module tensor is missing or a file tensor under the prefix is
    unused. Floating-point tensors are converted to the module's dtype (e.g. float16 weights), and
    integer buffers (counters) take integer or floating-point values; a boolean, integer or complex
    tensor where the module has floating-point weights is refused (never cast silently). The
    module's device and memory format stay.
    """
    tensors, fmt = read_weights(path)
    shown_path = str(path)
    # the input statistics belong to the data the model is configured for, not to the file
    target = {k: v for k, v in module.state_dict().items() if k not in NORM_BUFFERS}
    names = set(target)
    chosen, detected = _choose_prefix(tensors, target, prefix, path, fmt)
    state = {k[len(chosen):]: v for k, v in tensors.items() if k.startswith(chosen)}
    ignored = len(tensors) - len(state)
    matched = {k: v for k, v in state.items() if k in names}
    missing = tuple(k for k in target if k not in matched)
    unexpected = tuple(k for k in state if k not in names and k not in NORM_BUFFERS)
    mismatched = [(k, tuple(matched[k].shape), tuple(t.shape)) for k, t in target.items()  # the backbone's order
                  if k in matched and tuple(matched[k].shape) != tuple(t.shape)]
    if mismatched:
        shown_items = [f"{chosen}{k}: file {list(a)} vs backbone {list(b)}" for k, a, b in mismatched]
        if len(shown_items) > 4:  # the first and the last two: one line stays readable
            shown_items = shown_items[:2] + [f"... {len(shown_items) - 4} more ..."] + shown_items[-2:]
        detail = "; ".join(shown_items)
        raise CheckpointError(
            f"Weights: tensor shapes in {shown_path!r} must match the backbone; got {len(mismatched)} "
            f"mismatched: {detail}. Configure the backbone the weights were trained with (its widths and "
            "data.channels / image size), or re-save the file without these tensors to keep them "
            "initialised."
        )
    wrong = [(k, v.dtype, target[k].dtype) for k, v in matched.items() if not _same_kind(v.dtype, target[k].dtype)]
    if wrong:
        key, have, want = wrong[0]
        raise CheckpointError(
            f"Weights: tensor {chosen + key!r} of {shown_path!r} must be {_kind(want)} like the backbone's {want}; got "
            f"{have} ({len(wrong)} such tensors). The file does not hold weights of this backbone (or was damaged); "
            "re-export them as floating-point tensors."
        )
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"Weights: {shown_path!r} must hold exactly the backbone's tensors (weights_strict=true, prefix "
            f"{chosen!r}); got {len(missing)} missing ({_names(missing)}) and {len(unexpected)} unexpected "
            f"({_names(unexpected)}). Set backbone.weights_strict=false to load what matches, or fix "
            "backbone.weights_prefix."
        )
    module.load_state_dict(matched, strict=False)
    report = WeightsReport(path=shown_path, format=fmt, loaded=len(matched), missing=missing,
                           unexpected=unexpected, prefix=chosen, prefix_detected=detected, ignored=ignored)
    log.info("%s", report)
    return report
